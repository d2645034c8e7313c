"""`quantize`: replace a dense weight by group-wise integer codes.

* rtn  — round to nearest on the grid of `ops.quant`.
* gptq — GPTQ (Frantar et al. 2022): quantize one column at a time and push
         its rounding error onto the columns not yet quantized, weighted by
         the inverse Hessian H = XᵀX. Group scales are fixed when the
         quantizer reaches a group's first column (from the error-updated
         weights), the way the reference implementation does without act-order.

A linear that already has a dense base (or is still a plain nn.Linear) gets
a quantized base; a factorized linear without base is left alone and said so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm
from torch import nn

from ..ops import CompressedLinear, QuantizedBase, QuantSpec
from ..ops.quant import decode, encode, group_params, pack
from .calibration import CalibrationStats
from .report import LayerReport, output_error
from .targets import compressible_linears, replace_linear

METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class QuantizeConfig:
    targets: tuple[str, ...] = ("linears",)
    method: str = "rtn"
    bits: int = 4
    group_size: int = 64
    symmetric: bool = True
    damping: float = 0.01  # GPTQ: fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # GPTQ: columns updated together
    # GPTQ: weight of each sequence's first token in H. Most heads park their
    # attention on it (the attention sink), so an error in its value/output
    # projection reaches every later position; with weight 1 GPTQ trades that
    # token away and loses to plain rounding. Measured on SmolLM2-135M, int4
    # g64, 40 WikiText-2 test windows: RTN 37.0; GPTQ weight 1: 38.9,
    # 32: 33.6, 256: 35.3.
    sink_weight: float = 32.0
    # GPTQ: pick each group's scale among shrunken ranges (1.0, 0.98, ... of the
    # largest magnitude) by H-diagonal-weighted rounding error, as the GPTQ
    # reference's `mse` option does; clipping a rare extreme value buys a finer
    # grid for the rest of the group. SmolLM2-135M, int4 g64, 40 windows:
    # 33.8 -> 31.5.
    clip_search: bool = False

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.symmetric)


@dataclass
class InverseHessian:
    """What the sweeps need of H = XᵀX, computed once per input group (q/k/v
    share theirs): `upper`, the upper Cholesky factor U of the damped inverse,
    UᵀU = (H + λ·mean(diag H)·I)⁻¹; the columns no input reached; diag H."""

    upper: torch.Tensor
    dead: torch.Tensor
    diagonal: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, xtx: torch.Tensor, damping: float) -> "InverseHessian":
        # a float32 `xtx` is used up, changed in place: a 14336-wide H is 0.8 GB
        # (`CalibrationStats.hessian` makes a fresh one per call)
        h = xtx.float()
        diagonal = h.diagonal().clone()
        dead = diagonal == 0
        h[dead, dead] = 1.0
        h.diagonal().add_(damping * h.diagonal().mean())
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
        return cls(upper, dead, diagonal)


@torch.no_grad()
def obs_sweep(weight: torch.Tensor, hinv: InverseHessian, block_size: int, target_of) -> torch.Tensor:
    """The optimal-brain-surgeon sweep shared by GPTQ and SparseGPT: visit the
    columns in order, replace each by `target_of(col, block, i)` (rounded,
    pruned, or both; `block[:, i]` is column `col` with the updates so far) and
    push the error onto the columns not yet visited through the inverse
    Hessian. Returns the replaced weights."""
    rows, cols = weight.shape
    w = weight.float().clone()
    w[:, hinv.dead] = 0.0
    result = torch.empty_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        block = w[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        hblock = hinv.upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            target = target_of(i1 + i, block, i)
            result[:, i1 + i] = target
            err = (block[:, i] - target) / hblock[i, i]
            block[:, i:] -= err.unsqueeze(1) * hblock[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, i2:] -= errors @ hinv.upper[i1:i2, i2:]
    return result


class GroupRounder:
    """`target_of` for `obs_sweep` that rounds onto the group grid, fixing each
    group's scale when the sweep reaches the group's first column; `keep`
    (rows, cols) optionally prunes entries to exactly zero (SparseGPT)."""

    def __init__(
        self, rows: int, cols: int, spec: QuantSpec, keep: torch.Tensor | None = None, importance: torch.Tensor | None = None
    ) -> None:
        self.spec, self.keep, self.importance = spec, keep, importance
        groups = cols // spec.group_size
        self.codes = torch.empty(rows, cols, dtype=torch.int32)
        self.scale = torch.empty(rows, groups, dtype=torch.float16)
        self.minimum = None if spec.symmetric else torch.empty(rows, groups, dtype=torch.float16)

    def __call__(self, col: int, block: torch.Tensor, i: int) -> torch.Tensor:
        gs = self.spec.group_size
        g = col // gs
        if col % gs == 0:
            group = block[:, i : i + gs].unsqueeze(1)
            if self.importance is None:
                s, m = group_params(group, self.spec)
            else:
                s, m = clipped_group_params(group, self.spec, self.importance[col : col + gs])
            self.scale[:, g] = s[:, 0]
            if self.minimum is not None:
                self.minimum[:, g] = m[:, 0]
        s_g = self.scale[:, g : g + 1]
        m_g = None if self.minimum is None else self.minimum[:, g : g + 1]
        q = encode(block[:, i].reshape(-1, 1, 1), self.spec, s_g, m_g)
        self.codes[:, col] = q.reshape(-1)
        value = decode(q, self.spec, s_g, m_g).reshape(-1)
        return value if self.keep is None else torch.where(self.keep[:, col], value, torch.zeros_like(value))


CLIP_SHRINKS = tuple(1.0 - 0.02 * i for i in range(21))  # 1.00 down to 0.60


def clipped_group_params(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor):
    """`group_params` of `w` (rows, 1, group_size) with the range shrunk, per row,
    by the factor in CLIP_SHRINKS that rounds the group with the least
    importance-weighted squared error."""
    best_s = best_m = best_err = None
    for shrink in CLIP_SHRINKS:
        s, m = group_params(w * shrink, spec)
        err = ((decode(encode(w, spec, s, m), spec, s, m) - w).pow(2) * importance).sum(dim=-1)
        if best_err is None:  # the full range
            best_s, best_m, best_err = s, m, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if best_m is not None:
            best_m = torch.where(better, m, best_m)
    return best_s, best_m


def gptq(weight: torch.Tensor, hinv: InverseHessian, spec: QuantSpec, block_size: int, clip_search: bool = False) -> QuantizedBase:
    """GPTQ codes of `weight` under the inverse Hessian `hinv`."""
    rows, cols = weight.shape
    spec.check_fits(cols)
    block_size = max(spec.group_size, block_size // spec.group_size * spec.group_size)  # groups never straddle blocks
    rounder = GroupRounder(rows, cols, spec, importance=hinv.diagonal if clip_search else None)
    obs_sweep(weight, hinv, block_size, rounder)
    return QuantizedBase(pack(rounder.codes, spec), rounder.scale, rounder.minimum, spec, cols)


def _dense_of(module) -> torch.Tensor | None:
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, CompressedLinear) and module.base is not None and module.base.kind == "dense":
        return module.base.weight
    return None


def check_quantize(model, config: QuantizeConfig) -> None:
    for name in compressible_linears(model, config.targets):
        config.spec.check_fits(model.get_submodule(name).in_features, name)


def quantize_(model, config: QuantizeConfig, stats: CalibrationStats | None, progress: bool = True) -> list[LayerReport]:
    spec = config.spec
    check_quantize(model, config)  # every width before touching anything
    names = compressible_linears(model, config.targets)
    if config.method == "gptq" and stats is None:
        raise ValueError("quantize method 'gptq' needs calibration statistics")
    reports = []
    hinv: dict[str, InverseHessian] = {}  # the current input group's only (a 14336-wide one is 0.8 GB)
    for name in tqdm(names, desc=f"quantize ({config.method} int{spec.bits})", unit="layer", disable=not progress):
        module = model.get_submodule(name)
        weight = _dense_of(module)
        if weight is None:
            print(f"factorport: quantize skips {name}: it has no dense base")
            continue
        started = time.perf_counter()
        if config.method == "gptq":
            key = stats.key_of[name]
            if key not in hinv:
                hinv = {key: InverseHessian.of(stats.hessian(name, config.sink_weight), config.damping)}
            base = gptq(weight, hinv[key], spec, config.block_size, config.clip_search)
        else:
            base = QuantizedBase.from_weight(weight, spec)
        if isinstance(module, CompressedLinear):  # keep its low-rank term, if any
            new = CompressedLinear(
                module.in_features, module.out_features, base, module.U, module.V, module.shared_name, module.bias
            )
        else:
            new = CompressedLinear.from_linear(module, base)
        err = output_error(weight, base.to_dense(), stats.xtx(name) if stats is not None and stats.has(name) else None)
        replace_linear(model, name, new)
        reports.append(LayerReport.compare(name, module, new, err, time.perf_counter() - started, step="quantize"))
    return reports
