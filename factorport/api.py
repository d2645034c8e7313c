"""The Python API; the command line is a thin layer over it.

    import factorport
    out = factorport.convert(None, recipe="w4-gptq", output="out/w4")   # embedded model
    model, tokenizer = factorport.load(out)                               # a transformers model
    factorport.evaluate(out)                                              # perplexity in torch
    factorport.export(out, ["onnx", "gguf"])                              # add runtime artifacts
    factorport.evaluate(out, backend="onnxruntime")                       # ... and run them

Data flows one way: load -> calibrate -> convert -> write -> evaluate.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from . import __version__
from .converters import CalibrationConfig, apply, calibrate, check
from .errors import FactorportError
from .formats import exporter, manifest, safetensors_dir
from .formats.safetensors_dir import SUBDIR as SAFETENSORS
from .formats.safetensors_dir import find_artifact
from .loading import load_model
from .recipe import Recipe, load_recipe

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
DEFAULT_CALIB = SHARED_DATA / "wiki.valid.tokens"
DEFAULT_TEXT = SHARED_DATA / "wiki.test.raw"


def refuse_existing(output: Path, force: bool) -> None:
    if Path(output).exists() and not force:
        raise FactorportError(f"output {output} already exists; pass --force to overwrite it")


@contextmanager
def staged_output(output: Path, force: bool):
    """Yield a temporary directory beside `output`; on success it becomes
    `output` (replacing an old one only with `force`); on failure it is removed,
    so no partial output is ever left."""
    output = Path(output)
    refuse_existing(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield tmp
        if output.exists():
            trash = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, trash)
            os.replace(tmp, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def convert(
    model: str | None = None,
    recipe: str | Recipe = "w4-rtn",
    output: str | Path = "factorport-out",
    calib: str | Path | None = None,
    samples: int | None = None,
    seq_len: int | None = None,
    force: bool = False,
    progress: bool = True,
    formats: Sequence[str] = (),
    export_options: dict[str, dict] | None = None,
    step_options: dict[str, dict] | None = None,
) -> Path:
    """Compress `model` (None: the embedded default) with `recipe` and write
    OUTPUT/safetensors, OUTPUT/report/convert.json and OUTPUT/manifest.json,
    plus OUTPUT/<format> for each of `formats` ("onnx", "gguf"), exported with
    `export_options[format]`. `step_options[step]` overrides fields of every
    recipe step of that name (e.g. {"correct": {"ranks": ...}})."""
    formats = [f for f in formats if f != SAFETENSORS]
    exporters = {name: exporter(name) for name in formats}  # unknown names fail before any work
    output = Path(output)
    refuse_existing(output, force)  # before any work
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(str(recipe))
    recipe = _override_steps(recipe, step_options or {})
    started = time.perf_counter()
    hf_model, tokenizer, source = load_model(model)
    check(hf_model, recipe.steps)
    stats = None
    if recipe.needs_calibration:
        config = CalibrationConfig(
            source=str(calib or DEFAULT_CALIB),
            samples=samples or recipe.calibration.get("samples", 128),
            seq_len=seq_len or recipe.calibration.get("seq_len", 512),
        )
        stats = calibrate(hf_model, tokenizer, config, progress=progress)
    reports = apply(hf_model, recipe.steps, stats, progress=progress)
    with staged_output(output, force) as tmp:
        if progress:
            print(f"factorport: writing {output}")
        (tmp / SAFETENSORS).mkdir()
        safetensors_dir.save(hf_model, tokenizer, tmp / SAFETENSORS)
        (tmp / "report").mkdir()
        summary = {
            "recipe": recipe.name,
            "calibration": None if stats is None else {"source": stats.source, "tokens": stats.tokens, "seconds": round(stats.seconds, 2)},
            "seconds": round(time.perf_counter() - started, 2),
            "layers": [r.to_dict() for r in reports],
        }
        (tmp / "report" / "convert.json").write_text(json.dumps(summary, indent=2) + "\n")
        for name, export_to in exporters.items():
            _export_into(export_to, name, hf_model, tokenizer, tmp, (export_options or {}).get(name, {}), progress)
        manifest.write_manifest(
            tmp,
            {
                "factorport_version": __version__,
                "source": {"name": source.name, "kind": source.kind, "path": source.path},
                "recipe": {"name": recipe.name, "text": recipe.text},
            },
        )
    return output


def _override_steps(recipe: Recipe, options: dict[str, dict]) -> Recipe:
    import dataclasses

    present = {name for name, _ in recipe.steps}
    if options.get("correct") and "correct" not in present:  # a budget nothing would spend
        raise FactorportError(f"recipe {recipe.name} has no correct step to give an adapter budget to; pick a recipe with one")
    steps = [(name, _with_fields(cfg, options[name]) if options.get(name) else cfg) for name, cfg in recipe.steps]
    return dataclasses.replace(recipe, steps=steps)


def _with_fields(cfg, fields: dict):
    """`cfg` with `fields` replaced; a `ranks` budget replaces only how ranks
    are chosen, keeping the recipe's other rank settings (e.g. `multiple`)."""
    import dataclasses

    if "budget" in fields.get("ranks", {}):
        ranks = dataclasses.replace(cfg.ranks, rank=None, ratio=None, energy=None, budget=fields["ranks"]["budget"])
        fields = {**fields, "ranks": ranks}
    return dataclasses.replace(cfg, **fields)


