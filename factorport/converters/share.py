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
from tqdm import tqdm

from ..architectures import arch_for, input_groups
from ..ops import CompressedLinear, Projection
from .calibration import CalibrationStats
from .factorize import factor_dtype, fixed_cost, input_transform, svd_of, truncate
from .ranks import Candidate, RankPolicy, allocate
from .report import LayerReport, output_error
from .targets import compressible_linears, replace_linear


@dataclass(frozen=True)
class ShareConfig:
    targets: tuple[str, ...] = ("linears",)
    ranks: RankPolicy = RankPolicy()
    factor_dtype: str | None = None  # default: the weights' dtype
    damping: float = 1e-6
    sink_weight: float = 1.0  # weight of each sequence's first token in XᵀX
    across_layers: int = 1  # >1: share V per projection type over this many consecutive layers


def shared_name(group: tuple[str, ...]) -> str:
    """Where a group's V is registered: beside its first member, e.g.
    model.layers.0.self_attn.shared_q_k_v, or model.layers.4.mlp.shared_up_x4
    for one projection shared by four layers."""
    parent = group[0].rpartition(".")[0]
    leaves = [name.rpartition(".")[2].removesuffix("_proj") for name in group]
    if len(set(leaves)) == 1:
        return f"{parent}.shared_{leaves[0]}_x{len(group)}"
    return f"{parent}.shared_{'_'.join(leaves)}"


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


def _groups(model, config: ShareConfig) -> list[tuple[str, ...]]:
    arch = arch_for(model.config)
    chosen = compressible_linears(model, config.targets)
    if config.across_layers > 1:
        by_type: dict[str, list[str]] = {}
        for name in chosen:
            by_type.setdefault(name.removeprefix(arch.layers + ".").partition(".")[2], []).append(name)
        window = config.across_layers
        return [tuple(names[i : i + window]) for names in by_type.values() for i in range(0, len(names), window)]
    wanted = set(chosen)
    groups = [tuple(n for n in g if n in wanted) for g in input_groups(model, arch)]
    return [g for g in groups if g]


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


def share_(model, config: ShareConfig, stats: CalibrationStats | None, progress: bool = True) -> list[LayerReport]:
    check_share(model, config)
    if stats is None:
        raise ValueError("share needs calibration statistics (it whitens with XᵀX)")
    groups = _groups(model, config)
    decompositions, candidates = {}, []
    for group in tqdm(groups, desc="share (joint whitened svd)", unit="group", disable=not progress):
        linears = [model.get_submodule(n) for n in group]
        started = time.perf_counter()
        stacked = torch.cat([m.weight.detach() for m in linears])
        transform = input_transform("whitened", _group_xtx(stats, group, config.sink_weight), 0.0, config.damping)
        p, s, right = svd_of(stacked, transform)
        dtype = factor_dtype(config, linears[0])
        decompositions[group] = (p, s, right, dtype, time.perf_counter() - started)
        candidates.append(
            Candidate(
                name=group[0] if len(group) == 1 else shared_name(group),
                out_features=stacked.shape[0],
                in_features=stacked.shape[1],
                energy=(s**2).float(),
                dense_bytes=sum(m.weight.numel() * m.weight.element_size() for m in linears),
                factor_element_bytes=torch.empty(0, dtype=dtype).element_size(),
            )
        )
    ranks = allocate(candidates, config.ranks, fixed_cost(model, config.ranks, candidates))

    reports = []
    for group, cand in zip(groups, candidates):
        p, s, right, dtype, seconds = decompositions.pop(group)
        rank = ranks[cand.name]
        linears = [model.get_submodule(n) for n in group]
        if rank is None:
            for name, linear in zip(group, linears):
                kept = LayerReport.compare(name, linear, linear, 0.0, seconds / len(group), step="share")
                kept.operator = "dense (factorizing does not pay at its allocated rank)"
                reports.append(kept)
            continue
        u, v = truncate(p, s, right, rank, dtype)
        what = "shared projection" if config.across_layers == 1 else "projection shared across layers (storage only: computed per layer)"
        projection, name_of_v, rows = attach_projection(model, group, v, "share", what)
        reports += rows
        for (name, linear, member_u) in member_rows(model, group, u):
            new = CompressedLinear(linear.in_features, linear.out_features, None, member_u, projection, name_of_v, linear.bias)
            err = output_error(linear.weight, new.to_dense(), stats.xtx(name))
            replace_linear(model, name, new)
            reports.append(LayerReport.compare(name, linear, new, err, seconds / len(group), step="share"))
    return reports
