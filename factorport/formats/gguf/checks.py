"""Checks run before a GGUF file reaches gguf's reader or llama.cpp, which
may allocate without bound, abort or crash on a malformed file instead of
returning an error.

Every file first goes through `structure.parse` (bounded: header, key/values,
tensor infos, data ranges); only then is a gguf.GGUFReader built on it. The
files handed to llama.cpp additionally pass `llamacpp_rules` (model
hyper-parameters, tensor shapes and types; adapter pairs and shapes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import FactorportError
from . import llamacpp_rules, structure


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError, TypeError) as exc:  # after parse(): not expected
        raise FactorportError(f"{path} is not a readable GGUF file ({str(exc).splitlines()[0][:80]}); re-export it") from exc


def open_gguf(path: Path):
    """A gguf.GGUFReader on `path`, or a one-line error if the file is
    missing, not GGUF, truncated or structurally malformed."""
    path = Path(path)
    structure.parse(path)
    return _reader(path)


def check_model(path: Path):
    """A gguf.GGUFReader on a model.gguf that llama.cpp can load and run
    without asserting: structure, hyper-parameters, every tensor's shape and type."""
    path = Path(path)
    llamacpp_rules.check_model(structure.parse(path))
    return _reader(path)


def _model_dims(model_reader) -> dict[str, tuple[int, ...]]:
    """{name: ggml-order dims} (Python ints) of the model's tensors."""
    return {t.name: tuple(int(d) for d in t.shape.tolist()) for t in model_reader.tensors}


def _field_string(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    try:
        return None if field is None else str(field.contents())
    except (ValueError, IndexError, TypeError, UnicodeDecodeError):
        return None


def tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
    """{name: numpy-order shape (rows, cols)} of every tensor."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


def check_adapter(model_reader, adapter_path: Path):
    """Refuse an adapter llama.cpp would not load for this model (wrong type
    or architecture, a lora_a without its lora_b, a tensor the model lacks,
    shapes that do not fit the weight: A (r, in), B (out, r), types other
    than F32/F16, any structural fault); returns its gguf.GGUFReader."""
    adapter_path = Path(adapter_path)
    layout = structure.parse(adapter_path)
    model_arch = _field_string(model_reader, "general.architecture") or ""
    llamacpp_rules.check_adapter(layout, _model_dims(model_reader), model_arch)
    return _reader(adapter_path)


def tensor_data(reader, name: str) -> tuple[str, np.ndarray]:
    for t in reader.tensors:
        if t.name == name:
            return t.tensor_type.name, np.array(t.data)
    raise KeyError(name)
