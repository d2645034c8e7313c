"""The onnxruntime backend: runs OUTPUT/onnx (see factorport.formats.onnx).

Options: `threads` (intra-op threads), `accuracy_level` of MatMulNBits (0:
float32 compute, 4: int8 activations), `optimization` (graph optimization
level: disable / basic / extended / all). Timing: `load_seconds`, and
`generate` times the prefill and every decoded token.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...errors import FactorportError
from ...formats.onnx.runtime import DecoderSession
from . import Generation, hf_text_start


class OnnxruntimeBackend:
    name = "onnxruntime"

    def __init__(self, decoder: DecoderSession, tokenizer=None, load_seconds: float = 0.0) -> None:
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.load_seconds = load_seconds

    @classmethod
    def open(
        cls,
        artifact_dir: str | Path,
        threads: int | None = None,
        accuracy_level: int = 0,
        optimization: str = "all",
    ) -> "OnnxruntimeBackend":
        artifact_dir = Path(artifact_dir)
        started = time.perf_counter()
        decoder = DecoderSession.open(artifact_dir, threads=threads, accuracy_level=accuracy_level, optimization=optimization)
        load_seconds = time.perf_counter() - started
        return cls(decoder, _tokenizer(artifact_dir), load_seconds)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise FactorportError(f"{self.decoder.directory} has no tokenizer files; re-export with a tokenizer")
        return self.tokenizer

    def tokenize(self, text: str) -> list[int]:
        return self._need_tokenizer()(text, add_special_tokens=False)["input_ids"]

    def text_start(self) -> list[int]:
        return hf_text_start(self._need_tokenizer())

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._need_tokenizer().decode(list(ids), skip_special_tokens=True)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(seq_len, vocab) float32 logits for one window of token ids."""
        return self.decoder.logits(ids)

    def generate(self, ids: Sequence[int], new_tokens: int) -> Generation:
        """Greedy decoding: prefill, then one token at a time, present -> past."""
        started = time.perf_counter()
        logits, past = self.decoder.step(list(ids), self.decoder.empty_past())
        token = int(np.argmax(logits[-1]))
        result = Generation([token], time.perf_counter() - started)
        for _ in range(new_tokens - 1):
            started = time.perf_counter()
            logits, past = self.decoder.step([token], past)
            token = int(np.argmax(logits[-1]))
            result.decode_seconds.append(time.perf_counter() - started)
            result.tokens.append(token)
        return result


def _tokenizer(directory: Path):
    from ...formats.onnx.runtime import load_tokenizer

    return load_tokenizer(directory)
