"""Block-sparse bases as ONNX subgraphs whose work scales with the kept blocks.

Two forms, chosen by what the kept values are:

* quantized values whose groups do not straddle blocks -> **column tiles**:
  the input is split into its blocks of `block_cols`; for each input block j,
  the rows that kept j form one MatMulNBits over their (compact, still int4/
  int8) codes for that block. The partial products are concatenated, put in
  (row, kept) order by one Gather and summed. Bytes read per token are the
  kept codes only — decode is bound by bytes, so this is what can beat the
  densified int4 matrix.
* otherwise (dense values, or groups wider than a block) -> **gathered
  blocks**: gather the input blocks each block-row needs (one Gather with a
  (block_rows_count, kept*block_cols) index), one batched MatMul against the
  compact float32 weight (block_rows_count, kept*block_cols, block_rows), and
  the reduction happens inside the MatMul.

`densify` writes the same weight as one dense operator instead (int4/int8
MatMulNBits with zero codes where blocks were dropped, when the values are
quantized with groups inside blocks; float32 otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...ops import BlockSparseBase, QuantizedBase
from ...ops.quant import unpack
from . import nbits


def _column_index(base: BlockSparseBase) -> torch.Tensor:
    """Input column of every compact column, per block-row: (R, kept*bc) int64."""
    bc = base.block_shape[1]
    cols = base.indices.long().unsqueeze(-1) * bc + torch.arange(bc)
    return cols.flatten(1)


def tiles_apply(base: BlockSparseBase) -> bool:
    """Column tiles need quantized values on a MatMulNBits grid whose groups
    stay inside one block."""
    values = base.values
    return (
        isinstance(values, QuantizedBase)
        and values.qspec.symmetric
        and base.block_shape[1] % values.qspec.group_size == 0
    )


class GatheredBlocks(nn.Module):
    """Gather each block-row's input blocks, one batched MatMul (float32)."""

    def __init__(self, base: BlockSparseBase) -> None:
        super().__init__()
        br = base.block_shape[0]
        rows_count = base.out_features // br
        compact = base.values.to_dense()  # (out, kept*bc)
        self.out_features = base.out_features
        self.register_buffer("columns", _column_index(base))
        # (R, br, K') -> (R, K', br): x_g (.., R, 1, K') @ w -> (.., R, 1, br)
        self.register_buffer("weight", compact.reshape(rows_count, br, -1).transpose(1, 2).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gathered = x[..., self.columns].unsqueeze(-2)  # (.., R, 1, K')
        y = torch.matmul(gathered, self.weight.to(x.dtype))  # (.., R, 1, br)
        return y.reshape(*x.shape[:-1], self.out_features)


@dataclass(frozen=True)
class TilesShape:
    """Non-tensor facts of a column-tiled base (what tracing passes as attributes)."""

    block_cols: int
    n_input_blocks: int
    tile_blocks: tuple[int, ...]  # input block of each tile
    tiles: tuple[nbits.NBitsShape, ...]
    out_features: int
    kept: int


class ColumnTilesFunction(torch.autograd.Function):
    """One traced node per linear; its symbolic emits the whole subgraph
    (tracing thousands of small MatMulNBits one by one takes minutes)."""

    @staticmethod
    def forward(ctx, x, shape: TilesShape, order, *weights):
        blocks = torch.split(x, shape.block_cols, dim=-1)
        parts = []
        for t, (j, tile) in enumerate(zip(shape.tile_blocks, shape.tiles)):
            w = nbits.dequantize(weights[2 * t], weights[2 * t + 1], None, tile)
            parts.append(blocks[j] @ w.to(x.dtype).T)
        stacked = torch.cat(parts, dim=-1)[..., order]
        return stacked.reshape(*x.shape[:-1], shape.out_features, shape.kept).sum(-1)

    @staticmethod
    def symbolic(g, x, shape: TilesShape, order, *weights):
        sizes = g.op("Constant", value_t=torch.full((shape.n_input_blocks,), shape.block_cols, dtype=torch.int64))
        blocks = g.op("Split", x, sizes, axis_i=-1, outputs=shape.n_input_blocks)
        parts = []
        for t, (j, tile) in enumerate(zip(shape.tile_blocks, shape.tiles)):
            parts.append(
                g.op(
                    f"{nbits.MS_DOMAIN}::MatMulNBits",
                    blocks[j],
                    weights[2 * t],
                    weights[2 * t + 1],
                    K_i=tile.in_features,
                    N_i=tile.out_features,
                    bits_i=tile.bits,
                    block_size_i=tile.block_size,
                    accuracy_level_i=0,
                )
            )
        stacked = g.op("Gather", g.op("Concat", *parts, axis_i=-1), order, axis_i=-1)
        target = g.op("Constant", value_t=torch.tensor([0, 0, shape.out_features, shape.kept], dtype=torch.int64))
        axes = g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64))
        out = g.op("ReduceSum", g.op("Reshape", stacked, target), axes, keepdims_i=0)
        return nbits._typed(out, x, shape.out_features)


