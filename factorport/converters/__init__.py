"""HF model -> compressed graph. Converters change modules in memory and
never write files; each recipe step is a config dataclass plus a function
`step_(model, config, stats) -> [LayerReport]` (torchao's `quantize_` shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .budget import BudgetConfig, budget_, check_budget
from .calibration import CalibrationConfig, CalibrationStats, calibrate
from .correct import CorrectConfig, check_correct, correct_
from .factorize import FactorizeConfig, check_factorize, factorize_
from .llamacpp import LlamaCppConfig, check_llamacpp, llamacpp_
from .quantize import QuantizeConfig, check_quantize, quantize_
from .report import LayerReport
from .share import ShareConfig, check_share, share_
from .sparsify import SparsifyConfig, check_sparsify, sparsify_
from .targets import compressible_linears, in_scope


@dataclass(frozen=True)
class Step:
    config: type  # the dataclass a recipe fills
    run: Callable  # run(model, config, stats, progress=...) -> [LayerReport]
    check: Callable  # check(model, config): what shapes alone rule out
    needs_originals: bool = False  # run also takes originals={name: dense weight before any step}
    # why the step must see every layer at once (None: it works one layer at a time)
    whole_model: Callable = lambda config: None


def _rank_budget(config) -> str | None:
    if config.ranks.budget:
        return f"its ranks come from one budget ({next(iter(config.ranks.budget))}) over all layers"
    return None


def _share_whole_model(config) -> str | None:
    if config.across_layers > 1:
        return f"it shares one V across {config.across_layers} layers"
    return _rank_budget(config)


STEPS = {
    "factorize": Step(FactorizeConfig, factorize_, check_factorize, whole_model=_rank_budget),
    "share": Step(ShareConfig, share_, check_share, whole_model=_share_whole_model),
    "quantize": Step(QuantizeConfig, quantize_, check_quantize),
    "sparsify": Step(SparsifyConfig, sparsify_, check_sparsify),
    "correct": Step(CorrectConfig, correct_, check_correct, needs_originals=True, whole_model=_rank_budget),
    "budget": Step(BudgetConfig, budget_, check_budget, whole_model=lambda c: "it spreads one byte budget over all layers"),
    "llamacpp": Step(LlamaCppConfig, llamacpp_, check_llamacpp, whole_model=lambda c: "llama.cpp quantizes the whole model in one call"),
}


def whole_model_reason(steps) -> str | None:
    """Why these steps cannot run one layer at a time, or None when they can."""
    for i, (name, config) in enumerate(steps):
        reason = STEPS[name].whole_model(config)
        if reason:
            return f"step {i + 1} ({name}): {reason}"
    return None


def check(model, steps) -> None:
    """Fail before calibration on what the shapes alone rule out: targets that
    match nothing, a rank larger than a matrix, a group size that does not divide."""
    from ..errors import FactorportError

    for i, (name, config) in enumerate(steps):
        try:
            STEPS[name].check(model, config)
        except ValueError as exc:
            raise FactorportError(f"step {i + 1} ({name}): {exc}") from exc


def _dense_weights(model) -> dict:
    import torch

    return {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and in_scope(n) and not m.weight.is_meta
    }


def apply(model, steps, stats: CalibrationStats | None = None, progress: bool = True) -> list[LayerReport]:
    """Run recipe steps `[(name, config), ...]` on `model` in place (on the
    linears of the current `targets.scope`; a step with none there is skipped)."""
    from ..errors import FactorportError

    originals = _dense_weights(model) if any(STEPS[name].needs_originals for name, _ in steps) else None
    reports: list[LayerReport] = []
    for i, (name, config) in enumerate(steps):
        if not compressible_linears(model, config.targets):
            continue  # nothing of this scope is targeted
        if progress:
            print(f"factorport: step {i + 1}/{len(steps)}: {name}")
        step = STEPS[name]
        extra = {"originals": originals} if step.needs_originals else {}
        try:
            reports += step.run(model, config, stats, progress=progress, **extra)
        except ValueError as exc:  # a rank, group size or budget that does not fit
            raise FactorportError(f"step {i + 1} ({name}): {exc}") from exc
    return reports


__all__ = [
    "BudgetConfig",
    "budget_",
    "apply",
    "check",
    "whole_model_reason",
    "STEPS",
    "CalibrationConfig",
    "CalibrationStats",
    "CorrectConfig",
    "FactorizeConfig",
    "LayerReport",
    "QuantizeConfig",
    "ShareConfig",
    "SparsifyConfig",
    "calibrate",
    "correct_",
    "factorize_",
    "quantize_",
    "share_",
    "sparsify_",
]
