"""llama.cpp's own quantization grids (ggml block types) as a base.

`GGMLBase` holds a weight exactly as llama.cpp stores it: raw ggml blocks,
one row of blocks per output row, in any ggml type (Q4_K, Q5_0, IQ4_NL, ...).
It decodes with the gguf package's reference decoders, so the torch model
computes with the very weights llama.cpp reads, and an exporter can copy the
bytes into a GGUF file unchanged. (llama.cpp's quantizer, which fills such
bases, is `factorport.llamacpp.quantize`.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def ggml_type(name: str):
    """The gguf.GGMLQuantizationType of a ggml type name (e.g. "Q4_K")."""
    import gguf

    return gguf.GGMLQuantizationType[name]


def dequantize_blocks(blocks: np.ndarray, type_name: str) -> np.ndarray:
    """float32 (rows, in) from raw blocks (rows, row_bytes) of a ggml type."""
    import gguf

    return gguf.quants.dequantize(np.ascontiguousarray(blocks), ggml_type(type_name)).astype(np.float32)


def row_bytes(in_features: int, type_name: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[ggml_type(type_name)]
    if in_features % block:
        raise ValueError(f"ggml type {type_name} needs rows of a multiple of {block} values, got {in_features}")
    return in_features // block * size


class GGMLBase(nn.Module):
    """A weight in raw ggml blocks of type `ggml_type` (uint8, (out, row_bytes))."""

    kind = "ggml"

    def __init__(self, blocks: torch.Tensor, type_name: str, in_features: int) -> None:
        super().__init__()
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row_bytes(in_features, type_name):
            raise ValueError(f"{type_name} blocks of shape {tuple(blocks.shape)} do not hold rows of {in_features} values")
        self.type_name = type_name
        self.in_features = in_features
        self.out_features = blocks.shape[0]
        self.register_buffer("blocks", blocks)
        self._dense: torch.Tensor | None = None  # decoded once: the reference decoders are slow

    def to_dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = torch.from_numpy(dequantize_blocks(self.blocks.numpy(), self.type_name))
        return self._dense

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.to_dense()[ids]

    def num_params(self) -> int:
        return self.out_features * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.to_dense().to(x.dtype))

    def spec(self) -> dict:
        return {"kind": self.kind, "type": self.type_name}
