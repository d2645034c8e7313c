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
from ..layout import describe, rebuild
from ..safetensors_dir import _is_tied_alias, _skeleton, state_tensors

NATIVE_FILE = "model.factorport.gguf"
SIDE_SUFFIXES = (".json", ".jinja", ".txt")
ARCH = "factorport"
# torch dtype -> (the dtype whose bits GGUF stores, its name)
_STORED_AS = {torch.uint8: torch.int8, torch.bfloat16: torch.int16}


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


def _string(reader, key: str) -> str:
    field = reader.fields.get(key)
    if field is None:
        raise FactorportError(f"{key} is missing; the file is not a factorport GGUF, re-export it")
    return field.contents()


def load_native(path: str | Path):
    """(model, tokenizer) from a model.factorport.gguf."""
    from transformers import AutoTokenizer

    from .checks import open_gguf

    path = Path(path)
    reader = open_gguf(path)
    arch = reader.fields.get("general.architecture")
    if arch is None or arch.contents() != ARCH:
        raise FactorportError(f"{path} is not factorport's GGUF layout (architecture is not '{ARCH}'); load it with llama.cpp")
    meta = json.loads(_string(reader, "factorport.layout"))
    dtypes = json.loads(_string(reader, "factorport.dtypes"))
    tensors = {}
    for t in reader.tensors:
        dtype = getattr(torch, dtypes.get(t.name, ""), None)
        if dtype is None:
            raise FactorportError(f"{path}: tensor {t.name} has no recorded dtype; the file is corrupted")
        data = torch.from_numpy(np.array(t.data))
        tensors[t.name] = data.view(dtype) if dtype in _STORED_AS else data.to(dtype)
    with tempfile.TemporaryDirectory(prefix="factorport-gguf-") as tmp:
        (Path(tmp) / "config.json").write_text(_string(reader, "factorport.config"))
        for name, text in json.loads(_string(reader, "factorport.files")).items():
            (Path(tmp) / Path(name).name).write_text(text)
        model = _skeleton(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp) if (Path(tmp) / "tokenizer_config.json").exists() else None
    rebuild(model, meta, tensors)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not _is_tied_alias(model, k)]
    if missing or result.unexpected_keys:
        raise FactorportError(f"{path}: tensor '{(missing or result.unexpected_keys)[0]}' does not match the layout; re-export it")
    if not meta.get("tied_embeddings") and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval(), tokenizer
