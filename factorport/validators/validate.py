"""`factorport validate`: is every exported artifact of an output directory
the model the torch reference is?

Order: the manifest's sha256 of every file first (a changed or missing file
fails before anything runs); then the torch reference (the safetensors
artifact) and every requested backend score the same token windows, and each
backend's logits are compared with the reference's window by window; the
original (uncompressed) model's perplexity on the same windows puts the
numbers in context. The result is a plain dict (schema in
docs/validation.md, `SCHEMA` below) that reports are written from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import FactorportError
from ..formats.manifest import read_manifest, verify_manifest
from .backends import available_backends, open_backend, resolve
from .parity import ParityAccumulator
from .perplexity import perplexity, text_windows
from .thresholds import checks_for

SCHEMA_VERSION = "factorport.validation/1"

@dataclass
class ValidateConfig:
    text: Path
    backends: list[str] | None = None  # None: every backend whose artifact exists (torch is the reference)
    windows: int = 8
    seq_len: int = 512
    against: str | None = None  # the original model; None: the source named in the manifest
    thresholds: dict[str, float] = field(default_factory=dict)
    options: dict[str, dict] = field(default_factory=dict)  # per backend, e.g. {"onnxruntime": {"threads": 2}}
    progress: bool = True


def resolve_backends(output: Path, names: list[str] | None) -> list[tuple[str, str, dict]]:
    """(label, backend, options) for each backend to validate."""
    if names is None:
        names = [b for b in available_backends(output) if b != "torch"]
    resolved = []
    for name in names:
        backend, options = resolve(name)
        if backend != "torch":
            resolved.append((name, backend, options))
    return resolved


def validate(output: str | Path, config: ValidateConfig) -> dict:
    output = Path(output)
    result = {"schema": SCHEMA_VERSION, "artifact": str(output), "text": str(config.text), "windows": 0, "seq_len": config.seq_len}
    problems = verify_manifest(output)
    result["manifest"] = {"passed": not problems, "problems": problems}
    result["reference"], result["backends"] = None, {}
    if problems:  # nothing runs on files that are not what was written
        return _finish(result)

    thresholds = {**_recipe_thresholds(output), **config.thresholds}
    targets = resolve_backends(output, config.backends)
    reference = open_backend("torch", output)
    windows = text_windows(reference.tokenize, config.text, config.windows, config.seq_len)
    result["windows"] = len(windows)

    runtimes, accumulators = {}, {}
    for label, backend, options in targets:
        options = {**options, **config.options.get(backend, {})}
        entry = {"backend": backend, "options": options, "error": None}
        result["backends"][label] = entry
        try:
            runtimes[label] = open_backend(backend, output, **options)
            accumulators[label] = ParityAccumulator()
        except FactorportError as exc:
            entry["error"] = str(exc)
        entry["checks"] = checks_for(backend, options, thresholds)

    for ids in tqdm(windows, desc="validate", unit="win", disable=not config.progress):
        ref_logits = reference.logits(ids)
        for label, runtime in list(runtimes.items()):
            try:
                accumulators[label].add(ref_logits, runtime.logits(ids), ids)
            except (FactorportError, ValueError, RuntimeError) as exc:
                result["backends"][label]["error"] = f"{type(exc).__name__}: {exc}"
                del runtimes[label]

    ref_metrics = None
    for label, entry in result["backends"].items():
        checks = entry.pop("checks")
        if entry["error"] is None:
            metrics = accumulators[label].metrics()
            ref_metrics = ref_metrics or metrics["reference_perplexity"]
            entry.update({k: v for k, v in metrics.items() if k != "reference_perplexity"})
            entry["checks"] = [
                {"check": name, "value": entry[check.metric], "threshold": check.describe(), "passed": check.passes(entry[check.metric])}
                for name, check in checks.items()
            ]
        else:
            entry["checks"] = [{"check": "runs", "value": entry["error"], "threshold": "loads and scores every window", "passed": False}]
        entry["passed"] = all(c["passed"] for c in entry["checks"])

    reference_ppl = ref_metrics if ref_metrics is not None else perplexity(reference.logits, windows, progress=False)
    original, original_ppl = _original_perplexity(output, config, windows, reference)
    result["reference"] = {"backend": "torch", "perplexity": reference_ppl, "original": original, "original_perplexity": original_ppl}
    return _finish(result)


def _finish(result: dict) -> dict:
    failures = [f"manifest: {p}" for p in result["manifest"]["problems"]]
    for label, entry in result["backends"].items():
        failures += [f"{label}: {c['check']} = {_fmt(c['value'])} (needs {c['threshold']})" for c in entry["checks"] if not c["passed"]]
    result["failures"] = failures
    result["passed"] = not failures
    return result


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _recipe_thresholds(output: Path) -> dict[str, float]:
    """Overrides written in the recipe the artifact was converted with."""
    from ..recipe import parse_recipe

    recipe = read_manifest(output).get("recipe") or {}
    return parse_recipe(recipe["text"], recipe.get("name", "recipe")).thresholds if recipe.get("text") else {}


def _original_perplexity(output: Path, config: ValidateConfig, windows, reference) -> tuple[str | None, float | None]:
    """Perplexity of the uncompressed model on the same windows (skipped when
    its tokenizer cuts the text differently: the numbers would not compare)."""
    from ..loading import load_model
    from .backends.torch_backend import TorchBackend

    source = read_manifest(output).get("source") or {}
    name = config.against or (None if source.get("kind") == "default" else source.get("path"))
    model, tokenizer, loaded = load_model(name)
    original = TorchBackend(model, tokenizer)
    if text_windows(original.tokenize, config.text, len(windows), config.seq_len)[0].tolist() != windows[0].tolist():
        return loaded.name, None
    return loaded.name, perplexity(original.logits, windows, progress=config.progress)


def write_json(result: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
