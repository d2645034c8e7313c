"""`sparsify`: a block-sparse base, optionally with quantized kept blocks (GQSA).

Scores are Wanda's, |W_ij| · ‖X_j‖ (weight magnitude times the input
channel's activation norm from calibration), or plain magnitude |W_ij|.

* pattern "block": the weight is tiled into `block_shape` blocks; every
  block-row keeps its `density` share of blocks with the largest summed score,
  so each block-row keeps the same number of blocks.
* pattern "N:M" (e.g. "2:4"): in every row, each run of M input columns keeps
  its N best weights. Stored as 1x1 blocks (the layout's general form, 4 bytes
  of index per kept weight).

With `bits`, the kept weights are group-quantized — group_size must divide
the number of kept columns per row. With calibration statistics and
`compensate`, pruning and rounding are one SparseGPT/GPTQ sweep: each
column is pruned or rounded in turn and its error pushed onto the columns not
yet visited, so the kept weights absorb what the pruned ones did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..ops import BlockSparseBase, CompressedLinear, DenseBase, QuantizedBase, QuantSpec
from ..ops.quant import pack
from .calibration import CalibrationStats
from .quantize import GroupRounder, InverseHessian, obs_sweep
from .report import LayerReport, output_error
from .targets import compressible_linears, replace_linear

METHODS = ("wanda", "magnitude")


@dataclass(frozen=True)
class SparsifyConfig:
    targets: tuple[str, ...] = ("linears",)
    method: str = "wanda"  # the score
    pattern: str = "block"  # "block" or "N:M"
    block_rows: int = 1
    block_cols: int = 32
    density: float = 0.5
    bits: int | None = None  # quantize kept blocks (GQSA); None keeps them dense
    group_size: int = 32
    symmetric: bool = True
    # SparseGPT-style: the kept weights absorb the pruning (and rounding) error
    # through the inverse Hessian. Off by default: on SmolLM2 (50% of 1x32
    # blocks + int4, statistics from the dense model) it halves each layer's
    # calibration error yet raises perplexity (27k without, 150k-400k with) —
    # the errors compound across layers; sequential calibration is the fix.
    compensate: bool = False
    sink_weight: float = 32.0  # for the compensation sweep (see QuantizeConfig.sink_weight)

    def n_m(self) -> tuple[int, int] | None:
        if self.pattern == "block":
            return None
        try:
            n, m = (int(p) for p in self.pattern.split(":"))
        except ValueError:
            raise ValueError(f"pattern '{self.pattern}' is neither 'block' nor 'N:M' like '2:4'") from None
        if not 0 < n < m:
            raise ValueError(f"pattern '{self.pattern}': need 0 < N < M")
        return n, m


def _kept_columns(config: SparsifyConfig, in_features: int) -> int:
    nm = config.n_m()
    if nm is not None:
        return in_features * nm[0] // nm[1]
    return max(1, round(config.density * in_features / config.block_cols)) * config.block_cols


def check_sparsify(model, config: SparsifyConfig) -> None:
    nm = config.n_m()
    if not 0 < config.density <= 1:
        raise ValueError(f"density {config.density} must be in (0, 1]")
    for name in compressible_linears(model, config.targets):
        linear = model.get_submodule(name)
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(f"{name} is already compressed; sparsify dense linears only")
        out_f, in_f = linear.weight.shape
        if nm is not None and in_f % nm[1]:
            raise ValueError(f"{config.pattern} needs the input width of {name} ({in_f}) to be a multiple of {nm[1]}")
        if nm is None and (out_f % config.block_rows or in_f % config.block_cols):
            raise ValueError(
                f"block {config.block_rows}x{config.block_cols} does not tile {name} ({out_f}x{in_f}); pick a block that divides it"
            )
        if config.bits is not None:
            QuantSpec(config.bits, config.group_size, config.symmetric).check_fits(_kept_columns(config, in_f), f"the kept columns of {name}")


def scores(weight: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """Wanda's |W|·‖X_j‖, or |W| without activation norms."""
    magnitude = weight.detach().abs().float()
    return magnitude if norms is None else magnitude * norms.float().unsqueeze(0)


