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

from .calibration import CalibrationStats
from .lowrank import Allocation, Spectrum, Whitening, attach_factors, candidate, factor_dtype, input_transform, low_rank_, svd_of, units_of
from .ranks import RankPolicy
from .report import LayerReport
from .targets import compressible_linears

METHODS = ("plain", "whitened", "asvd")


@dataclass(frozen=True)
class FactorizeConfig:
    targets: tuple[str, ...] = ("linears",)
    method: str = "whitened"
    ranks: RankPolicy = RankPolicy()
    asvd_alpha: float = 0.5
    factor_dtype: str | None = None  # default: the weight's dtype
    damping: float = 1e-6  # whitening: fraction of mean(diag XᵀX) added to the diagonal
    # weight of each sequence's first token in XᵀX (see QuantizeConfig.sink_weight);
    # 1 measured best for SVD: svd-90 perplexity 58.4 at weight 1, 70.7 at 32
    sink_weight: float = 1.0


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


def factorize_(
    model, config: FactorizeConfig, stats: CalibrationStats | None, progress: bool = True, allocation: Allocation | None = None
) -> list[LayerReport]:
    check_factorize(model, config)
    if config.method != "plain" and stats is None:
        raise ValueError(f"factorize method '{config.method}' needs calibration statistics")
    transforms: dict[str, Whitening | None] = {}  # per input: q, k and v share theirs

    def decompose(unit: tuple[str, ...]) -> Spectrum:
        (name,) = unit
        linear = model.get_submodule(name)
        key = stats.key_of[name] if stats is not None else None
        if key not in transforms:
            xtx = stats.xtx(name, config.sink_weight) if stats is not None else None
            transforms[key] = input_transform(config.method, xtx, config.asvd_alpha, config.damping)
        started = time.perf_counter()
        p, s, right = svd_of(linear.weight, transforms[key])
        dense_bytes = linear.weight.numel() * linear.weight.element_size()
        return Spectrum(unit, p, s, right, candidate(name, p, right, s, dense_bytes, factor_dtype(config, linear)), time.perf_counter() - started)

    def attach(sp: Spectrum, rank: int | None) -> list[LayerReport]:
        return attach_factors(model, sp, rank, factor_dtype(config, model.get_submodule(sp.unit[0])), "factorize", stats)

    units = units_of(model, config.targets, grouped=False)
    return low_rank_(model, units, decompose, attach, config.ranks, f"factorize ({config.method} svd)", progress, allocation=allocation)
