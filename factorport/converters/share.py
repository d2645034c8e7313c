"""`share`: factorization with one V per input group (q/k/v, gate/up), or
per projection type across a window of layers (Basis Sharing).

The members' weights are stacked, [W_q; W_k; W_v] · S = P·diag(σ)·Qᵀ with S the
whitening of the group's shared input (SVD-LLM), and truncated jointly: the
group stores one V = √σ·Qᵀ·S⁻¹ (rank, in), computed once per forward, and each
member keeps its own rows of U = P·√σ. Ranks are allocated per group, by the
same policies as `factorize` (a group whose factorization does not pay stays
dense). Linears alone in their group get a private V, exactly as `factorize`.

With `across_layers: N`, the same projection of N consecutive layers shares
one V instead (whitened by the sum of their XᵀX). Their inputs differ, so V·x
is still computed per layer: this saves storage, not compute, and the report
says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..architectures import arch_for
from .calibration import CalibrationStats
from .lowrank import Allocation, Spectrum, attach_factors, candidate, factor_dtype, input_transform, low_rank_, svd_of, unit_name, units_of
from .ranks import RankPolicy
from .report import LayerReport
from .targets import compressible_linears


@dataclass(frozen=True)
class ShareConfig:
    targets: tuple[str, ...] = ("linears",)
    ranks: RankPolicy = RankPolicy()
    factor_dtype: str | None = None  # default: the weights' dtype
    damping: float = 1e-6  # whitening: fraction of mean(diag XᵀX) added to the diagonal
    sink_weight: float = 1.0  # weight of each sequence's first token in XᵀX
    across_layers: int = 1  # >1: share V per projection type over this many consecutive layers


def _groups(model, config: ShareConfig) -> list[tuple[str, ...]]:
    if config.across_layers == 1:
        return units_of(model, config.targets, grouped=True)
    arch = arch_for(model.config)
    by_type: dict[str, list[str]] = {}
    for name in compressible_linears(model, config.targets):
        by_type.setdefault(name.removeprefix(arch.layers + ".").partition(".")[2], []).append(name)
    window = config.across_layers
    return [tuple(names[i : i + window]) for names in by_type.values() for i in range(0, len(names), window)]


def _group_xtx(stats: CalibrationStats, group: tuple[str, ...], sink_weight: float) -> torch.Tensor:
    """The whitening statistics of a group: its one input's, or the sum over
    layers when the members read different inputs."""
    keys = {stats.key_of[n]: n for n in group}
    return sum(stats.xtx(n, sink_weight) for n in keys.values())


def check_share(model, config: ShareConfig) -> None:
    for group in _groups(model, config):
        linears = [model.get_submodule(n) for n in group]
        if not all(isinstance(m, torch.nn.Linear) for m in linears):
            raise ValueError(f"{group[0]}'s group is already compressed; share dense linears only")
        most = min(sum(m.out_features for m in linears), linears[0].in_features)
        if config.ranks.rank is not None and config.ranks.rank > most:
            raise ValueError(
                f"rank {config.ranks.rank} is larger than the group {', '.join(group)} allows; "
                f"use a rank of at most {most}"
            )


def share_(
    model, config: ShareConfig, stats: CalibrationStats | None, progress: bool = True, allocation: Allocation | None = None
) -> list[LayerReport]:
    check_share(model, config)
    if stats is None:
        raise ValueError("share needs calibration statistics (it whitens with XᵀX)")

    def decompose(group: tuple[str, ...]) -> Spectrum:
        linears = [model.get_submodule(n) for n in group]
        started = time.perf_counter()
        stacked = torch.cat([m.weight.detach() for m in linears])
        whitening = input_transform("whitened", _group_xtx(stats, group, config.sink_weight), 0.0, config.damping)
        p, s, right = svd_of(stacked, whitening)
        dense_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        found = candidate(unit_name(group), p, right, s, dense_bytes, factor_dtype(config, linears[0]))
        return Spectrum(group, p, s, right, found, time.perf_counter() - started)

    what = "shared projection" if config.across_layers == 1 else "projection shared across layers (storage only: computed per layer)"

    def attach(sp: Spectrum, rank: int | None) -> list[LayerReport]:
        return attach_factors(model, sp, rank, factor_dtype(config, model.get_submodule(sp.unit[0])), "share", stats, what)

    return low_rank_(model, _groups(model, config), decompose, attach, config.ranks, "share (joint whitened svd)", progress,
                     allocation=allocation)
