"""The one table of readers that are fuzzed: which file of an artifact each
one mutates (with which mutator kind), and how it reads the artifact.

A read takes the artifact's root directory and returns a digest of what was
read (sha256 of the float32 logits of `artifact.TOKEN_IDS`), so that a
mutant that loads can be told apart from the original (identical / changed).
The manifest reader returns the problems `verify_manifest` reports instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .artifact import EXTERNAL_DATA, TOKEN_IDS


@dataclass(frozen=True)
class Target:
    path: str  # relative to the artifact root
    kind: str  # mutator kind (see mutators.KINDS)
    weight: float = 1.0


@dataclass(frozen=True)
class Reader:
    name: str
    targets: tuple[Target, ...]
    read: Callable[[Path], object]
    # file names a clean error may name: the files this reader opens
    files: tuple[str, ...]
    what: str  # one line for --help and the report


def _ids():
    import torch

    return torch.tensor(TOKEN_IDS)


def logits_digest(logits) -> str:
    """sha256 of the logits' shape and exact float32 bytes."""
    import numpy as np
    import torch

    array = np.ascontiguousarray(torch.as_tensor(logits).detach().float().numpy())
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()


def torch_logits_digest(model) -> str:
    import torch

    with torch.no_grad():
        return logits_digest(model(input_ids=_ids().reshape(1, -1), use_cache=False).logits[0])


def read_llamacpp(root: Path) -> str:
    from ..validators.backends import backend_class

    backend = backend_class("llama.cpp").open(Path(root) / "gguf", threads=1)
    try:
        return logits_digest(backend.logits(_ids()))
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()


def read_native_gguf(root: Path) -> str:
    from ..formats.gguf.native import load_native

    model, _ = load_native(Path(root) / "gguf" / "model.factorport.gguf")
    return torch_logits_digest(model)


def read_safetensors(root: Path) -> str:
    from ..formats import safetensors_dir

    model, _ = safetensors_dir.load(Path(root) / "safetensors")
    return torch_logits_digest(model)


def read_onnx(root: Path) -> str:
    from ..validators.backends import backend_class

    backend = backend_class("onnxruntime").open(Path(root) / "onnx", threads=1)
    return logits_digest(backend.logits(_ids()))


def arrays_digest(arrays) -> str:
    """sha256 of named arrays' names, shapes and float32 bytes."""
    import numpy as np

    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(np.asarray(arrays[name], dtype=np.float32))
        digest.update(name.encode() + repr(array.shape).encode() + array.tobytes())
    return digest.hexdigest()


def read_input_sums(root: Path) -> str:
    from ..formats import input_sums

    stats = input_sums.read(Path(root) / input_sums.FILE)
    return arrays_digest({k: v.numpy() for k, v in stats.sums.items()}) + f"/{stats.tokens}/{stats.seq_len}"


def read_imatrix(root: Path) -> str:
    from ..formats.gguf.imatrix import IMATRIX_FILE, read_imatrix as read

    sums, counts, keys = read(Path(root) / "gguf" / IMATRIX_FILE)
    return arrays_digest({**sums, **{f"{k}.counts": v for k, v in counts.items()}}) + repr(sorted(keys.items()))


def read_manifest(root: Path) -> list[str]:
    from ..formats.manifest import verify_manifest

    return list(verify_manifest(Path(root)))


GGUF_FILES = ("model.gguf", "adapter.gguf")
SAFETENSORS_FILES = ("model.safetensors", "config.json", "safetensors")

READERS: dict[str, Reader] = {
    r.name: r
    for r in (
        Reader("gguf-model", (Target("gguf/model.gguf", "gguf"),), read_llamacpp, GGUF_FILES,
               "gguf/model.gguf mutated; llama.cpp backend opens model.gguf + adapter.gguf and scores the ids"),
        Reader("gguf-adapter", (Target("gguf/adapter.gguf", "gguf"),), read_llamacpp, GGUF_FILES,
               "gguf/adapter.gguf mutated; same read as gguf-model"),
        Reader("factorport-gguf", (Target("gguf/model.factorport.gguf", "gguf"),), read_native_gguf, ("model.factorport.gguf",),
               "gguf/model.factorport.gguf mutated; load_native, then logits of the torch model"),
        Reader("safetensors", (Target("safetensors/model.safetensors", "safetensors"),), read_safetensors, SAFETENSORS_FILES,
               "safetensors/model.safetensors mutated; safetensors_dir.load, then logits"),
        Reader("config", (Target("safetensors/config.json", "json"),), read_safetensors, SAFETENSORS_FILES,
               "safetensors/config.json mutated; same read as safetensors"),
        Reader("onnx", (Target("onnx/model.onnx", "onnx", 0.65), Target(f"onnx/{EXTERNAL_DATA}", "bytes", 0.35)), read_onnx,
               ("model.onnx", EXTERNAL_DATA), "onnx/model.onnx or its external data mutated; onnxruntime backend scores the ids"),
        Reader("input-sums", (Target("calibration/input_sums.safetensors", "safetensors"),), read_input_sums, ("input_sums.safetensors",),
               "calibration/input_sums.safetensors mutated; input_sums.read"),
        Reader("imatrix", (Target("gguf/imatrix.gguf", "gguf"),), read_imatrix, ("imatrix.gguf",),
               "gguf/imatrix.gguf mutated; read_imatrix (the check before llama-quantize reads it)"),
        Reader("manifest", (Target("manifest.json", "json"),), read_manifest, ("manifest.json",),
               "manifest.json mutated; verify_manifest (problems reported = caught)"),
    )
}


def prepare() -> None:
    """Import everything a read needs, once, in the fork server: each child
    then starts with the modules loaded. Imports only; nothing is computed."""
    import gguf  # noqa: F401
    import llama_cpp  # noqa: F401
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers
    from transformers.models.llama import configuration_llama, modeling_llama  # noqa: F401

    for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "LlamaForCausalLM", "LlamaConfig"):
        getattr(transformers, name)  # transformers resolves these lazily on first access

    from ..formats import manifest, safetensors_dir  # noqa: F401
    from ..formats.gguf import checks, native  # noqa: F401
    from ..formats.onnx import runtime  # noqa: F401
    from ..validators.backends import llamacpp_backend, onnxruntime_backend  # noqa: F401
