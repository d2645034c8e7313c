"""What the low-rank steps (`factorize`, `share`, `correct`) have in common:
the decompositions, the units that get one V, and one driver.

A unit is the linears that share one V: a single linear (a private V), an
input group (q/k/v, gate/up: V·x computed once per forward) or one
projection over a window of layers. The driver `low_rank_` decomposes every
unit, allocates ranks over all of them with the recipe's `RankPolicy`, and
hands each unit and its rank to the step's `attach`; a new low-rank method
is a `decompose` and an `attach`.

A rank budget spread over the whole model is allocated in two passes when
the model is converted layer by layer: an `Allocation` without `chosen`
collects every layer's candidates (the scoring pass), `solve` allocates
them, and the conversion runs again with `chosen` fixed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm import tqdm

from ..architectures import arch_for, input_groups
from ..ops import CompressedLinear, Projection
from .calibration import CalibrationStats
from .ranks import Candidate, RankPolicy, allocate
from .report import LayerReport, model_params, module_bytes, output_error
from .targets import compressible_linears, replace_linear

# ------------------------------------------------------------ decompositions


@dataclass
class Whitening:
    """S with S·Sᵀ = XᵀX, so that ‖W·S‖ is W's output norm on the calibration
    inputs and truncating W·S's SVD truncates the output error optimally. Any
    such S gives the same truncation: whitened takes the Cholesky factor (a
    tenth of the flops of an eigendecomposition, ~130 s of which an
    8960-wide layer used to spend), asvd a diagonal (kept as a vector)."""

    scale: torch.Tensor  # float64, lower-triangular (n, n) or diagonal (n,)

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """W·S."""
        return w * self.scale if self.scale.dim() == 1 else w @ self.scale

    def undo(self, right: torch.Tensor) -> torch.Tensor:
        """right·S⁻¹."""
        if self.scale.dim() == 1:
            return right / self.scale
        return torch.linalg.solve_triangular(self.scale, right, upper=False, left=False)


def input_transform(method: str, xtx: torch.Tensor | None, alpha: float, damping: float) -> Whitening | None:
    """The method's S (plain, whitened, asvd), or None for the identity.
    `damping` is the fraction of mean(diag XᵀX) added to the diagonal, as in
    GPTQ; it grows tenfold until the factorization exists (dead channels
    make XᵀX singular)."""
    if method == "plain":
        return None
    xtx = xtx.double()
    if method == "asvd":
        d = xtx.diagonal().clamp_min(0).sqrt().pow(alpha)
        return Whitening(d.clamp_min(d.max() * 1e-6))
    h = xtx.clone()
    load = damping * float(h.diagonal().mean().clamp_min(torch.finfo(h.dtype).tiny))
    h.diagonal().add_(load)
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return Whitening(factor)
        h.diagonal().add_(9 * load)
        load *= 10
    raise ValueError("calibration statistics are not a Gram matrix (Cholesky fails at any damping): "
                     "recalibrate; the activations contain inf or NaN")


@torch.no_grad()
def svd_of(weight: torch.Tensor, whitening: Whitening | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, σ, Qᵀ·S⁻¹) with W·S = P·diag(σ)·Qᵀ."""
    w = weight.double()
    if whitening is None:
        p, s, qt = torch.linalg.svd(w, full_matrices=False)
        return p, s, qt
    p, s, qt = torch.linalg.svd(whitening.apply(w), full_matrices=False)
    return p, s, whitening.undo(qt)


