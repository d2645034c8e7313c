"""`factorize`: W ≈ U·V by truncated SVD of W·S, where S decides what error
the truncation minimizes:

* plain    — S = I: weight error ||ΔW||.
* whitened — S·Sᵀ = XᵀX (SVD-LLM): ||ΔW·S||² = ||ΔW·Xᵀ||², the output error
             on the calibration data; the discarded σ² are exactly that error.
* asvd     — S = diag(channel norm^α) (ASVD): a diagonal approximation.

Ranks come from `ranks.allocate` (fixed, uniform ratio, energy or a global
budget); a matrix whose allocation does not save anything stays dense.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..ops import CompressedLinear, Projection
from .calibration import CalibrationStats
from .ranks import Candidate, RankPolicy, allocate
from .report import LayerReport, model_params, module_bytes, output_error
from .targets import compressible_linears, replace_linear

METHODS = ("plain", "whitened", "asvd")


@dataclass(frozen=True)
class FactorizeConfig:
    targets: tuple[str, ...] = ("linears",)
    method: str = "whitened"
    ranks: RankPolicy = RankPolicy()
    asvd_alpha: float = 0.5
    factor_dtype: str | None = None  # default: the weight's dtype
    damping: float = 1e-6
    # weight of each sequence's first token in XᵀX (see QuantizeConfig.sink_weight);
    # 1 measured best for SVD: svd-90 perplexity 58.4 at weight 1, 70.7 at 32
    sink_weight: float = 1.0


def input_transform(
    method: str, xtx: torch.Tensor | None, alpha: float, damping: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(S, S⁻¹) for the method, or None for the identity."""
    if method == "plain":
        return None
    xtx = xtx.double()
    if method == "asvd":
        d = xtx.diagonal().clamp_min(0).sqrt().pow(alpha)
        d = d.clamp_min(d.max() * 1e-6)
        return torch.diag(d), torch.diag(1.0 / d)
    evals, evecs = torch.linalg.eigh(xtx)
    evals = evals.clamp_min(evals.max() * damping)
    root = evals.sqrt()
    return evecs * root, (evecs / root).T


@torch.no_grad()
def svd_of(weight: torch.Tensor, transform) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, σ, Qᵀ·S⁻¹) with W·S = P·diag(σ)·Qᵀ."""
    w = weight.double()
    if transform is None:
        p, s, qt = torch.linalg.svd(w, full_matrices=False)
        return p, s, qt
    scale, inverse = transform
    p, s, qt = torch.linalg.svd(w @ scale, full_matrices=False)
    return p, s, qt @ inverse


def truncate(p, s, right, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """U (out, r) and V (r, in), splitting σ evenly so both factors stay in range."""
    root = s[:rank].sqrt()
    u = (p[:, :rank] * root).to(dtype).contiguous()
    v = (root.unsqueeze(1) * right[:rank]).to(dtype).contiguous()
    return u, v


def factor_dtype(config, linear) -> torch.dtype:
    """The dtype U and V are stored in: the recipe's, else the weight's."""
    return getattr(torch, config.factor_dtype) if config.factor_dtype else linear.weight.dtype


def fixed_cost(model, policy: RankPolicy, candidates: list[Candidate]) -> float:
    """What the rest of the model costs, for whole-model `params`/`bytes` budgets."""
    if "bytes" in policy.budget:
        return module_bytes(model) - sum(c.dense_bytes for c in candidates)
    if "params" in policy.budget:
        return model_params(model) - sum(c.dense_params for c in candidates)
    return 0.0


def check_factorize(model, config: FactorizeConfig) -> None:
    for name in compressible_linears(model, config.targets):
        linear = model.get_submodule(name)
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(f"{name} is already compressed; factorize dense linears only")
        if config.ranks.rank is not None and config.ranks.rank > min(linear.weight.shape):
            out_f, in_f = linear.weight.shape
            raise ValueError(
                f"rank {config.ranks.rank} is larger than {name} ({out_f}x{in_f}) allows; "
                f"use a rank of at most {min(out_f, in_f)}"
            )


def factorize_(model, config: FactorizeConfig, stats: CalibrationStats | None, progress: bool = True) -> list[LayerReport]:
    check_factorize(model, config)
    names = compressible_linears(model, config.targets)
    if config.method != "plain" and stats is None:
        raise ValueError(f"factorize method '{config.method}' needs calibration statistics")
    transforms: dict[str, object] = {}
    spectra: dict[str, tuple] = {}
    candidates = []
    for name in tqdm(names, desc=f"factorize ({config.method} svd)", unit="layer", disable=not progress):
        linear = model.get_submodule(name)
        key = stats.key_of[name] if stats is not None else None
        if key not in transforms:
            xtx = stats.xtx(name, config.sink_weight) if stats is not None else None
            transforms[key] = input_transform(config.method, xtx, config.asvd_alpha, config.damping)
        started = time.perf_counter()
        p, s, right = svd_of(linear.weight, transforms[key])
        spectra[name] = (p, s, right, time.perf_counter() - started)
        candidates.append(
            Candidate(
                name=name,
                out_features=linear.out_features,
                in_features=linear.in_features,
                energy=(s**2).float(),
                dense_bytes=linear.weight.numel() * linear.weight.element_size(),
                factor_element_bytes=torch.empty(0, dtype=factor_dtype(config, linear)).element_size(),
            )
        )
    ranks = allocate(candidates, config.ranks, fixed_cost(model, config.ranks, candidates))

    reports = []
    for cand in candidates:
        name = cand.name
        linear = model.get_submodule(name)
        p, s, right, seconds = spectra.pop(name)
        rank = ranks[name]
        if rank is None:  # factorizing does not pay: stays dense, and the report says so
            kept = LayerReport.compare(name, linear, linear, 0.0, seconds, step="factorize")
            kept.operator = "dense (factorizing does not pay at its allocated rank)"
            reports.append(kept)
            continue
        started = time.perf_counter()
        u, v = truncate(p, s, right, rank, factor_dtype(config, linear))
        new = CompressedLinear(linear.in_features, linear.out_features, None, u, Projection(v), bias=linear.bias)
        err = output_error(linear.weight, new.to_dense(), stats.xtx(name) if stats else None)
        replace_linear(model, name, new)
        reports.append(
            LayerReport.compare(name, linear, new, err, seconds + time.perf_counter() - started, step="factorize")
        )
    return reports
