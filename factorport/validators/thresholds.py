"""Pass/fail limits of `factorport validate`, per backend and numeric path.

Exact fp32 paths (onnxruntime with MatMulNBits accuracy_level 0 computes the
same dequantized weights in fp32) are held tight; paths that change the
arithmetic (int8 activations, llama.cpp's quantized activations and its own
kernels) are held to statistical limits. Documented in docs/validation.md;
overridable per check by a recipe's `validate:` section or `--threshold`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FactorportError


@dataclass(frozen=True)
class Check:
    metric: str  # a key of ParityAccumulator.metrics()
    limit: float
    at_least: bool = False  # True: value >= limit passes (agreement); else value <= limit

    def passes(self, value: float) -> bool:
        return value >= self.limit if self.at_least else value <= self.limit

    def describe(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.limit:g}"


def _checks(max_rel: float | None, top1: float, kl: float | None, ppl: float) -> dict[str, Check]:
    checks = {
        "top1_agreement": Check("top1_agreement", top1, at_least=True),
        "perplexity_rel_diff": Check("perplexity_rel_diff", ppl),
    }
    if max_rel is not None:
        checks["max_abs_logit_diff_rel"] = Check("max_abs_logit_diff_rel", max_rel)
    if kl is not None:
        checks["mean_kl"] = Check("mean_kl", kl)
    return checks


# numeric path -> checks. The path of an artifact is chosen by `numeric_path`.
# The statistical limits sit under what a correct artifact measures on
# SmolLM2-135M (onnxruntime int8 activations: top-1 95.3%, KL 5.5e-3;
# llama.cpp Q4_0 + adapter: top-1 96.3%, KL 3.7e-3, both quantizing
# activations to 8 bits in every product) and far from what one corrupted
# tensor does (top-1 < 50%, KL > 1).
DEFAULTS: dict[str, dict[str, Check]] = {
    "onnxruntime-fp32": _checks(max_rel=1e-3, top1=1.0, kl=1e-4, ppl=0.005),
    "onnxruntime-int8": _checks(max_rel=None, top1=0.93, kl=1e-2, ppl=0.01),
    # onnxruntime-genai runs the same graph through its own loop (at the accuracy_level written in it)
    "onnxruntime-genai": _checks(max_rel=1e-3, top1=1.0, kl=1e-4, ppl=0.005),
    "llama.cpp": _checks(max_rel=None, top1=0.94, kl=1e-2, ppl=0.01),
}


def numeric_path(backend: str, options: dict) -> str:
    if backend in ("onnxruntime", "onnxruntime-genai") and options.get("accuracy_level", 0) >= 4:
        return "onnxruntime-int8"
    if backend == "onnxruntime":
        return "onnxruntime-fp32"
    if backend not in DEFAULTS:
        raise FactorportError(f"no validation thresholds for backend {backend!r}")
    return backend


METRICS = ("max_abs_logit_diff_rel", "mean_kl", "top1_agreement", "perplexity_rel_diff")


def checks_for(backend: str, options: dict, overrides: dict[str, float] | None = None) -> dict[str, Check]:
    """The default checks of `backend`'s numeric path with `overrides` applied.
    An override key is a metric ("top1_agreement") or "scope:metric" where
    scope is a backend or a numeric path ("llama.cpp:mean_kl")."""
    path = numeric_path(backend, options)
    checks = dict(DEFAULTS[path])
    for key, limit in (overrides or {}).items():
        scope, _, metric = key.rpartition(":")
        if metric not in METRICS:
            raise FactorportError(f"unknown threshold {key!r}; use one of {', '.join(METRICS)}, optionally as 'backend:metric'")
        if scope and scope not in (backend, path):
            continue
        checks[metric] = Check(metric, float(limit), at_least=metric == "top1_agreement")
    return checks
