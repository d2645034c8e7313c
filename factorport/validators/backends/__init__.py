"""Runtimes behind one interface.

A backend opens one artifact of a factorport output directory and offers:

* `tokenize(text)` -> token ids, with the runtime's own tokenizer;
* `logits(ids)` -> (len(ids), vocab) float32 logits of one window, scored
  without a cache (for perplexity and parity);
* `generate(ids, new_tokens)` -> `Generation`: greedy continuation with the
  runtime's KV cache, timed (prefill of the prompt, then each decoded token);
* `load_seconds`: how long opening the artifact took;
* `close()`: free the runtime now.

Native runtimes (onnxruntime, llama.cpp) run in a child process by default
(`isolated.py`): a segfault or a hang there becomes a FactorportError here.

`BACKENDS` is the one table of backends: the artifact each one runs (a
sub-directory of the output) and where its class lives, imported only when
used so that a missing runtime breaks only its own backend.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import torch

from ...errors import FactorportError


@dataclass
class Generation:
    tokens: list[int]  # the new tokens only
    prefill_seconds: float  # prompt in, first new token's logits out
    decode_seconds: list[float] = field(default_factory=list)  # one per token after the first

    @property
    def decode_tokens_per_second(self) -> float:
        total = sum(self.decode_seconds)
        return len(self.decode_seconds) / total if total > 0 else float("nan")


class Backend(Protocol):
    name: str
    load_seconds: float

    def tokenize(self, text: str) -> list[int]: ...  # no special tokens

    def text_start(self) -> list[int]: ...  # what the runtime puts before a text: its BOS, when it adds one

    def detokenize(self, ids: Sequence[int]) -> str: ...

    def logits(self, ids: torch.Tensor) -> torch.Tensor: ...

    def generate(self, ids: Sequence[int], new_tokens: int) -> Generation: ...

    def close(self) -> None: ...


def hf_text_start(tokenizer) -> list[int]:
    """The special tokens a transformers tokenizer puts before a text by
    default (Gemma's BOS; none for SmolLM2): models trained with a BOS score
    text without one three times worse (Gemma-3-270M, 4 windows: 326.6 vs 111.5)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return full[:k]
    return []


@dataclass(frozen=True)
class BackendEntry:
    artifact: str  # sub-directory of a factorport output that this backend runs
    cls: str  # "module:Class", imported lazily (in the child process when isolated)
    files: tuple[str, ...] = ()  # the files it loads, named in a crash message when present
    native: bool = True  # native code that may crash the process: isolated by default
    by_default: bool = True  # run by validate/bench when no backend is named


BACKENDS: dict[str, BackendEntry] = {
    "torch": BackendEntry("safetensors", "factorport.validators.backends.torch_backend:TorchBackend", ("model.safetensors",), native=False),
    "onnxruntime": BackendEntry("onnx", "factorport.validators.backends.onnxruntime_backend:OnnxruntimeBackend", ("model.onnx",)),
    "onnxruntime-genai": BackendEntry("onnx", "factorport.validators.backends.genai_backend:GenaiBackend",
                                      ("model.onnx", "genai_config.json"),
                                      by_default=False),  # opt-in (--backend): it runs the onnxruntime backend's graph
    "llama.cpp": BackendEntry("gguf", "factorport.validators.backends.llamacpp_backend:LlamaCppBackend", ("model.gguf", "adapter.gguf")),
}


# Names a user may give beyond BACKENDS: a backend run on another numeric path.
VARIANTS: dict[str, tuple[str, dict]] = {"onnxruntime-int8": ("onnxruntime", {"accuracy_level": 4})}


def resolve(name: str) -> tuple[str, dict]:
    """(backend, options) for a backend or variant name."""
    backend, options = VARIANTS.get(name, (name, {}))
    if backend not in BACKENDS:
        raise FactorportError(f"unknown backend {name!r}; choose from {', '.join([*BACKENDS, *VARIANTS])}")
    return backend, dict(options)


def written_options(name: str, output: str | Path) -> dict:
    """Options an artifact fixes for a backend that cannot change them:
    onnxruntime-genai runs the accuracy_level written in the graph (the
    onnxruntime backend rewrites it in memory, so chooses its own)."""
    model = Path(output) / "onnx" / "model.onnx"
    if name != "onnxruntime-genai" or not model.is_file():
        return {}
    from ...formats.onnx.graph import load_structure
    from ...formats.onnx.runtime import written_accuracy_level

    return {"accuracy_level": written_accuracy_level(load_structure(model))}


def backend_class(name: str):
    if name not in BACKENDS:
        raise FactorportError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].cls.split(":")
    return getattr(importlib.import_module(module), cls)


def available_backends(output: str | Path) -> list[str]:
    """Backends run by default on a factorport output: those whose artifact exists in it."""
    return [name for name, entry in BACKENDS.items() if entry.by_default and (Path(output) / entry.artifact).is_dir()]


def open_backend(name: str, output: str | Path, isolated: bool | None = None, timeout: float | None = None, **options) -> Backend:
    """Open backend `name` on the artifact it runs inside factorport output `output`.
    `options` are the backend's own (threads, accuracy_level, ...). `isolated`
    (default: True for native runtimes, False for torch, the in-process
    reference) runs it in a child process whose every call must answer within
    `timeout` seconds (default `isolated.default_timeout()`)."""
    if name not in BACKENDS:
        raise FactorportError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    entry = BACKENDS[name]
    artifact = Path(output) / entry.artifact
    if not artifact.is_dir():
        raise FactorportError(
            f"{output} has no {entry.artifact}/ artifact for backend {name}; "
            f"write it with 'factorport export {output} --format {entry.artifact}'"
        )
    if entry.native if isolated is None else isolated:
        from .isolated import IsolatedBackend

        return IsolatedBackend.open(name, entry.cls, artifact, options, timeout=timeout, loading=loaded_files(artifact, entry, options))
    return backend_class(name).open(artifact, **options)


def loaded_files(artifact: Path, entry: BackendEntry, options: dict) -> str:
    """What opening `artifact` reads, as a crash message names it: "gguf/model.gguf + gguf/adapter.gguf"."""
    names = [f for f in entry.files if (artifact / f).is_file() and not (f == "adapter.gguf" and options.get("adapter") is False)]
    return " + ".join(f"{artifact.name}/{f}" for f in names) or f"{artifact.name}/"
