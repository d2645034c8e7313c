"""`model.factorport.gguf`: factorport's own GGUF layout.

The same tensors, under the same names, as the safetensors layout
(docs/FORMAT.md): factorized and shared tensors stay factorized, quantized
codes stay codes. `general.architecture` is "factorport", so stock llama.cpp
refuses it (and `factorport.llama_cpp_runnable` says so); factorport loads it
back to logits bit-exact with the safetensors artifact.

GGUF has no unsigned or bfloat16 element types, so uint8 tensors are stored
as I8 and bfloat16 as I16 (same bits); `factorport.dtypes` records each
tensor's real dtype. Keys:

    factorport.layout          the layout JSON (as in the safetensors header)
    factorport.dtypes          {tensor: torch dtype name}
    factorport.config          the Hugging Face config.json
    factorport.files           {file name: text} of generation config and tokenizer files
    factorport.llama_cpp_runnable  false
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ...errors import FactorportError
from ..layout import DTYPE_CODES, describe
from ..safetensors_dir import CONFIG, TensorEntry, _skeleton, _tokenizer, attach, parse_json, state_tensors

NATIVE_FILE = "model.factorport.gguf"
SIDE_SUFFIXES = (".json", ".jinja", ".txt")
ARCH = "factorport"
# torch dtype -> (the dtype whose bits GGUF stores, its name)
_STORED_AS = {torch.uint8: torch.int8, torch.bfloat16: torch.int16}
# GGUF element type -> the dtypes `factorport.dtypes` may record for it
_HOLDS = {
    "F32": ("float32",), "F16": ("float16",), "F64": ("float64",),
    "I8": ("int8", "uint8"), "I16": ("int16", "bfloat16"), "I32": ("int32",), "I64": ("int64",),
}


def write_native(path: Path, model, tokenizer) -> None:
    import gguf

    writer = gguf.GGUFWriter(path, arch=ARCH)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_string("factorport.layout", json.dumps(describe(model)))
    writer.add_string("factorport.config", model.config.to_json_string())
    writer.add_bool("factorport.llama_cpp_runnable", False)
    writer.add_string("factorport.files", json.dumps(_side_files(model, tokenizer)))
    dtypes = {}
    for name, t in state_tensors(model).items():
        dtypes[name] = str(t.dtype).removeprefix("torch.")
        stored = t.view(_STORED_AS[t.dtype]) if t.dtype in _STORED_AS else t
        writer.add_tensor(name, stored.contiguous().numpy())
    writer.add_string("factorport.dtypes", json.dumps(dtypes))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _side_files(model, tokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="factorport-side-") as tmp:
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # text files only: tokenizer.json carries a fast tokenizer; a tokenizer
        # loaded from a GGUF also copies that GGUF, which is not needed again
        return {p.name: p.read_text() for p in Path(tmp).iterdir() if p.is_file() and p.suffix in SIDE_SUFFIXES}


def _text(reader, key: str, path: Path) -> str:
    """A string key, or a one-line error (missing, another type, not UTF-8)."""
    import gguf

    field = reader.fields.get(key)
    if field is None:
        raise FactorportError(f"{path}: {key} is missing; the file is not a factorport GGUF, re-export it")
    if list(field.types) != [gguf.GGUFValueType.STRING]:
        raise FactorportError(f"{path}: {key} is not a string; the file is corrupted, re-export it")
    try:
        return field.contents()
    except UnicodeDecodeError:
        raise FactorportError(f"{path}: {key} is not UTF-8 text; the file is corrupted, re-export it") from None


def _json(reader, key: str, path: Path) -> dict:
    value = parse_json(_text(reader, key, path), path, key, "re-export it")
    if not isinstance(value, dict):
        raise FactorportError(f"{path}: {key} is not a JSON object; re-export it")
    return value


def _tensor_table(reader, dtypes: dict, path: Path) -> dict[str, TensorEntry]:
    """{tensor: (real dtype, shape)}: each GGUF type must hold the dtype
    `factorport.dtypes` records (a swapped type would reinterpret the bits),
    and no two tensors may share bytes."""
    table, spans = {}, []
    for t in reader.tensors:
        stored, dtype = t.tensor_type.name, dtypes.get(t.name)
        if t.name in table or dtype not in _HOLDS.get(stored, ()):
            raise FactorportError(f"{path}: tensor {t.name} is stored as {stored}, factorport.dtypes says {str(dtype)[:20]}; the file is corrupted, re-export it")
        table[t.name] = TensorEntry(DTYPE_CODES[dtype], tuple(int(d) for d in reversed(t.shape.tolist())))
        spans.append((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name))
    unknown = sorted(set(dtypes) - set(table))
    if unknown:
        raise FactorportError(f"{path}: factorport.dtypes names tensor {unknown[0][:80]}, which the file lacks; re-export it")
    end = 0
    for begin, stop, name in sorted(spans):
        if begin < end:
            raise FactorportError(f"{path}: tensor {name} overlaps the tensor before it; the file is corrupted, re-export it")
        end = stop
    return table


def _side_file_names(files: dict, path: Path) -> None:
    """factorport.files holds plain file names of text side files only."""
    for name, text in files.items():
        plain = name == Path(name).name and name not in ("", ".", "..", CONFIG) and Path(name).suffix in SIDE_SUFFIXES
        if not plain or not isinstance(text, str):
            raise FactorportError(f"{path}: factorport.files entry {name[:80]!r} is not a side file factorport writes; re-export it")


def load_native(path: str | Path):
    """(model, tokenizer) from a model.factorport.gguf, checked as the
    safetensors directory is (docs/FORMAT.md, "What a reader checks")."""
    from .checks import open_gguf

    path = Path(path)
    reader = open_gguf(path)
    if "general.architecture" not in reader.fields or _text(reader, "general.architecture", path) != ARCH:
        raise FactorportError(f"{path} is not factorport's GGUF layout (architecture is not '{ARCH}'); load it with llama.cpp")
    meta = _json(reader, "factorport.layout", path)
    dtypes = _json(reader, "factorport.dtypes", path)
    config = _json(reader, "factorport.config", path)
    files = _json(reader, "factorport.files", path)
    _side_file_names(files, path)
    table = _tensor_table(reader, dtypes, path)
    with tempfile.TemporaryDirectory(prefix="factorport-gguf-") as tmp:
        (Path(tmp) / CONFIG).write_text(json.dumps(config))
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        model = _skeleton(Path(tmp), meta, table, str(path), config_source=f"{path}: factorport.config")
        tokenizer = _tokenizer(Path(tmp), str(path))
    tensors = {}
    for t in reader.tensors:
        data = torch.from_numpy(np.array(t.data))
        dtype = getattr(torch, dtypes[t.name])
        tensors[t.name] = data.view(dtype) if dtype in _STORED_AS else data
    attach(model, meta, tensors, str(path))
    return model.eval(), tokenizer
