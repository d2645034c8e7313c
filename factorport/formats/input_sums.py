"""`calibration/input_sums.safetensors`: for every linear the calibration
saw, the sum over all calibration tokens of each input column's square (the
diagonal of XᵀX), and how many tokens that was. It is what llama.cpp calls
an importance matrix: the GGUF export writes it as `gguf/imatrix.gguf` for
`llama-quantize --imatrix` (docs/FORMAT.md, "Calibration statistics").

One float32 vector per linear, named as in the model (`model.layers.3.mlp.up_proj`,
`lm_head`); the header's metadata holds the token count, the tokens per
calibration sequence and the text they came from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FactorportError
from .safetensors_dir import parse_json, read_file_tensors, read_header, write_file

FILE = "calibration/input_sums.safetensors"
METADATA_KEY = "factorport_input_sums"


@dataclass
class InputSums:
    sums: dict[str, torch.Tensor]  # linear name -> (in_features,) float32, Σ over tokens of x²
    tokens: int  # calibration tokens each sum is over
    seq_len: int  # tokens per calibration sequence
    source: str  # the calibration text, as the convert report describes it


def write(path: Path, stats: InputSums) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"tokens": stats.tokens, "seq_len": stats.seq_len, "source": stats.source}
    write_file(path, {k: v.float().contiguous() for k, v in stats.sums.items()}, {"format": "pt", METADATA_KEY: json.dumps(info)})


def read(path: Path) -> InputSums:
    """The file, checked: every tensor a finite, non-negative float32 vector; a positive token count."""
    fix = "convert the model again"
    entries, metadata = read_header(path)
    info = parse_json(metadata.get(METADATA_KEY, ""), path, "the input sums record", fix)
    if not isinstance(info, dict) or set(info) != {"tokens", "seq_len", "source"}:
        raise FactorportError(f"{path}: not factorport's calibration input sums; {fix}")
    for key in ("tokens", "seq_len"):
        if type(info[key]) is not int or info[key] < 1:
            raise FactorportError(f"{path}: {key} is {info[key]!r}, expected a positive integer; {fix}")
    for name, entry in entries.items():
        if entry.dtype != "F32" or len(entry.shape) != 1:
            raise FactorportError(f"{path}: {name} is {entry.dtype} {list(entry.shape)}, expected a float32 vector; {fix}")
    sums = read_file_tensors(path)
    for name, values in sums.items():
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise FactorportError(f"{path}: {name} holds negative or non-finite sums of squares; {fix}")
    return InputSums(sums, info["tokens"], info["seq_len"], str(info["source"]))

