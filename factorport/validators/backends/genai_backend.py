"""The onnxruntime-genai backend: runs OUTPUT/onnx as `og.Model` (the runtime
edge ONNX deployments use), with its own tokenizer and its own generation loop.

The directory is the onnxruntime backend's (factorport.formats.onnx): the
same model.onnx, with the genai_config.json the exporter writes beside it.
`graph.validate_directory` checks every file before onnxruntime-genai reads
one. `checked=False` skips that for a directory factorport did not write
(onnxruntime-genai's model builder output, a benchmark anchor); it then relies
on onnxruntime-genai's own checks, in the child process it runs in.

Options: `threads` (intra-op threads of the decoder session);
`accuracy_level`, only as a check: og runs the level written in the graph.
Timing:
`append_tokens(prompt)` runs the prefill; each later `generate_next_token`
runs one decode step and picks its token (greedy: `do_sample` false).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...errors import FactorportError
from ...formats.onnx.genai import GENAI_CONFIG
from . import Generation

INSTALL = "install it with 'pip install onnxruntime-genai'"


def _og():
    try:
        import onnxruntime_genai
    except ImportError as exc:
        raise FactorportError(f"the onnxruntime-genai backend needs the onnxruntime-genai package ({exc}); {INSTALL}") from exc
    return onnxruntime_genai


class GenaiBackend:
    name = "onnxruntime-genai"

    def __init__(self, og, model, tokenizer, directory: Path, context: int, load_seconds: float) -> None:
        self.og, self.model, self.tokenizer = og, model, tokenizer
        self.directory = directory
        self.context = context
        self.load_seconds = load_seconds
        self._start = self._text_start() if tokenizer is not None else []

    @classmethod
    def open(cls, artifact_dir: str | Path, threads: int | None = None, checked: bool = True,
             accuracy_level: int | None = None) -> "GenaiBackend":
        directory = Path(artifact_dir)
        if not (directory / GENAI_CONFIG).is_file():
            raise FactorportError(f"{directory} has no {GENAI_CONFIG}; re-export it with 'factorport export OUTPUT --format onnx --force'")
        if checked:
            from ...formats.onnx.graph import validate_directory
            from ...formats.onnx.runtime import written_accuracy_level

            written = written_accuracy_level(validate_directory(directory))
            if accuracy_level is not None and accuracy_level != written:
                raise FactorportError(
                    f"{directory}: onnxruntime-genai runs the graph's MatMulNBits accuracy_level {written}, not {accuracy_level}; "
                    f"re-export with 'factorport export OUTPUT --format onnx --onnx-accuracy-level {accuracy_level} --force'"
                )
        og = _og()
        started = time.perf_counter()
        try:
            config = og.Config(str(directory))
            if threads:
                config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
            model = og.Model(config)
            tokenizer = og.Tokenizer(model) if (directory / "tokenizer.json").is_file() else None
        except Exception as exc:  # noqa: BLE001 - onnxruntime-genai raises RuntimeError with its own text
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise FactorportError(f"onnxruntime-genai cannot load {directory} ({first}); re-export it") from exc
        context = json.loads((directory / GENAI_CONFIG).read_text()).get("model", {}).get("context_length")
        if type(context) is not int or context <= 0:  # only where checked=False: validate_directory checks it
            raise FactorportError(f"{directory / GENAI_CONFIG}: model.context_length is {context!r}, not a positive integer")
        return cls(og, model, tokenizer, directory, context, time.perf_counter() - started)

    def _text_start(self) -> list[int]:
        """The BOS og's encode puts before a text, where its tokenizer adds one
        (no text encodes to the BOS itself); og has no "without special tokens"."""
        bos = self.tokenizer.bos_token_id
        return [bos] if list(self.tokenizer.encode("a"))[:1] == [bos] else []

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise FactorportError(f"{self.directory} has no tokenizer files; re-export with a tokenizer")
        return self.tokenizer

    def tokenize(self, text: str) -> list[int]:
        ids = [int(i) for i in self._need_tokenizer().encode(text)]
        return ids[len(self._start):] if ids[: len(self._start)] == self._start else ids

    def text_start(self) -> list[int]:
        return list(self._start)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._need_tokenizer().decode(np.asarray(list(ids), dtype=np.int32))

    def _generator(self, length: int):
        if length > self.context:
            raise FactorportError(f"{self.directory}: {length} positions exceed the model's {self.context} (context_length); use shorter windows")
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=length, do_sample=False, batch_size=1)
        return self.og.Generator(self.model, params)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(seq_len, vocab) float32 logits of one window, prefilled from an empty cache."""
        ids = torch.as_tensor(ids).reshape(-1).tolist()
        generator = self._generator(len(ids) + 1)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        logits = np.asarray(generator.get_output("logits"), dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(logits.reshape(len(ids), -1)))

    def generate(self, ids: Sequence[int], new_tokens: int) -> Generation:
        """Greedy decoding through og.Generator: prefill, then one step per token,
        up to `new_tokens` or the model's end-of-sequence token."""
        generator = self._generator(len(ids) + new_tokens)
        started = time.perf_counter()
        generator.append_tokens(np.asarray(list(ids), dtype=np.int32))
        generator.generate_next_token()  # picks from the prefill's logits
        result = Generation([int(generator.get_next_tokens()[0])], time.perf_counter() - started)
        for _ in range(new_tokens - 1):
            if generator.is_done():  # an end-of-sequence token: og stops there
                break
            started = time.perf_counter()
            generator.generate_next_token()
            result.tokens.append(int(generator.get_next_tokens()[0]))
            result.decode_seconds.append(time.perf_counter() - started)
        return result

    def close(self) -> None:
        self.model = self.tokenizer = None