def stacked_error_svd(weights, bases, whitening: Whitening, balance: bool):
    """Whitened SVD of a unit's stacked error W - base: (P, σ, right, reference),
    with P·diag(σ)·right ≈ the stacked error and `reference` the stacked
    output energy in σ²'s units. With `balance`, each member is divided by its
    output norm ‖W·S‖ before the SVD (and P's rows multiplied back after), so
    σ² and `reference` count every member's error relative to its output."""
    weights = [w.double() for w in weights]
    energies = [float(whitening.apply(w).pow(2).sum()) for w in weights]  # ‖W·S‖² per member
    scales = [math.sqrt(e) if balance else 1.0 for e in energies]
    # only the members' ratios matter; a geometric mean of 1 keeps U and V
    # as large as without balancing (float16 factors), and a lone linear as is
    mean = math.prod(scales) ** (1 / len(scales))
    scales = [c / mean for c in scales]
    error = torch.cat([(w - b.double()) / c for w, b, c in zip(weights, bases, scales)])
    p, s, right = svd_of(error, whitening)
    p = p * torch.cat([torch.full((w.shape[0], 1), c, dtype=p.dtype) for w, c in zip(weights, scales)])
    reference = sum(e / c**2 for e, c in zip(energies, scales))
    return p, s, right, reference


