"""HF model -> compressed graph. Converters change modules in memory and
never write files; each recipe step is a config dataclass plus a function
`step_(model, config, stats) -> [LayerReport]` (torchao's `quantize_` shape).
"""

from __future__ import annotations

from .calibration import CalibrationConfig, CalibrationStats, calibrate
from .factorize import FactorizeConfig, check_factorize, factorize_
from .quantize import QuantizeConfig, check_quantize, quantize_
from .share import ShareConfig, check_share, share_
from .report import LayerReport

# step name -> (config dataclass, the step, a check that needs only shapes)
STEPS = {
    "factorize": (FactorizeConfig, factorize_, check_factorize),
    "quantize": (QuantizeConfig, quantize_, check_quantize),
    "share": (ShareConfig, share_, check_share),
}


def check(model, steps) -> None:
    """Fail before calibration on what the shapes alone rule out: targets that
    match nothing, a rank larger than a matrix, a group size that does not divide."""
    from ..errors import FactorportError

    for i, (name, config) in enumerate(steps):
        try:
            STEPS[name][2](model, config)
        except ValueError as exc:
            raise FactorportError(f"step {i + 1} ({name}): {exc}") from exc



def apply(model, steps, stats: CalibrationStats | None = None, progress: bool = True) -> list[LayerReport]:
    """Run recipe steps `[(name, config), ...]` on `model` in place."""
    from ..errors import FactorportError

    reports: list[LayerReport] = []
    for i, (name, config) in enumerate(steps):
        if progress:
            print(f"factorport: step {i + 1}/{len(steps)}: {name}")
        try:
            reports += STEPS[name][1](model, config, stats, progress=progress)
        except ValueError as exc:  # a rank, group size or budget that does not fit
            raise FactorportError(f"step {i + 1} ({name}): {exc}") from exc
    return reports


__all__ = [
    "apply",
    "check",
    "STEPS",
    "CalibrationConfig",
    "CalibrationStats",
    "FactorizeConfig",
    "LayerReport",
    "QuantizeConfig",
    "ShareConfig",
    "calibrate",
    "factorize_",
    "quantize_",
    "share_",
]