def block_mask_indices(score: torch.Tensor, block: tuple[int, int], kept: int) -> torch.Tensor:
    """Kept block columns per block-row (ascending): (rows / block_rows, kept)."""
    br, bc = block
    out_f, in_f = score.shape
    per_block = score.reshape(out_f // br, br, in_f // bc, bc).sum(dim=(1, 3))
    return per_block.topk(kept, dim=1).indices.sort(dim=1).values


def n_m_indices(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Kept columns per row for N:M sparsity (ascending): (rows, in * n / m)."""
    out_f, in_f = score.shape
    best = score.reshape(out_f, in_f // m, m).topk(n, dim=2).indices.sort(dim=2).values
    offsets = torch.arange(0, in_f, m).reshape(1, -1, 1)
    return (best + offsets).reshape(out_f, -1)


def sparse_base(
    weight: torch.Tensor, norms: torch.Tensor | None, config: SparsifyConfig, xtx: torch.Tensor | None = None
) -> BlockSparseBase:
    """The block-sparse base of `weight`. With `xtx`, the kept weights absorb the
    pruning (and rounding) error as in SparseGPT/GPTQ; without, they are copied."""
    out_f, in_f = weight.shape
    weight = weight.detach()
    score = scores(weight, norms)
    nm = config.n_m()
    if nm is None:
        block = (config.block_rows, config.block_cols)
        indices = block_mask_indices(score, block, _kept_columns(config, in_f) // config.block_cols)
    else:
        block = (1, 1)
        indices = n_m_indices(score, *nm)
    br, bc = block
    cols = (indices.long().unsqueeze(-1) * bc + torch.arange(bc)).flatten(1)  # (R, kept*bc)
    row_cols = cols.repeat_interleave(br, dim=0)  # (out, kept*bc): input column of each kept weight
    spec = None if config.bits is None else QuantSpec(config.bits, config.group_size, config.symmetric)

    if xtx is None:
        compact = weight.gather(1, row_cols)
    else:
        keep = torch.zeros(out_f, in_f, dtype=torch.bool).scatter_(1, row_cols, True)
        if spec is not None and bc % spec.group_size == 0:
            # round and prune in one sweep; groups lie inside blocks, so the
            # kept groups' codes and scales are simply gathered
            rounder = GroupRounder(out_f, in_f, spec, keep)
            obs_sweep(weight, InverseHessian.of(xtx, 0.01), max(128 // bc, 1) * bc, rounder)
            group_cols = row_cols[:, :: spec.group_size] // spec.group_size
            minimum = None if rounder.minimum is None else rounder.minimum.gather(1, group_cols)
            codes = pack(rounder.codes.gather(1, row_cols), spec)
            values = QuantizedBase(codes, rounder.scale.gather(1, group_cols), minimum, spec, row_cols.shape[1])
            return BlockSparseBase(indices, values, block, in_f)
        pruned = obs_sweep(weight, InverseHessian.of(xtx, 0.01), 128, lambda col, blk, i: torch.where(keep[:, col], blk[:, i], 0.0))
        compact = pruned.gather(1, row_cols).to(weight.dtype)
    compact = compact.contiguous()
    values = DenseBase(compact) if spec is None else QuantizedBase.from_weight(compact, spec)
    return BlockSparseBase(indices, values, block, in_f)


def sparsify_(model, config: SparsifyConfig, stats: CalibrationStats | None, progress: bool = True) -> list[LayerReport]:
    check_sparsify(model, config)
    if config.method == "wanda" and stats is None:
        raise ValueError("sparsify method 'wanda' needs calibration statistics (activation norms)")
    reports = []
    names = compressible_linears(model, config.targets)
    for name in tqdm(names, desc=f"sparsify ({config.method} {config.pattern})", unit="layer", disable=not progress):
        linear = model.get_submodule(name)
        started = time.perf_counter()
        norms = stats.channel_norms(name) if config.method == "wanda" else None
        xtx = stats.hessian(name, config.sink_weight) if config.compensate and stats is not None else None
        base = sparse_base(linear.weight, norms, config, xtx)
        new = CompressedLinear.from_linear(linear, base)
        err = output_error(linear.weight, base.to_dense(), stats.xtx(name) if stats is not None else None)
        replace_linear(model, name, new)
        reports.append(LayerReport.compare(name, linear, new, err, time.perf_counter() - started, step="sparsify"))
    return reports
