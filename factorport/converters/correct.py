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

import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..architectures import arch_for, input_groups
from ..ops import CompressedLinear
from .calibration import CalibrationStats
from .factorize import input_transform, svd_of, truncate
from .ranks import Candidate, RankPolicy, allocate
from .report import LayerReport, module_bytes, module_params, output_error
from .share import attach_projection, member_rows, shared_name
from .targets import compressible_linears


@dataclass(frozen=True)
class CorrectConfig:
    targets: tuple[str, ...] = ("linears",)
    shared: bool = True
    ranks: RankPolicy = RankPolicy(rank=32)
    factor_dtype: str = "float16"
    damping: float = 1e-6
    sink_weight: float = 1.0  # weight of each sequence's first token in XᵀX
    # shared: each member's error enters the stacked SVD divided by the norm of
    # its own output ‖W·Xᵀ‖, so the shared V minimises the sum of the members'
    # relative errors rather than their summed absolute error, in which the
    # widest member (q: three times k's rows) weighs most.
    balance_members: bool = False


def _units(model, config: CorrectConfig) -> list[tuple[str, ...]]:
    """What gets one V: input groups when shared, single linears otherwise."""
    chosen = compressible_linears(model, config.targets)
    if not config.shared:
        return [(n,) for n in chosen]
    wanted = set(chosen)
    groups = [tuple(n for n in g if n in wanted) for g in input_groups(model, arch_for(model.config))]
    return [g for g in groups if g]


def stacked_error_svd(weights, bases, transform, balance: bool):
    """Whitened SVD of a unit's stacked error W - base: (P, σ, right, reference),
    with P·diag(σ)·right ≈ the stacked error and `reference` the stacked
    output energy in σ²'s units. With `balance`, each member is divided by its
    output norm ‖W·S‖ before the SVD (and P's rows multiplied back after), so
    σ² and `reference` count every member's error relative to its output."""
    weights = [w.double() for w in weights]
    energies = [float((w @ transform[0]).pow(2).sum()) for w in weights]  # ‖W·S‖² per member
    scales = [math.sqrt(e) if balance else 1.0 for e in energies]
    # only the members' ratios matter; a geometric mean of 1 keeps U and V
    # as large as without balancing (float16 factors), and a lone linear as is
    mean = math.prod(scales) ** (1 / len(scales))
    scales = [c / mean for c in scales]
    error = torch.cat([(w - b.double()) / c for w, b, c in zip(weights, bases, scales)])
    p, s, right = svd_of(error, transform)
    p = p * torch.cat([torch.full((w.shape[0], 1), c, dtype=p.dtype) for w, c in zip(weights, scales)])
    reference = sum(e / c**2 for e, c in zip(energies, scales))
    return p, s, right, reference


def check_correct(model, config: CorrectConfig) -> None:
    for unit in _units(model, config):
        for name in unit:
            module = model.get_submodule(name)
            has_base = isinstance(module, CompressedLinear) and module.base is not None
            # A plain nn.Linear is fine here: an earlier step of the recipe may give it a base.
            if isinstance(module, CompressedLinear) and (not has_base or module.U is not None):
                raise ValueError(f"{name} has no base to correct or already has a low-rank term")


def correct_(
    model, config: CorrectConfig, stats: CalibrationStats | None, progress: bool = True, originals=None
) -> list[LayerReport]:
    if stats is None:
        raise ValueError("correct needs calibration statistics (it works in the eigenspace of XᵀX)")
    check_correct(model, config)
    units = [u for u in _units(model, config) if all(isinstance(model.get_submodule(n), CompressedLinear) for n in u)]
    if not units:
        raise ValueError("no targeted linear has a compressed base; put a quantize or sparsify step first")
    dtype = getattr(torch, config.factor_dtype)
    decompositions, candidates = {}, []
    for unit in tqdm(units, desc=f"correct ({'shared' if config.shared else 'per-linear'} eora)", unit="unit", disable=not progress):
        started = time.perf_counter()
        modules = [model.get_submodule(n) for n in unit]
        transform = input_transform("whitened", stats.xtx(unit[0], config.sink_weight), 0.0, config.damping)
        weights = [originals[n] for n in unit]
        p, s, right, reference = stacked_error_svd(weights, [m.base.to_dense() for m in modules], transform, config.balance_members)
        decompositions[unit] = (p, s, right, time.perf_counter() - started)
        candidates.append(
            Candidate(
                name=unit[0] if len(unit) == 1 else shared_name(unit),
                out_features=p.shape[0],
                in_features=right.shape[1],
                energy=(s**2).float(),
                dense_bytes=sum(m.base.num_params() for m in modules) * 2,  # unused for corrections
                factor_element_bytes=torch.empty(0, dtype=dtype).element_size(),
                reference_energy=reference,
            )
        )
    ranks = allocate(candidates, config.ranks, corrections=True)

    reports = []
    for unit, cand in zip(units, candidates):
        p, s, right, seconds = decompositions.pop(unit)
        rank = ranks[cand.name]
        if not rank:
            continue  # the budget found better uses for these bytes
        u, v = truncate(p, s, right, rank, dtype)
        projection, name_of_v, rows = attach_projection(model, unit, v, "correct")
        reports += rows
        for name, module, member_u in member_rows(model, unit, u):
            before_error = output_error(originals[name], module.base.to_dense(), stats.xtx(name))
            params_before, bytes_before = module_params(module), module_bytes(module)
            module.set_lowrank(member_u, projection, name_of_v)
            after_error = output_error(originals[name], module.to_dense(), stats.xtx(name))
            reports.append(
                LayerReport(
                    name, "correct", f"{module.extra_repr()} (error {before_error:.2e} -> {after_error:.2e})",
                    params_before, module_params(module), bytes_before, module_bytes(module), after_error, seconds / len(unit),
                )
            )
    return reports