def _export_into(export_to, name: str, model, tokenizer, output: Path, options: dict, progress: bool) -> None:
    if progress:
        print(f"factorport: exporting {name} to {output.name}/{name}")
    (output / name).mkdir()
    report = export_to(model, tokenizer, output / name, progress=progress, **options)
    (output / "report").mkdir(exist_ok=True)
    (output / "report" / f"export-{name}.json").write_text(json.dumps(report, indent=2) + "\n")


def export(
    path: str | Path,
    formats: Sequence[str],
    force: bool = False,
    progress: bool = True,
    export_options: dict[str, dict] | None = None,
) -> Path:
    """Add OUTPUT/<format> for each of `formats` to an existing factorport
    output, from its safetensors artifact; the manifest is re-hashed."""
    output = Path(path)
    if find_artifact(output) is None or not (output / SAFETENSORS).is_dir():
        raise FactorportError(f"{output} is not a factorport output directory (no {SAFETENSORS}/); convert first")
    problems = manifest.verify_manifest(output)
    if problems:
        raise FactorportError(f"{output} does not match its manifest ({problems[0]}); re-convert it")
    exporters = {name: exporter(name) for name in formats if name != SAFETENSORS}
    for name in exporters:
        refuse_existing(output / name, force)
    model, tokenizer = load(output)
    for name, export_to in exporters.items():
        with staged_output(output / name, force) as tmp:
            if progress:
                print(f"factorport: exporting {name} to {output}/{name}")
            report = export_to(model, tokenizer, tmp, progress=progress, **(export_options or {}).get(name, {}))
        (output / "report").mkdir(exist_ok=True)
        (output / "report" / f"export-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    manifest.refresh_manifest(output)
    return output


def load(path: str | Path):
    """(model, tokenizer) from a factorport output directory or its safetensors directory."""
    directory = find_artifact(path)
    if directory is None:
        raise FactorportError(f"{path} is not a factorport artifact (no {SAFETENSORS}/{safetensors_dir.WEIGHTS})")
    return safetensors_dir.load(directory)


def load_any(model_or_dir: str | None):
    """A factorport artifact if `model_or_dir` is one, else a source model."""
    if model_or_dir is not None and find_artifact(model_or_dir) is not None:
        return load(model_or_dir)
    model, tokenizer, _ = load_model(model_or_dir)
    return model, tokenizer


def backend_perplexity(backend, text: str | Path | None = None, windows: int = 40, seq_len: int = 512, progress: bool = True) -> float:
    """Perplexity through any backend, on windows cut by the backend's own tokenizer."""
    from .validators.perplexity import perplexity as ppl, text_windows

    ids = text_windows(backend.tokenize, text or DEFAULT_TEXT, windows, seq_len)
    return ppl(backend.logits, ids, progress=progress)


def perplexity(model, tokenizer, text: str | Path | None = None, windows: int = 40, seq_len: int = 512, progress: bool = True) -> float:
    """Perplexity in torch of an in-memory model."""
    from .validators.backends.torch_backend import TorchBackend

    return backend_perplexity(TorchBackend(model, tokenizer), text, windows, seq_len, progress)


def evaluate(
    model_or_dir: str | None = None,
    text=None,
    windows: int = 40,
    seq_len: int = 512,
    progress: bool = True,
    backend: str = "torch",
    **options,
) -> float:
    """Perplexity of a model name/path (torch) or of a factorport output
    through `backend` ("torch", "onnxruntime", "llama.cpp")."""
    if backend == "torch" and (model_or_dir is None or find_artifact(model_or_dir) is None):
        model, tokenizer = load_any(model_or_dir)
        return perplexity(model, tokenizer, text, windows, seq_len, progress)
    return backend_perplexity(open_output(model_or_dir, backend, **options), text, windows, seq_len, progress)


def open_output(output: str | Path | None, backend: str = "torch", **options):
    """Open a factorport output directory with one backend."""
    from .validators.backends import open_backend

    if output is None or find_artifact(output) is None:
        raise FactorportError(f"{output} is not a factorport output directory; convert a model first")
    output = Path(output)
    if output.name == SAFETENSORS:  # accept the artifact directory itself
        output = output.parent
    return open_backend(backend, output, **options)


def generate(output: str | Path, prompt: str, new_tokens: int = 64, backend: str = "torch", chat: bool = False, **options) -> str:
    """Greedy continuation of `prompt` by a factorport output through `backend`.
    With `chat`, the prompt is wrapped in the model's chat template first."""
    runtime = open_output(output, backend, **options)
    if chat:
        _, tokenizer = load(output)
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = runtime.tokenize(prompt)
    return runtime.detokenize(runtime.generate(ids, new_tokens).tokens)
