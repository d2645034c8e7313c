"""Reading an exported directory safely, and checking it against torch.

`validate_directory` runs before any session is created and reads nothing
but the directory's own files, in this order: model.onnx parses; config.json
and the tokenizer's JSON files parse; only operators factorport writes
(`nodes.check_operators`); every stored tensor holds exactly its size
(`tensors`); every external-data location is a plain file name beside
model.onnx whose byte ranges lie inside that file without overlapping; onnx's
checker, given the model's path so that external data resolves against the
directory, not the current one; then Optimum's inputs/outputs and every
contrib node against config.json and the tensors it reads (`nodes`); last,
genai_config.json where there is one (`genai`).
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import torch

from ...errors import FactorportError
from . import genai, nodes
from .tensors import ExternalTensor, check_stored_tensors, check_tensor, stored_tensors

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.json"
FIX = "re-export it with 'factorport export OUTPUT --format onnx'"
MAX_PROTOBUF = (1 << 31) - 1  # protobuf cannot parse a larger message; bigger models keep weights external
# JSON files an export writes beside the model (config, tokenizer); each must parse as an object.
JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", genai.GENAI_CONFIG)
# A location naming one of these is not an external-data file, whatever its size.
NOT_DATA_SUFFIXES = (".onnx", ".json", ".txt", ".model")


def load_structure(path: Path) -> onnx.ModelProto:
    """The graph without external tensor data (never follows locations)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_PROTOBUF:
            raise FactorportError(f"{path} is {size} bytes, more than an ONNX file can hold; {FIX}")
        data = path.read_bytes()
    except OSError as exc:
        raise FactorportError(f"{path} cannot be read ({exc.strerror}); {FIX}") from exc
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeError, ... by backend
        raise FactorportError(f"{path} is truncated or not an ONNX model ({type(exc).__name__}); {FIX}") from exc
    if not model.HasField("graph") or not len(model.graph.node) or not len(model.graph.output):
        raise FactorportError(f"{path} is truncated (no graph); {FIX}")
    return model


def external_tensors(model: onnx.ModelProto):
    """The external-data record (name, location, offset, length) of every
    externally stored tensor; raises FactorportError on a malformed record."""
    for where, tensor in stored_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield check_tensor(tensor, f"tensor {tensor.name!r} ({where})")


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except OSError as exc:
        raise FactorportError(f"{path} cannot be read ({exc.strerror}); {FIX}") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise FactorportError(f"{path} is not valid JSON ({type(exc).__name__}); {FIX}") from exc
    if not isinstance(value, dict):
        raise FactorportError(f"{path} is not a JSON object; {FIX}")
    return value


def model_shape(directory: Path) -> nodes.ModelShape:
    """config.json's shape facts; every JSON file beside the model must parse."""
    for name in JSON_FILES:
        if (directory / name).exists():
            read_json(directory / name)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FactorportError(f"{directory} has no {CONFIG_FILE}; {FIX}")
    try:
        return nodes.model_shape(read_json(path))
    except FactorportError as exc:
        raise FactorportError(f"{path}: {exc}; {FIX}") from None


def _plain_location(location: str) -> bool:
    """A file name beside model.onnx: no folders, no parent, not a file of another role."""
    return (
        isinstance(location, str)  # protobuf hands undecodable UTF-8 over as bytes
        and bool(location)
        and location.isprintable()
        and not any(c in location for c in "/\\:")
        and location not in (".", "..")
        and not location.lower().endswith(NOT_DATA_SUFFIXES)
    )


def _check_external(directory: Path, externals: list[ExternalTensor]) -> None:
    """Each location a regular file in the directory; ranges inside it, none overlapping."""
    model_path = directory / MODEL_FILE
    by_file: dict[str, list[ExternalTensor]] = {}
    for tensor in externals:
        if not _plain_location(tensor.location):
            raise FactorportError(
                f"{model_path}: tensor {tensor.name!r} has external data at {tensor.location!r}, outside the directory's "
                f"data files (only plain file names beside {MODEL_FILE} are read); refusing to read it; {FIX}"
            )
        by_file.setdefault(tensor.location, []).append(tensor)
    for location, tensors in by_file.items():
        target = directory / location
        if target.is_symlink() or not target.is_file():
            raise FactorportError(f"{model_path}: external data file {location} of tensor {tensors[0].name!r} is missing or not a regular file; {FIX}")
        size = target.stat().st_size
        end, previous = 0, None
        for tensor in sorted(tensors, key=lambda t: (t.offset, t.length)):
            if tensor.offset + tensor.length > size:
                raise FactorportError(f"{target} is truncated (tensor {tensor.name!r} ends at byte {tensor.offset + tensor.length} of {size}); {FIX}")
            if previous is not None and tensor.offset < end:
                raise FactorportError(f"{target}: tensors {previous!r} and {tensor.name!r} overlap (byte {tensor.offset}); {FIX}")
            end, previous = tensor.offset + tensor.length, tensor.name


def _run_checker(path: Path) -> None:
    """onnx's checker on the file itself, so external locations resolve against its directory."""
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # noqa: BLE001 - ValidationError, or the C++ loader's own errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise FactorportError(f"{path} is truncated or invalid ({first}); {FIX}") from exc


def validate_directory(directory: str | Path) -> onnx.ModelProto:
    """The model's structure, after checking the directory is a sound export."""
    directory = Path(directory)
    path = directory / MODEL_FILE
    if not path.is_file():
        raise FactorportError(f"{directory} has no {MODEL_FILE}; export one with 'factorport export OUTPUT --format onnx'")
    model = load_structure(path)
    shape = model_shape(directory)
    try:
        nodes.check_operators(model)
        externals = check_stored_tensors(model)
    except FactorportError as exc:
        raise FactorportError(f"{path}: {exc}; {FIX}") from None
    _check_external(directory, externals)
    _run_checker(path)  # after the locations are known safe; before the walks below, which need a sorted graph
    try:
        nodes.check_inputs_and_outputs(model, shape)
        nodes.check_contrib_nodes(model, shape)
    except FactorportError as exc:
        raise FactorportError(f"{path}: {exc}; {FIX}") from None
    _check_genai(directory, model)
    return model


def _check_genai(directory: Path, model: onnx.ModelProto) -> None:
    """genai_config.json, where there is one, against the graph and config.json."""
    path = directory / genai.GENAI_CONFIG
    if not path.exists():
        return
    generation = directory / "generation_config.json"
    try:
        genai.check_genai_config(read_json(path), read_json(directory / CONFIG_FILE),
                                 read_json(generation) if generation.exists() else {}, model)
    except FactorportError as exc:
        raise FactorportError(f"{directory}: {exc}; {FIX}") from None


@torch.no_grad()
def check_parity(model, directory: Path, accuracy_level: int = 0, tokens: int = 8) -> dict:
    """Logits of a short random sequence, ONNX (at `accuracy_level`) vs the
    torch model: max |diff| relative to max |logit|, and top-1 agreement."""
    from .runtime import DecoderSession

    session = DecoderSession.open(directory, accuracy_level=accuracy_level)
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
