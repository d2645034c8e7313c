"""The llama.cpp backend (llama-cpp-python): runs OUTPUT/gguf/model.gguf,
with OUTPUT/gguf/adapter.gguf applied as a LoRA adapter when present.

Both files are checked completely before llama.cpp sees them
(formats/gguf/checks.py: structure, hyper-parameters, every tensor's shape
and type, the adapter's pairs and shapes): llama.cpp may abort the process on
a malformed file rather than return an error. After loading, the adapter is
verified to be really loaded: llama-cpp-python 0.3.36 tests the ctypes
pointer llama.cpp returns with `is None`, which a NULL pointer never is, and
keeps it; the first evaluation then dereferences NULL.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...errors import FactorportError
from . import Generation

MODEL_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"
DEFAULT_CONTEXT = 2048
BATCH = 512  # tokens per llama.cpp batch when a window is scored


def _adapter_loaded(llm) -> bool:
    """Whether llama.cpp returned a real adapter (not NULL) for lora_path."""
    adapter = getattr(llm, "_lora_adapter", None)
    return adapter is not None and ctypes.cast(adapter, ctypes.c_void_p).value is not None


class LlamaCppBackend:
    name = "llama.cpp"

    def __init__(self, llm, load_seconds: float, model_path: Path, adapter_path: Path | None) -> None:
        self.llm = llm
        self.load_seconds = load_seconds
        self.model_path = model_path
        self.adapter_path = adapter_path

    @classmethod
    def open(
        cls,
        artifact_dir: Path,
        threads: int | None = None,
        adapter: bool = True,
        n_ctx: int = DEFAULT_CONTEXT,
        model_file: str = MODEL_FILE,
    ) -> "LlamaCppBackend":
        """Load `artifact_dir`/model.gguf (+ adapter.gguf unless `adapter` is False)."""
        from ...formats.gguf.checks import check_adapter, check_model

        artifact_dir = Path(artifact_dir)
        model_path = artifact_dir / model_file
        reader = check_model(model_path)  # also refuses factorport's own layout
        adapter_path = artifact_dir / ADAPTER_FILE if adapter and (artifact_dir / ADAPTER_FILE).exists() else None
        if adapter_path is not None:
            check_adapter(reader, adapter_path)
        del reader
        from ...hostcpu import import_llama_cpp

        llama_cpp = import_llama_cpp()
        started = time.perf_counter()
        try:
            llm = llama_cpp.Llama(
                model_path=str(model_path),
                lora_path=None if adapter_path is None else str(adapter_path),
                n_ctx=n_ctx,
                n_batch=BATCH,
                n_ubatch=BATCH,
                n_threads=threads,
                n_threads_batch=threads,
                logits_all=True,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise FactorportError(f"llama.cpp could not load {model_path}: {str(exc).splitlines()[0]}") from exc
        if adapter_path is not None and not _adapter_loaded(llm):
            llm.close()
            raise FactorportError(f"llama.cpp refused the LoRA adapter {adapter_path} (see its log above); re-export it with 'factorport export OUTPUT --format gguf --force'")
        return cls(llm, time.perf_counter() - started, model_path, adapter_path)

    def close(self) -> None:
        """Free llama.cpp's model and context now (not at interpreter exit)."""
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def text_start(self) -> list[int]:
        # the BOS when the file's tokenizer.ggml.add_bos_token says to add one
        return self.llm.tokenize(b"", add_bos=True, special=False)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def _check_length(self, n: int) -> None:
        if n > self.llm.n_ctx():
            raise FactorportError(f"{n} tokens do not fit llama.cpp's context of {self.llm.n_ctx()}; use shorter windows")

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(len(ids), vocab) float32 logits of one window, from an empty cache."""
        tokens = [int(t) for t in torch.as_tensor(ids).reshape(-1)]
        self._check_length(len(tokens))
        self.llm.reset()
        self.llm.eval(tokens)
        return torch.from_numpy(np.array(self.llm.scores[: len(tokens)], dtype=np.float32))

    def generate(self, ids: Sequence[int], new_tokens: int) -> Generation:
        """Greedy decoding with llama.cpp's KV cache, one token per eval, timed."""
        tokens = [int(t) for t in ids]
        self._check_length(len(tokens) + new_tokens)
        self.llm.reset()
        started = time.perf_counter()
        self.llm.eval(tokens)
        token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        result = Generation([token], time.perf_counter() - started)
        for _ in range(new_tokens - 1):
            started = time.perf_counter()
            self.llm.eval([token])
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            result.decode_seconds.append(time.perf_counter() - started)
            result.tokens.append(token)
        return result
