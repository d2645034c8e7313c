"""Checks run before a GGUF file reaches llama.cpp, which may abort the
whole process on a malformed file instead of returning an error."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import FactorportError


def open_gguf(path: Path):
    """A gguf.GGUFReader on `path`, or a one-line error if the file is
    missing, not GGUF, or shorter than its tensors say (truncated)."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FactorportError(f"{path} does not exist; export the model with '--format gguf'")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, OSError, KeyError, TypeError) as exc:
        raise FactorportError(f"{path} is not a readable GGUF file (truncated or corrupted: {str(exc).splitlines()[0][:80]}); re-export it") from exc
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise FactorportError(f"{path} is truncated (tensor {t.name} ends past the end of the file); re-export it")
    return reader


def tensor_shapes(reader) -> dict[str, tuple[int, ...]]:
    """{name: numpy-order shape (rows, cols)} of every tensor."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


def check_adapter(model_reader, adapter_path: Path):
    """Refuse an adapter that is not a LoRA for this model: wrong type or
    architecture, a tensor the model lacks, or lora_a/lora_b shapes that do
    not fit the weight (A: (r, in), B: (out, r))."""
    adapter = open_gguf(adapter_path)
    kind = adapter.fields.get("general.type")
    if kind is None or kind.contents() != "adapter":
        raise FactorportError(f"{adapter_path} is not a GGUF adapter (general.type is not 'adapter'); re-export it")
    arch, model_arch = adapter.fields.get("general.architecture"), model_reader.fields.get("general.architecture")
    if arch is None or model_arch is None or arch.contents() != model_arch.contents():
        raise FactorportError(f"{adapter_path} was made for another architecture than the model; export both together")
    weights = tensor_shapes(model_reader)
    lora = tensor_shapes(adapter)
    for name, shape_a in lora.items():
        if not name.endswith(".lora_a"):
            continue
        target = name.removesuffix(".lora_a")
        shape_b = lora.get(f"{target}.lora_b")
        weight = weights.get(target)
        if weight is None or shape_b is None or len(weight) != 2:
            raise FactorportError(f"{adapter_path}: {target} has no matching model weight or lora_b; the adapter belongs to another model")
        out_f, in_f = weight
        if shape_a[1] != in_f or shape_b[0] != out_f or shape_a[0] != shape_b[1]:
            raise FactorportError(
                f"{adapter_path}: {target} LoRA shapes A{shape_a} B{shape_b} do not fit the weight ({out_f}, {in_f}); "
                "the adapter belongs to another model"
            )
    return adapter


def tensor_data(reader, name: str) -> tuple[str, np.ndarray]:
    for t in reader.tensors:
        if t.name == name:
            return t.tensor_type.name, np.array(t.data)
    raise KeyError(name)