class ColumnTiles(nn.Module):
    """Per input block, one MatMulNBits over the rows that kept that block."""

    def __init__(self, base: BlockSparseBase) -> None:
        super().__init__()
        values: QuantizedBase = base.values
        spec = values.qspec
        if not spec.symmetric:
            raise ValueError("column tiles take symmetric codes (no zero points)")
        br, bc = base.block_shape
        kept = base.indices.shape[1]
        groups_per_block = bc // spec.group_size
        codes = unpack(values.codes, spec.bits)  # (out, kept*bc)
        out = base.out_features
        block_of = base.indices.long().repeat_interleave(br, dim=0)  # (out, kept): input block of each kept block
        position = torch.empty(out, kept, dtype=torch.long)  # where (row, b) lands in the concatenation
        weights, tile_blocks, tiles, offset = [], [], [], 0
        for j in range(base.in_features // bc):
            row_ids, slot = (block_of == j).nonzero(as_tuple=True)
            if row_ids.numel() == 0:
                continue
            tile_codes = codes[row_ids.unsqueeze(-1), slot.unsqueeze(-1) * bc + torch.arange(bc)]
            scale = values.scale[row_ids.unsqueeze(-1), slot.unsqueeze(-1) * groups_per_block + torch.arange(groups_per_block)]
            if spec.bits == 4:
                packed = tile_codes.to(torch.uint8)
                packed = packed[:, 0::2] | (packed[:, 1::2] << 4)
            else:
                packed = tile_codes.to(torch.int8)
            weight = nbits.from_codes(packed, scale, None, spec, bc)
            weights += [weight.blob, weight.scales]
            tiles.append(weight.shape)
            tile_blocks.append(j)
            position[row_ids, slot] = offset + torch.arange(row_ids.numel())
            offset += row_ids.numel()
        self.shape = TilesShape(bc, base.in_features // bc, tuple(tile_blocks), tuple(tiles), out, kept)
        self.register_buffer("order", position.reshape(-1))
        for i, w in enumerate(weights):
            self.register_buffer(f"tile{i // 2}_{'blob' if i % 2 == 0 else 'scales'}", w)
        self._count = len(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = [getattr(self, f"tile{i // 2}_{'blob' if i % 2 == 0 else 'scales'}") for i in range(self._count)]
        return ColumnTilesFunction.apply(x, self.shape, self.order, *weights)


def densified(base: BlockSparseBase) -> nn.Module:
    """One dense operator computing the same weight (`--densify-sparse`)."""
    from .operators import DenseMatMul

    values = base.values
    if tiles_apply(base):
        spec = values.qspec
        codes = unpack(values.codes, spec.bits)
        zero_code = 8 if (spec.bits == 4 and spec.symmetric) else 0
        dense_codes = torch.full((base.out_features, base.in_features), zero_code, dtype=torch.int32)
        cols = _column_index(base).repeat_interleave(base.block_shape[0], dim=0)
        dense_codes.scatter_(1, cols, codes)
        groups = base.in_features // spec.group_size
        scale = torch.zeros(base.out_features, groups, dtype=values.scale.dtype)
        group_cols = cols[:, :: spec.group_size] // spec.group_size
        scale.scatter_(1, group_cols, values.scale)
        minimum = None
        if values.minimum is not None:
            minimum = torch.zeros_like(scale).scatter_(1, group_cols, values.minimum)
        if spec.bits == 4:
            packed = dense_codes.to(torch.uint8)
            packed = packed[:, 0::2] | (packed[:, 1::2] << 4)
        else:
            packed = dense_codes.to(torch.int8 if spec.symmetric else torch.uint8)
        return nbits.NBitsMatMul(nbits.from_codes(packed, scale, minimum, spec, base.in_features))
    return DenseMatMul(base.to_dense())


def sparse_module(base: BlockSparseBase, densify: bool) -> nn.Module:
    if densify:
        return densified(base)
    if tiles_apply(base):
        return ColumnTiles(base)
    return GatheredBlocks(base)