def truncate(p, s, right, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """U (out, r) and V (r, in), splitting σ evenly so both factors stay in range."""
    root = s[:rank].sqrt()
    u = (p[:, :rank] * root).to(dtype).contiguous()
    v = (root.unsqueeze(1) * right[:rank]).to(dtype).contiguous()
    return u, v


def factor_dtype(config, linear) -> torch.dtype:
    """The dtype U and V are stored in: the recipe's, else the weight's."""
    return getattr(torch, config.factor_dtype) if config.factor_dtype else linear.weight.dtype


# ------------------------------------------------------------------- units


def units_of(model, targets, grouped: bool) -> list[tuple[str, ...]]:
    """The targeted linears as units: input groups when `grouped`, else one each."""
    chosen = compressible_linears(model, targets)
    if not grouped:
        return [(n,) for n in chosen]
    wanted = set(chosen)
    groups = [tuple(n for n in g if n in wanted) for g in input_groups(model, arch_for(model.config))]
    return [g for g in groups if g]


def shared_name(group: tuple[str, ...]) -> str:
    """Where a group's V is registered: beside its first member, e.g.
    model.layers.0.self_attn.shared_q_k_v, or model.layers.4.mlp.shared_up_x4
    for one projection shared by four layers."""
    parent = group[0].rpartition(".")[0]
    leaves = [name.rpartition(".")[2].removesuffix("_proj") for name in group]
    if len(set(leaves)) == 1:
        return f"{parent}.shared_{leaves[0]}_x{len(group)}"
    return f"{parent}.shared_{'_'.join(leaves)}"


def unit_name(unit: tuple[str, ...]) -> str:
    """The name a unit is allocated and reported under."""
    return unit[0] if len(unit) == 1 else shared_name(unit)


def attach_projection(model, unit: tuple[str, ...], v: torch.Tensor, step: str, what: str = "shared projection"):
    """A Projection for V; registered at the group's name (and reported once,
    as its own row) when several linears share it. Returns (projection, its
    name or None, report rows)."""
    projection = Projection(v)
    if len(unit) == 1:
        return projection, None, []
    name = shared_name(unit)
    model.set_submodule(name, projection)
    return projection, name, [LayerReport(name, step, what, 0, v.numel(), 0, v.numel() * v.element_size(), None, 0.0)]


def member_rows(model, unit: tuple[str, ...], u: torch.Tensor):
    """(name, module, its rows of the stacked U) for every member of a unit."""
    row = 0
    for name in unit:
        module = model.get_submodule(name)
        yield name, module, u[row : row + module.out_features].contiguous()
        row += module.out_features


# ------------------------------------------------------------------ driver


@dataclass
class Spectrum:
    """A unit's decomposition P·diag(σ)·right ≈ its (stacked) matrix."""

    unit: tuple[str, ...]
    p: torch.Tensor
    s: torch.Tensor
    right: torch.Tensor
    candidate: Candidate  # what the allocator sees of it
    seconds: float  # to decompose


@dataclass
class Allocation:
    """One budget over every layer of a layer-by-layer conversion. The
    scoring pass (`chosen` None) collects each layer's candidates in
    `options`; the conversion then runs with `chosen` (allocated name ->
    rank, or the budget step's choice) fixed. JSON-serialisable once solved."""

    chosen: dict | None = None
    options: list = field(default_factory=list)

    @property
    def scoring(self) -> bool:
        return self.chosen is None


def fixed_cost(model, policy: RankPolicy, candidates: list[Candidate]) -> float:
    """What the rest of the model costs, for whole-model `params`/`bytes` budgets."""
    if "bytes" in policy.budget:
        return module_bytes(model) - sum(c.dense_bytes for c in candidates)
    if "params" in policy.budget:
        return model_params(model) - sum(c.dense_params for c in candidates)
    return 0.0


def solve_ranks(model, policy: RankPolicy, candidates: list[Candidate], corrections: bool = False) -> dict[str, int | None]:
    """Ranks for `candidates` (the whole model's) under `policy`; corrections
    are budgeted in the bytes they add, whatever the rest costs."""
    return allocate(candidates, policy, 0.0 if corrections else fixed_cost(model, policy, candidates), corrections)


def low_rank_(
    model,
    units: list[tuple[str, ...]],
    decompose: Callable[[tuple[str, ...]], Spectrum],
    attach: Callable[[Spectrum, int | None], list[LayerReport]],
    policy: RankPolicy,
    desc: str,
    progress: bool = True,
    corrections: bool = False,
    allocation: Allocation | None = None,
) -> list[LayerReport]:
    """Decompose every unit, allocate ranks, attach each (rank None: stays
    dense; 0: no correction). With a scoring `allocation`, only collect the
    candidates; with a solved one, take its ranks."""
    spectra = [decompose(unit) for unit in tqdm(units, desc=desc, unit="unit", disable=not progress)]
    candidates = [sp.candidate for sp in spectra]
    if allocation is not None and allocation.scoring:
        allocation.options += candidates
        return []
    if allocation is not None:
        ranks = {c.name: allocation.chosen[c.name] for c in candidates}
    else:
        ranks = solve_ranks(model, policy, candidates, corrections)
    reports = []
    for sp in spectra:
        reports += attach(sp, ranks[sp.candidate.name])
        sp.p = sp.right = None  # a 14336-wide unit's factors are gigabytes in float64
    return reports


def attach_factors(model, sp: Spectrum, rank: int | None, dtype: torch.dtype, step: str, stats: CalibrationStats | None,
                   what: str = "shared projection") -> list[LayerReport]:
    """Replace a unit's linears by U·V at `rank` (factorize, share), or keep
    them dense where the allocation says factorizing does not pay."""
    linears = [model.get_submodule(n) for n in sp.unit]
    share = sp.seconds / len(sp.unit)
    if rank is None:  # stays dense, and the report says so
        rows = [LayerReport.compare(n, m, m, 0.0, share, step=step) for n, m in zip(sp.unit, linears)]
        for row in rows:
            row.operator = "dense (factorizing does not pay at its allocated rank)"
        return rows
    started = time.perf_counter()
    u, v = truncate(sp.p, sp.s, sp.right, rank, dtype)
    projection, name_of_v, reports = attach_projection(model, sp.unit, v, step, what)
    for name, linear, member_u in member_rows(model, sp.unit, u):
        new = CompressedLinear(linear.in_features, linear.out_features, None, member_u, projection, name_of_v, linear.bias)
        err = output_error(linear.weight, new.to_dense(), stats.xtx(name) if stats is not None else None)
        replace_linear(model, name, new)
        reports.append(LayerReport.compare(name, linear, new, err, share + time.perf_counter() - started, step=step))
    return reports


def candidate(name: str, p: torch.Tensor, right: torch.Tensor, s: torch.Tensor, dense_bytes: int, dtype: torch.dtype,
              reference_energy: float | None = None) -> Candidate:
    """The allocator's view of a decomposition."""
    return Candidate(
        name=name, out_features=p.shape[0], in_features=right.shape[1], energy=(s**2).float(), dense_bytes=dense_bytes,
        factor_element_bytes=torch.empty(0, dtype=dtype).element_size(), reference_energy=reference_energy,
    )
