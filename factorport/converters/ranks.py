"""Rank allocation: how many singular directions each factorized matrix keeps.

Policies (one per recipe):
* rank: N         — the same rank everywhere (must fit every matrix);
* ratio: p        — every matrix keeps the fraction p of its parameters;
* energy: e       — the smallest rank holding the fraction e of the spectrum's energy;
* budget: {...}   — one budget for all targets, spread by a greedy solver.

The budget solver. Each matrix's error after truncation at rank r is the
sum of its discarded σ² (for whitened SVD that *is* the output error on the
calibration data). Error is non-increasing and convex in r, so repeatedly
buying the step (a few more ranks, or going back to dense) with the largest
error reduction per unit of cost is optimal for the relaxed problem. Errors
are compared across matrices either relative to each matrix's own output
energy ("relative", the default) or as they are ("absolute"). The last step
of every matrix is "stay dense": it costs the gap between the factor cost at
the break-even rank and the dense cost, and removes the remaining error — so
a matrix stays dense exactly where factorizing it does not pay.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

WEIGHTINGS = ("relative", "absolute")
# params_ratio: of the targeted matrices; params / bytes: of the whole model;
# added_bytes: what the step's factors may add (corrections).
BUDGET_KEYS = ("params_ratio", "params", "bytes", "added_bytes")


@dataclass(frozen=True)
class RankPolicy:
    rank: int | None = None
    ratio: float | None = None
    energy: float | None = None
    budget: dict = field(default_factory=dict)  # one of BUDGET_KEYS -> value
    weighting: str = "relative"
    multiple: int = 1  # ranks are multiples of this


@dataclass
class Candidate:
    name: str
    out_features: int
    in_features: int
    energy: torch.Tensor  # σ², descending
    dense_bytes: int
    factor_element_bytes: int
    reference_energy: float | None = None  # what "relative" divides by (default: the spectrum's)

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def max_rank(self) -> int:
        return min(self.out_features, self.in_features)

    def unit(self, in_bytes: bool) -> float:
        """Cost of one rank."""
        per = self.out_features + self.in_features
        return per * self.factor_element_bytes if in_bytes else per

    def dense(self, in_bytes: bool) -> float:
        return self.dense_bytes if in_bytes else self.dense_params


def check_rank(cand: Candidate, rank: int) -> None:
    if rank < 1 or rank > cand.max_rank:
        raise ValueError(
            f"rank {rank} does not fit {cand.name} ({cand.out_features}x{cand.in_features}); "
            f"use a rank between 1 and {cand.max_rank}"
        )


def allocate(
    candidates: list[Candidate], policy: RankPolicy, fixed_cost: float = 0.0, corrections: bool = False
) -> dict[str, int | None]:
    """Rank per matrix; None means "keep dense". `fixed_cost` is what the
    rest of the model costs, for whole-model `params`/`bytes` budgets.
    With `corrections`, the matrices are errors to correct: a budget may give
    a matrix rank 0 (no correction) and there is no "stay dense" step."""
    if policy.rank is not None:
        for c in candidates:
            check_rank(c, policy.rank)
        return {c.name: policy.rank for c in candidates}
    if policy.ratio is not None:
        return {c.name: _round(c, policy.ratio * c.dense_params / c.unit(False), policy.multiple) for c in candidates}
    if policy.energy is not None:
        ranks = {}
        for c in candidates:
            energy = c.energy.double()
            cumulative = torch.cumsum(energy, 0) / energy.sum().clamp_min(1e-30)
            rank = int(torch.searchsorted(cumulative, torch.tensor(policy.energy, dtype=torch.float64) - 1e-12)) + 1
            rank = c.max_rank if policy.energy >= 1.0 else _round(c, rank, policy.multiple)
            # a factorization as large as the dense matrix does not pay: keep it dense
            ranks[c.name] = None if rank * c.unit(False) >= c.dense_params else rank
        return ranks
    return _budget(candidates, policy, fixed_cost, corrections)


def _round(c: Candidate, rank: float, multiple: int) -> int:
    r = max(multiple, int(rank) // multiple * multiple)
    return min(r, c.max_rank)


def _budget(candidates: list[Candidate], policy: RankPolicy, fixed_cost: float, corrections: bool) -> dict[str, int | None]:
    (key, value), = policy.budget.items()
    in_bytes = key in ("bytes", "added_bytes")
    if key == "params_ratio":
        total = value * sum(c.dense_params for c in candidates)
    elif key == "added_bytes":
        total = value
    else:
        total = value - fixed_cost
    step = policy.multiple
    rank = {c.name: 0 if corrections else step for c in candidates}
    spent = sum(c.unit(in_bytes) * rank[c.name] for c in candidates)
    if spent > total:
        raise ValueError(
            f"budget {key}={value} is below the smallest factorization (rank {step} everywhere); raise it"
        )
    dense: set[str] = set()
    weight = {
        c.name: 1.0 / max(c.reference_energy or float(c.energy.sum()), 1e-30) if policy.weighting == "relative" else 1.0
        for c in candidates
    }
    by_name = {c.name: c for c in candidates}
    heap: list[tuple[float, str, str, float]] = []

    def push(c: Candidate) -> None:
        r = rank[c.name]
        unit = c.unit(in_bytes)
        break_even = min(c.max_rank, int(c.dense(in_bytes) // unit))
        if corrections:
            if r + step <= c.max_rank:
                gain = float(c.energy[r : r + step].sum()) * weight[c.name]
                heapq.heappush(heap, (-gain / (unit * step), c.name, "rank", unit * step))
        elif r + step <= break_even:
            gain = float(c.energy[r : r + step].sum()) * weight[c.name]
            cost = unit * step
            heapq.heappush(heap, (-gain / cost, c.name, "rank", cost))
        else:
            gain = float(c.energy[r:].sum()) * weight[c.name]
            cost = max(c.dense(in_bytes) - unit * r, 1e-9)
            heapq.heappush(heap, (-gain / cost, c.name, "dense", cost))

    for c in candidates:
        push(c)
    while heap:
        _, name, kind, cost = heapq.heappop(heap)
        if spent + cost > total:
            continue  # this matrix is done; cheaper steps elsewhere may still fit
        spent += cost
        if kind == "dense":
            dense.add(name)
        else:
            rank[name] += step
            push(by_name[name])
    return {name: (None if name in dense else r) for name, r in rank.items()}
