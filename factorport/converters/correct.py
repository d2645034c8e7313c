"""`correct`: a low-rank term that cancels the error of whatever base a linear
has (quantization, sparsity or both): y = base(x) + U·(V·x).

The error E = W - base is truncated in the eigenspace of the input's XᵀX
(EoRA): E·S = P·diag(σ)·Qᵀ with S·Sᵀ = XᵀX, keep rank r, so the discarded σ²
are exactly the remaining output error on the calibration data.

* shared: false — EoRA, one correction per linear;
* shared: true  — GlowQ, the errors of a group that reads one input (q/k/v,
  gate/up) are stacked and share one V, computed once per forward;
* ranks: fixed, or a budget (`added_bytes`) spread by error reduction per
  byte; a budget may leave a linear or group uncorrected, which is GlowQ-S
  (corrections only where they pay).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..ops import CompressedLinear
from .calibration import CalibrationStats
from .lowrank import (
    Allocation, Spectrum, attach_projection, candidate, input_transform, low_rank_, member_rows, stacked_error_svd, truncate, unit_name, units_of,
)
from .ranks import RankPolicy
from .report import LayerReport, module_bytes, module_params, output_error


@dataclass(frozen=True)
class CorrectConfig:
    targets: tuple[str, ...] = ("linears",)
    shared: bool = True
    ranks: RankPolicy = RankPolicy(rank=32)
    factor_dtype: str = "float16"
    damping: float = 1e-6  # whitening: fraction of mean(diag XᵀX) added to the diagonal
    sink_weight: float = 1.0  # weight of each sequence's first token in XᵀX
    # shared: each member's error enters the stacked SVD divided by the norm of
    # its own output ‖W·Xᵀ‖, so the shared V minimises the sum of the members'
    # relative errors rather than their summed absolute error, in which the
    # widest member (q: three times k's rows) weighs most.
    balance_members: bool = False


def check_correct(model, config: CorrectConfig) -> None:
    for unit in units_of(model, config.targets, config.shared):
        for name in unit:
            module = model.get_submodule(name)
            has_base = isinstance(module, CompressedLinear) and module.base is not None
            # A plain nn.Linear is fine here: an earlier step of the recipe may give it a base.
            if isinstance(module, CompressedLinear) and (not has_base or module.U is not None):
                raise ValueError(f"{name} has no base to correct or already has a low-rank term")


def correct_(
    model, config: CorrectConfig, stats: CalibrationStats | None, progress: bool = True, originals=None,
    allocation: Allocation | None = None,
) -> list[LayerReport]:
    if stats is None:
        raise ValueError("correct needs calibration statistics (it works in the eigenspace of XᵀX)")
    check_correct(model, config)
    units = [u for u in units_of(model, config.targets, config.shared) if all(isinstance(model.get_submodule(n), CompressedLinear) for n in u)]
    if not units:
        raise ValueError("no targeted linear has a compressed base; put a quantize or sparsify step first")
    dtype = getattr(torch, config.factor_dtype)

    def decompose(unit: tuple[str, ...]) -> Spectrum:
        started = time.perf_counter()
        modules = [model.get_submodule(n) for n in unit]
        whitening = input_transform("whitened", stats.xtx(unit[0], config.sink_weight), 0.0, config.damping)
        p, s, right, reference = stacked_error_svd([originals[n] for n in unit], [m.base.to_dense() for m in modules], whitening, config.balance_members)
        found = candidate(unit_name(unit), p, right, s, 0, dtype, reference_energy=reference)  # dense bytes: unused for corrections
        return Spectrum(unit, p, s, right, found, time.perf_counter() - started)

    def attach(sp: Spectrum, rank: int | None) -> list[LayerReport]:
        if not rank:
            return []  # the budget found better uses for these bytes
        u, v = truncate(sp.p, sp.s, sp.right, rank, dtype)
        projection, name_of_v, reports = attach_projection(model, sp.unit, v, "correct")
        for name, module, member_u in member_rows(model, sp.unit, u):
            before_error = output_error(originals[name], module.base.to_dense(), stats.xtx(name))
            params_before, bytes_before = module_params(module), module_bytes(module)
            module.set_lowrank(member_u, projection, name_of_v)
            after_error = output_error(originals[name], module.to_dense(), stats.xtx(name))
            reports.append(
                LayerReport(
                    name, "correct", f"{module.extra_repr()} (error {before_error:.2e} -> {after_error:.2e})",
                    params_before, module_params(module), bytes_before, module_bytes(module), after_error, sp.seconds / len(sp.unit),
                )
            )
        return reports

    desc = f"correct ({'shared' if config.shared else 'per-linear'} eora)"
    return low_rank_(model, units, decompose, attach, config.ranks, desc, progress, corrections=True, allocation=allocation)
