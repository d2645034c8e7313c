"""Bases -> ggml blocks.

Lossless where factorport's grid *is* a ggml block type (groups of 32, fp16
scale/minimum): symmetric int4 -> Q4_0, asymmetric int4 -> Q4_1, symmetric
int8 -> Q8_0; the codes are only re-packed. A `GGMLBase` (llama.cpp's own
quantization) is copied byte for byte. Everything else is re-quantized from
its dense weight to the type the user names.
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import FactorportError
from ...ops import QuantizedBase
from ...llamacpp.quantize import FTYPES
from ...ops.ggml import GGMLBase, ggml_type
from ...ops.quant import unpack

GGML_BLOCK = 32  # values per block of Q4_0 / Q4_1 / Q8_0
# (bits, symmetric) -> the ggml type with the same grid at group size 32
LOSSLESS = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}
# Types the gguf package encodes in numpy; the K / IQ mixes go through llama.cpp's quantizer.
NUMPY_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
DEFAULT_TYPE = "F16"


def check_type(name: str | None) -> str:
    """The --gguf-type value, validated (before any work)."""
    if name is None:
        return DEFAULT_TYPE
    if name not in FTYPES:
        raise FactorportError(f"unknown --gguf-type {name!r}; choose one of {', '.join(FTYPES)}")
    return name


def lossless_type(base) -> str | None:
    """The ggml type that stores `base` exactly, or None."""
    if isinstance(base, GGMLBase):
        return base.type_name
    if isinstance(base, QuantizedBase) and base.qspec.group_size == GGML_BLOCK:
        return LOSSLESS.get((base.qspec.bits, base.qspec.symmetric))
    return None


def _fp16_bytes(t: torch.Tensor) -> np.ndarray:
    """(rows, groups) float16 -> (rows, groups, 2) bytes."""
    return t.detach().to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*t.shape, 2)


def lossless_blocks(base) -> tuple[str, np.ndarray]:
    """(ggml type, blocks (out, row_bytes) uint8) holding exactly `base`'s weight."""
    type_name = lossless_type(base)
    if type_name is None:
        raise ValueError("base has no lossless ggml type")
    if isinstance(base, GGMLBase):
        return type_name, base.blocks.numpy()
    rows = base.out_features
    codes = unpack(base.codes.detach(), base.qspec.bits).numpy().reshape(rows, -1, GGML_BLOCK)
    scale = _fp16_bytes(base.scale)
    if type_name == "Q8_0":
        parts = [scale, codes.astype(np.int8).view(np.uint8)]
    else:
        # ggml packs value j with value j+16 of a block (ours: 2j with 2j+1)
        half = GGML_BLOCK // 2
        nibbles = (codes[..., :half] | (codes[..., half:] << 4)).astype(np.uint8)
        parts = [scale] + ([_fp16_bytes(base.minimum)] if type_name == "Q4_1" else []) + [nibbles]
    return type_name, np.concatenate(parts, axis=-1).reshape(rows, -1)


def encode(weight: np.ndarray, type_name: str) -> np.ndarray:
    """A float32 weight (rows, cols) in a numpy-encodable ggml type: float
    arrays for F32/F16, raw blocks (rows, row_bytes) otherwise."""
    import gguf

    if type_name == "F32":
        return weight.astype(np.float32)
    if type_name == "F16":
        return weight.astype(np.float16)
    block = gguf.GGML_QUANT_SIZES[ggml_type(type_name)][0]
    if weight.shape[-1] % block:
        raise FactorportError(f"--gguf-type {type_name} needs rows of a multiple of {block} values, got {weight.shape[-1]}; pick F16 or another type")
    return gguf.quants.quantize(weight.astype(np.float32), ggml_type(type_name))


def decode(data: np.ndarray, type_name: str) -> np.ndarray:
    import gguf

    if data.dtype != np.uint8:
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, ggml_type(type_name)).astype(np.float32)
