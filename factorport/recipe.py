"""YAML recipes: a list of converter steps, validated field by field.

    name: w4-gptq
    description: int4 symmetric, groups of 64, GPTQ
    calibration: {samples: 128, seq_len: 512, mode: sequential}   # optional
    steps:
      - quantize: {method: gptq, bits: 4, group_size: 64, symmetric: true}
    validate: {thresholds: {"llama.cpp:top1_agreement": 0.95}}   # optional

`steps: []` with a calibration section keeps the model as it is and only
collects the statistics (written as llama.cpp's importance matrix by the
GGUF export). Every error names the recipe, the field and what is allowed. A recipe is
given by a preset name (a file in samples/recipes/) or a path.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .converters import STEPS
from .converters.calibration import MODES
from .converters.ranks import BUDGET_KEYS, WEIGHTINGS, RankPolicy
from .errors import FactorportError
from .ops.quant import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

# Presets live in the repository (samples/recipes); factorport is installed editable.
PRESET_DIR = Path(__file__).resolve().parent.parent / "samples" / "recipes"

# Allowed values of enumerated fields, by field name.
CHOICES = {
    "bits": SUPPORTED_BITS,
    "group_size": SUPPORTED_GROUP_SIZES,
    "weighting": WEIGHTINGS,
    "factor_dtype": (None, "float32", "float16", "bfloat16"),
}
TOP_LEVEL = ("name", "description", "calibration", "steps", "validate")
CALIBRATION_KEYS = {"samples": int, "seq_len": int, "mode": str}


@dataclass
class Recipe:
    name: str
    steps: list[tuple[str, object]]  # (step name, its config dataclass)
    description: str = ""
    calibration: dict = field(default_factory=dict)
    text: str = ""  # the YAML as given, kept in the manifest
    thresholds: dict[str, float] = field(default_factory=dict)  # `factorport validate` overrides

    @property
    def needs_calibration(self) -> bool:
        if not self.steps:  # statistics only
            return True
        return any(
            kind in ("share", "correct", "budget") or getattr(cfg, "method", "") in ("whitened", "asvd", "gptq", "wanda") or getattr(cfg, "imatrix", False)
            or getattr(cfg, "equal_bytes", False)
            for kind, cfg in self.steps
        )


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    path = Path(name_or_path)
    if not path.exists():
        if path.suffix in (".yaml", ".yml") or "/" in name_or_path:
            raise FactorportError(f"recipe file {name_or_path} does not exist")
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise FactorportError(
                f"unknown recipe '{name_or_path}'; presets: {', '.join(presets())}, or give a YAML path"
            )
    text = path.read_text()
    return parse_recipe(text, path.stem)


def parse_recipe(text: str, default_name: str = "recipe") -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise FactorportError(f"recipe {default_name}: not valid YAML{where}") from exc
    if not isinstance(data, dict):
        raise FactorportError(f"recipe {default_name}: expected a mapping with 'steps', got {type(data).__name__}")
    name = str(data.get("name", default_name))
    where = f"recipe {name}"
    _check_keys(data, TOP_LEVEL, where)
    calibration = data.get("calibration") or {}
    if not isinstance(calibration, dict):
        raise FactorportError(f"{where}: calibration: expected a mapping of {', '.join(CALIBRATION_KEYS)}")
    _check_keys(calibration, CALIBRATION_KEYS, f"{where}: calibration")
    for key, value in calibration.items():
        calibration[key] = _check_type(value, CALIBRATION_KEYS[key], f"{where}: calibration.{key}")
    if calibration.get("mode", MODES[0]) not in MODES:
        raise FactorportError(f"{where}: calibration.mode: {calibration['mode']!r} is not one of {', '.join(MODES)}")
    steps = data.get("steps")
    # `steps: []` with a calibration section: the model as it is, plus its
    # calibration statistics (llama.cpp's importance matrix, gguf/imatrix.gguf)
    if not isinstance(steps, list) or not (steps or calibration):
        raise FactorportError(
            f"{where}: steps: expected a non-empty list of steps ({', '.join(STEPS)}), "
            "or 'steps: []' with a calibration section for the statistics alone"
        )
    parsed = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or len(step) != 1:
            raise FactorportError(f"{where}: steps[{i}]: expected one mapping like '- quantize: {{...}}'")
        (kind, options), = step.items()
        if kind not in STEPS:
            raise FactorportError(f"{where}: steps[{i}]: unknown step '{kind}'; steps: {', '.join(STEPS)}")
        config_type = STEPS[kind].config
        parsed.append((kind, _build(config_type, options or {}, f"{where}: steps[{i}].{kind}")))
    thresholds = _thresholds(data.get("validate") or {}, where)
    return Recipe(name, parsed, str(data.get("description", "")), calibration, text, thresholds)


def _thresholds(validate, where: str) -> dict[str, float]:
    from .validators.thresholds import METRICS

    if not isinstance(validate, dict):
        raise FactorportError(f"{where}: validate: expected a mapping like {{thresholds: {{top1_agreement: 0.99}}}}")
    _check_keys(validate, ("thresholds",), f"{where}: validate")
    thresholds = validate.get("thresholds") or {}
    if not isinstance(thresholds, dict):
        raise FactorportError(f"{where}: validate.thresholds: expected a mapping of metric to limit")
    for key, value in thresholds.items():
        if str(key).rpartition(":")[2] not in METRICS:
            raise FactorportError(f"{where}: validate.thresholds.{key}: unknown metric; use {', '.join(METRICS)}, optionally as 'backend:metric'")
        thresholds[key] = _check_type(value, float, f"{where}: validate.thresholds.{key}")
    return thresholds


def _check_keys(data: dict, allowed, where: str) -> None:
    for key in data:
        if key not in allowed:
            raise FactorportError(f"{where}: unknown field '{key}'; allowed: {', '.join(allowed)}")


def _check_type(value, expected, where: str):
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise FactorportError(f"{where}: expected {expected.__name__}, got {value!r}")
    return value


def _build(config_type, options, where: str):
    if not isinstance(options, dict):
        raise FactorportError(f"{where}: expected a mapping of options")
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    _check_keys(options, fields, where)
    hints = typing.get_type_hints(config_type)
    values = {}
    for key, value in options.items():
        values[key] = _convert(hints[key], value, f"{where}.{key}")
        items = values[key] if isinstance(values[key], tuple) else (values[key],)
        allowed = CHOICES.get(key) or _method_choices(config_type, key)
        for item in items:
            if isinstance(item, (int, float)) and not isinstance(item, bool) and item < 0:
                raise FactorportError(f"{where}.{key}: must not be negative, got {value!r}")
            if allowed and item not in allowed:
                shown = ", ".join(str(a) for a in allowed if a is not None)
                raise FactorportError(f"{where}.{key}: {item!r} is not one of {shown}")
    config = config_type(**values)
    return config


def _method_choices(config_type, key):
    if key != "method":
        return None
    import sys

    return getattr(sys.modules[config_type.__module__], "METHODS", None)


def _convert(hint, value, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is RankPolicy:
        return _rank_policy(value, where)
    if origin is tuple:  # tuple[T, ...]: a list, or a single value
        element = args[0]
        items = value if isinstance(value, list) else [value]
        if element is str and not all(isinstance(v, str) for v in items):
            raise FactorportError(f"{where}: expected a list of module-name patterns")
        return tuple(_check_type(v, element, f"{where}[{i}]") for i, v in enumerate(items))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    return _check_type(value, hint, where)


def _rank_policy(value, where: str) -> RankPolicy:
    if not isinstance(value, dict):
        raise FactorportError(f"{where}: expected a mapping with one of rank, ratio, energy, budget")
    _check_keys(value, [f.name for f in dataclasses.fields(RankPolicy)], where)
    chosen = [k for k in ("rank", "ratio", "energy", "budget") if k in value]
    if len(chosen) != 1:
        raise FactorportError(f"{where}: give exactly one of rank, ratio, energy, budget (got {chosen or 'none'})")
    kind = chosen[0]
    kwargs = dict(value)
    if kind == "rank":
        kwargs["rank"] = _check_type(value["rank"], int, f"{where}.rank")
        if kwargs["rank"] < 1:
            raise FactorportError(f"{where}.rank: must be at least 1, got {value['rank']}")
    elif kind in ("ratio", "energy"):
        v = _check_type(value[kind], float, f"{where}.{kind}")
        if not 0 < v <= 1:
            raise FactorportError(f"{where}.{kind}: must be in (0, 1], got {value[kind]}")
        kwargs[kind] = v
    else:
        budget = value["budget"]
        if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in BUDGET_KEYS:
            raise FactorportError(f"{where}.budget: expected one of {', '.join(BUDGET_KEYS)} with a number")
        (bkey, bval), = budget.items()
        bval = _check_type(bval, float, f"{where}.budget.{bkey}")
        if bval <= 0 or bkey == "params_ratio" and bval > 1:
            raise FactorportError(f"{where}.budget.{bkey}: out of range: {budget[bkey]}")
        kwargs["budget"] = {bkey: bval}
    if "weighting" in value and value["weighting"] not in WEIGHTINGS:
        raise FactorportError(f"{where}.weighting: {value['weighting']!r} is not one of {', '.join(WEIGHTINGS)}")
    if "multiple" in value:
        kwargs["multiple"] = _check_type(value["multiple"], int, f"{where}.multiple")
        if kwargs["multiple"] < 1:
            raise FactorportError(f"{where}.multiple: must be at least 1, got {value['multiple']}")
    return RankPolicy(**kwargs)
