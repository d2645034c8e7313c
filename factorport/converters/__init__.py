"""HF model -> compressed graph. Converters change modules in memory and
never write files; each recipe step is a config dataclass plus a function
`step_(model, config, stats) -> [LayerReport]` (torchao's `quantize_` shape).

How each step meets the layer-by-layer conversion (`pipeline`):

* one layer at a time — quantize, sparsify, and factorize / share / correct
  with a fixed, ratio or energy rank;
* two passes — a step that spreads one budget over every layer (`spread`:
  factorize / share / correct with a rank budget, budget): a scoring pass
  over the layers (statistics from the uncompressed model) collects every
  unit's options, one solve allocates them, and the conversion proper runs
  with that allocation fixed (statistics as the recipe says);
* whole model in memory (`whole_model`) — share across layers (one V for
  several layers), llamacpp (one call quantizes everything), and a recipe
  with two budgets over every layer (the second's options depend on the first's allocation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .budget import BudgetConfig, budget_, check_budget, solve_budget
from .calibration import CalibrationConfig, CalibrationStats, calibrate
from .correct import CorrectConfig, check_correct, correct_
from .factorize import FactorizeConfig, check_factorize, factorize_
from .llamacpp import LlamaCppConfig, check_llamacpp, llamacpp_
from .lowrank import Allocation, solve_ranks
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
    # spread(config): None, or solve(model, options) -> allocation when the step
    # spreads one budget over every layer (run then also takes allocation=)
    spread: Callable = lambda config: None


def _rank_budget(corrections: bool = False) -> Callable:
    def spread(config):
        if not config.ranks.budget:
            return None
        return lambda model, options: solve_ranks(model, config.ranks, options, corrections)

    return spread


def _share_spread(config):
    return None if config.across_layers > 1 else _rank_budget()(config)


def _share_whole_model(config) -> str | None:
    return f"it shares one V across {config.across_layers} layers" if config.across_layers > 1 else None


STEPS = {
    "factorize": Step(FactorizeConfig, factorize_, check_factorize, spread=_rank_budget()),
    "share": Step(ShareConfig, share_, check_share, whole_model=_share_whole_model, spread=_share_spread),
    "quantize": Step(QuantizeConfig, quantize_, check_quantize),
    "sparsify": Step(SparsifyConfig, sparsify_, check_sparsify),
    "correct": Step(CorrectConfig, correct_, check_correct, needs_originals=True, spread=_rank_budget(corrections=True)),
    "budget": Step(BudgetConfig, budget_, check_budget, spread=lambda c: lambda model, options: solve_budget(model, c, options)),
    "llamacpp": Step(LlamaCppConfig, llamacpp_, check_llamacpp, whole_model=lambda c: "llama.cpp quantizes the whole model in one call"),
}


def _spreading(steps) -> list[int]:
    return [i for i, (name, config) in enumerate(steps) if STEPS[name].spread(config)]


def spreading_step(steps) -> int | None:
    """The index of the step that spreads one budget over every layer, if any."""
    spreading = _spreading(steps)
    return spreading[0] if spreading else None


def whole_model_reason(steps) -> str | None:
    """Why these steps cannot run one layer at a time, or None when they can."""
    for i, (name, config) in enumerate(steps):
        reason = STEPS[name].whole_model(config)
        if reason:
            return f"step {i + 1} ({name}): {reason}"
    spreading = _spreading(steps)
    if len(spreading) > 1:
        return f"steps {' and '.join(str(i + 1) for i in spreading)} each spread a budget over all layers"
    return None


def solve(model, steps, allocation: Allocation) -> Allocation:
    """The spreading step's allocation from the scoring pass's options."""
    index = spreading_step(steps)
    name, config = steps[index]
    return Allocation(chosen=STEPS[name].spread(config)(model, allocation.options))


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


def apply(
    model, steps, stats: CalibrationStats | None = None, progress: bool = True, allocation: Allocation | None = None
) -> list[LayerReport]:
    """Run recipe steps `[(name, config), ...]` on `model` in place (on the
    linears of the current `targets.scope`; a step with none there is skipped).
    `allocation` goes to the step that spreads a budget over every layer; a
    scoring one stops the recipe there (what follows depends on its choice)."""
    from ..errors import FactorportError

    originals = _dense_weights(model) if any(STEPS[name].needs_originals for name, _ in steps) else None
    spreading = spreading_step(steps) if allocation is not None else None
    reports: list[LayerReport] = []
    for i, (name, config) in enumerate(steps):
        if not compressible_linears(model, config.targets):
            continue  # nothing of this scope is targeted
        if progress:
            print(f"factorport: step {i + 1}/{len(steps)}: {name}")
        step = STEPS[name]
        extra = {"originals": originals} if step.needs_originals else {}
        if i == spreading:
            extra["allocation"] = allocation
        try:
            reports += step.run(model, config, stats, progress=progress, **extra)
        except ValueError as exc:  # a rank, group size or budget that does not fit
            raise FactorportError(f"step {i + 1} ({name}): {exc}") from exc
        if i == spreading and allocation.scoring:
            break
    return reports


__all__ = [
    "Allocation",
    "BudgetConfig",
    "budget_",
    "apply",
    "check",
    "solve",
    "spreading_step",
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
