"""Reading an exported directory safely, and checking it against torch.

`validate_directory` runs before any session is created: the model file must
exist and parse, and every external-data location must resolve to a file
inside the directory that is long enough — a location pointing elsewhere is
refused before anything is read from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import torch
from google.protobuf.message import DecodeError

from ...errors import FactorportError

MODEL_FILE = "model.onnx"


def load_structure(path: Path) -> onnx.ModelProto:
    """The graph without external tensor data (never follows locations)."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeError) as exc:
        raise FactorportError(f"{path} is truncated or not an ONNX model ({type(exc).__name__}); re-export it") from exc


def external_tensors(model: onnx.ModelProto):
    """(tensor name, location, offset, length) of every externally stored initializer."""
    tensors = list(model.graph.initializer)
    for node in model.graph.node:  # constants can be external too
        tensors.extend(a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        yield tensor.name, info.get("location", ""), int(info.get("offset", 0)), int(info.get("length", -1))


def _check_external(directory: Path, model: onnx.ModelProto) -> None:
    root = directory.resolve()
    for name, location, offset, length in external_tensors(model):
        target = (root / location).resolve()
        if os.path.isabs(location) or (target != root and root not in target.parents):
            raise FactorportError(
                f"{directory / MODEL_FILE}: tensor {name!r} points outside the directory ({location}); refusing to read it"
            )
        if not target.is_file():
            raise FactorportError(f"{directory / MODEL_FILE}: external data file {location} of tensor {name!r} is missing; re-export")
        if length >= 0 and offset + length > target.stat().st_size:
            raise FactorportError(f"{target} is truncated (tensor {name!r} ends past the file); re-export")


def validate_directory(directory: str | Path) -> onnx.ModelProto:
    """The model's structure, after checking the directory is a sound export."""
    directory = Path(directory)
    path = directory / MODEL_FILE
    if not path.is_file():
        raise FactorportError(f"{directory} has no {MODEL_FILE}; export one with 'factorport export OUTPUT --format onnx'")
    model = load_structure(path)
    if not len(model.graph.node) or not len(model.graph.output):
        raise FactorportError(f"{path} is truncated (no graph); re-export it")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise FactorportError(f"{path} is truncated or invalid ({first}); re-export it") from exc
    _check_external(directory, model)
    return model


@torch.no_grad()
def check_parity(model, directory: Path, tokens: int = 8) -> dict:
    """Logits of a short random sequence, ONNX vs the torch model: max |diff|
    relative to max |logit|, and top-1 agreement."""
    from .runtime import DecoderSession

    session = DecoderSession.open(directory)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (tokens,), generator=generator)
    expected = model(input_ids=ids.reshape(1, -1), use_cache=False).logits[0].float()
    got = session.logits(ids)
    scale = float(expected.abs().max())
    return {
        "tokens": tokens,
        "max_abs_diff": float((got - expected).abs().max()),
        "relative": float((got - expected).abs().max()) / scale if scale else 0.0,
        "top1_agreement": float((got.argmax(-1) == expected.argmax(-1)).float().mean()),
    }
