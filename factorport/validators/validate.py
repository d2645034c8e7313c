"""`factorport validate`: is every exported artifact of an output directory
the model the torch reference is?

Order: the manifest's sha256 of every file first (a changed or missing
file fails before anything runs; `verify=False` skips it); then the torch
reference (the safetensors artifact) and every requested backend score the
same token windows, and each backend's logits are compared with the
reference's window by window; the original (uncompressed) model's
perplexity on the same windows puts the numbers in context.

Every native runtime runs in its own child process (backends/isolated.py):
one that crashes or hangs fails its own `runs` check and the report still
holds the others. Threshold overrides are those stored in the manifest at
convert time (`validation.thresholds`), then the caller's. The result is a
plain dict (schema in docs/validation.md) that reports are written from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import FactorportError
from ..formats.manifest import MANIFEST, read_manifest, verify_manifest
from .backends import available_backends, open_backend, resolve, written_options
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
    verify: bool = True  # False: skip the manifest's hashes (--no-verify)
    timeout: float | None = None  # seconds one call of an isolated backend may take (None: the default)


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
    """Check every requested backend of `output`; a backend that fails to
    load, crashes or hangs fails its own `runs` check and the others go on."""
    output = Path(output)
    result = {"schema": SCHEMA_VERSION, "artifact": str(output), "text": str(config.text), "windows": 0, "seq_len": config.seq_len}
    info = _read_manifest_once(output, config.verify)
    problems = verify_manifest(output, info) if config.verify else []
    result["manifest"] = {"passed": not problems, "problems": problems, "checked": config.verify}
    result["reference"], result["backends"] = None, {}
    if problems:  # nothing runs on files that are not what was written
        return _finish(result)

    thresholds = {**stored_thresholds(info, output), **config.thresholds}
    targets = resolve_backends(output, config.backends)
    reference = open_backend("torch", output)
    windows = text_windows(reference, config.text, config.windows, config.seq_len)
    result["windows"] = len(windows)
    runtimes, accumulators = {}, {}
    try:
        for label, backend, options in targets:
            options = {**written_options(backend, output), **options, **config.options.get(backend, {})}
            entry = {"backend": backend, "options": options, "error": None}
            result["backends"][label] = entry
            entry["checks"] = checks_for(backend, options, thresholds)  # a bad threshold fails before any runtime starts
            try:
                runtimes[label] = open_backend(backend, output, timeout=config.timeout, **options)
                accumulators[label] = ParityAccumulator()
            except FactorportError as exc:
                entry["error"] = str(exc)
        _score(windows, reference, runtimes, accumulators, result["backends"], config.progress)
    finally:
        for runtime in runtimes.values():
            _close(runtime)

    ref_metrics = _checked(result["backends"], accumulators)
    reference_ppl = ref_metrics if ref_metrics is not None else perplexity(reference.logits, windows, progress=False)
    original, original_ppl = _original_perplexity(info, config, windows)
    result["reference"] = {"backend": "torch", "perplexity": reference_ppl, "original": original, "original_perplexity": original_ppl}
    return _finish(result)


def _score(windows, reference, runtimes: dict, accumulators: dict, entries: dict, progress: bool) -> None:
    """Every window through the reference and every runtime still standing;
    a runtime that fails (or whose process dies) is dropped with its error."""
    for ids in tqdm(windows, desc="validate", unit="win", disable=not progress):
        ref_logits = reference.logits(ids)
        for label, runtime in list(runtimes.items()):
            try:
                accumulators[label].add(ref_logits, runtime.logits(ids), ids)
            except FactorportError as exc:
                entries[label]["error"] = str(exc)
            except (ValueError, RuntimeError) as exc:
                entries[label]["error"] = f"{type(exc).__name__}: {exc}"
            else:
                continue
            _close(runtimes.pop(label))


def _close(runtime) -> None:
    try:
        getattr(runtime, "close", lambda: None)()
    except Exception:  # noqa: BLE001 - closing a broken runtime must not hide its error
        pass


def _checked(entries: dict, accumulators: dict) -> float | None:
    """Fill each entry's metrics and checks; returns the reference perplexity
    (computed alongside the parity metrics) when any backend ran."""
    ref_metrics = None
    for label, entry in entries.items():
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
    return ref_metrics


def _finish(result: dict) -> dict:
    failures = [f"manifest: {p}" for p in result["manifest"]["problems"]]
    for label, entry in result["backends"].items():
        failures += [f"{label}: {c['check']} = {_fmt(c['value'])} (needs {c['threshold']})" for c in entry["checks"] if not c["passed"]]
    result["failures"] = failures
    result["passed"] = not failures
    return result


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _read_manifest_once(output: Path, verify: bool) -> dict:
    """The manifest (required unless its check is skipped), read once for
    everything validate takes from it: thresholds and the source model."""
    if verify or (output / MANIFEST).is_file():
        return read_manifest(output)
    return {}


def stored_thresholds(info: dict, output: Path) -> dict[str, float]:
    """The recipe's threshold overrides, stored in the manifest at convert
    time under validation.thresholds (none stored: the defaults)."""
    stored = (info.get("validation") or {}).get("thresholds") or {}
    if not isinstance(stored, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in stored.values()):
        raise FactorportError(f"{output / MANIFEST}: validation.thresholds must map metric names to numbers; re-convert the artifact")
    return {str(k): float(v) for k, v in stored.items()}


def _original_perplexity(info: dict, config: ValidateConfig, windows) -> tuple[str | None, float | None]:
    """Perplexity of the uncompressed model on the same windows (skipped when
    its tokenizer cuts the text differently: the numbers would not compare)."""
    from ..loading import load_model, source_argument
    from .backends.torch_backend import TorchBackend

    source = info.get("source") or {}
    model, tokenizer, loaded = load_model(config.against or source_argument(source))
    original = TorchBackend(model, tokenizer)
    if text_windows(original, config.text, len(windows), config.seq_len)[0].tolist() != windows[0].tolist():
        return loaded.name, None
    return loaded.name, perplexity(original.logits, windows, progress=config.progress)


def write_json(result: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
