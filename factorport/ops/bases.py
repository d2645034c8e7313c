"""The `base` slot of a compressed linear: dense, quantized or block-sparse.

Every base stores its tensors as buffers (so `state_dict` is the on-disk
layout), computes `x @ W.T` in `forward`, and can rebuild its dense weight
(`to_dense()`) or a few rows of it (`rows(ids)`, used by tied embeddings).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quant import QuantSpec, dequantize, quantize_rtn, unpack, decode


class DenseBase(nn.Module):
    kind = "dense"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach())
        self.out_features, self.in_features = weight.shape

    def to_dense(self) -> torch.Tensor:
        return self.weight.float()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float()

    def num_params(self) -> int:
        return self.weight.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def spec(self) -> dict:
        return {"kind": self.kind, "dtype": str(self.weight.dtype).removeprefix("torch.")}


class QuantizedBase(nn.Module):
    """Group-quantized weight; see `ops.quant` for the grid and packing."""

    kind = "quantized"

    def __init__(
        self,
        codes: torch.Tensor,
        scale: torch.Tensor,
        minimum: torch.Tensor | None,
        qspec: QuantSpec,
        in_features: int,
    ) -> None:
        super().__init__()
        self.qspec = qspec
        self.in_features = in_features
        self.out_features = codes.shape[0]
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("minimum", minimum)

    def num_params(self) -> int:
        return self.out_features * self.in_features

    @classmethod
    def from_weight(cls, weight: torch.Tensor, qspec: QuantSpec) -> "QuantizedBase":
        codes, scale, minimum = quantize_rtn(weight, qspec)
        return cls(codes, scale, minimum, qspec, weight.shape[1])

    def to_dense(self) -> torch.Tensor:
        return dequantize(self.codes, self.qspec, self.scale, self.minimum)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes = unpack(self.codes[flat], self.qspec.bits)
        g = codes.reshape(flat.numel(), -1, self.qspec.group_size)
        minimum = None if self.minimum is None else self.minimum[flat]
        w = decode(g, self.qspec, self.scale[flat], minimum).reshape(flat.numel(), -1)
        return w.reshape(*ids.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.to_dense().to(x.dtype))

    def spec(self) -> dict:
        q = self.qspec
        return {"kind": self.kind, "bits": q.bits, "group_size": q.group_size, "symmetric": q.symmetric}


class BlockSparseBase(nn.Module):
    """Blocks of shape (block_rows, block_cols); every block-row keeps the same
    number of blocks. `indices[r]` lists the kept block columns of block-row r
    (ascending); `values` is a dense or quantized base over the compact matrix
    (out, kept * block_cols) whose row i holds, side by side, the kept blocks of
    row i."""

    kind = "block_sparse"

    def __init__(
        self,
        indices: torch.Tensor,
        values: DenseBase | QuantizedBase,
        block_shape: tuple[int, int],
        in_features: int,
    ) -> None:
        super().__init__()
        self.block_shape = tuple(block_shape)
        self.in_features = in_features
        self.out_features = values.out_features
        self.register_buffer("indices", indices.to(torch.int32))
        self.values = values

    @property
    def density(self) -> float:
        return self.indices.shape[1] * self.block_shape[1] / self.in_features

    def _column_index(self) -> torch.Tensor:
        """Input column of every compact column, per block-row: (block_rows_count, kept*bc)."""
        bc = self.block_shape[1]
        cols = self.indices.long().unsqueeze(-1) * bc + torch.arange(bc, device=self.indices.device)
        return cols.flatten(1)

    def to_dense(self) -> torch.Tensor:
        br = self.block_shape[0]
        compact = self.values.to_dense()
        cols = self._column_index().repeat_interleave(br, dim=0)
        dense = torch.zeros(self.out_features, self.in_features, dtype=compact.dtype, device=compact.device)
        return dense.scatter_(1, cols, compact)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.to_dense()[ids]

    def num_params(self) -> int:
        return self.values.num_params()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The torch reference rebuilds the dense weight: gathering input blocks
        # per block-row costs tokens x rows x kept memory with 1-row blocks.
        # Runtimes that gain from sparsity (the ONNX export) compute the gathered form.
        return F.linear(x, self.to_dense().to(x.dtype))

    def spec(self) -> dict:
        return {
            "kind": self.kind,
            "block_shape": list(self.block_shape),
            "blocks_per_row": int(self.indices.shape[1]),
            "density": self.density,
            "values": self.values.spec(),
        }


Base = DenseBase | QuantizedBase | BlockSparseBase
