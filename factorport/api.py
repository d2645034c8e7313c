"""The Python API; the command line is a thin layer over it.

    import factorport
    out = factorport.convert(None, recipe="w4-gptq", output="out/w4")   # embedded model
    model, tokenizer = factorport.load(out)                               # a transformers model
    factorport.evaluate(out)                                              # perplexity in torch
    factorport.export(out, ["onnx", "gguf"])                              # add runtime artifacts
    factorport.evaluate(out, backend="onnxruntime")                       # ... and run them
    factorport.validate(out)                                              # every artifact vs torch: a dict
    factorport.bench(out)                                                 # speed and memory: a dict

Data flows one way: load -> calibrate -> convert -> write -> evaluate.
Every function that reads an output directory first checks the sha256 of
its files against manifest.json and refuses on the first difference
(`verify=False` skips that); native runtimes (onnxruntime, llama.cpp) run
in a child process, so a crash there is a FactorportError here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

from . import __version__, loading
from .converters import Allocation, CalibrationConfig, apply, check, solve, spreading_step, whole_model_reason
from .converters.calibration import MODES, collect, describe_source, token_sequences
from .converters.pipeline import Resume, convert_layers
from .errors import FactorportError
from .formats import exporter, input_sums, manifest, safetensors_dir
from .formats.layout import describe_linears
from .formats.safetensors_dir import SUBDIR as SAFETENSORS
from .formats.safetensors_dir import find_artifact, save_side_files
from .loading import load_model, open_source, source_argument
from .ops import TiedEmbedding
from .recipe import Recipe, load_recipe
from .staging import ALLOCATION, STAGED_SUMS, STATE, finished, refuse_existing, resumable_output, staged_output

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
DEFAULT_CALIB = SHARED_DATA / "wiki.valid.tokens"
DEFAULT_TEXT = SHARED_DATA / "wiki.test.raw"


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
    mode: str | None = None,
    device: str | None = None,
    resume: bool = False,
    max_shard_bytes: int = safetensors_dir.MAX_SHARD_BYTES,
    on_layer: Callable[[int], None] | None = None,
) -> Path:
    """Compress `model` (None: the embedded default) with `recipe` and write
    OUTPUT/safetensors, OUTPUT/report/convert.json and OUTPUT/manifest.json,
    plus OUTPUT/<format> for each of `formats` ("onnx", "gguf"), exported with
    `export_options[format]`. `step_options[step]` overrides fields of every
    recipe step of that name (e.g. {"correct": {"ranks": ...}}).

    The model is converted one decoder layer at a time (`converters.pipeline`);
    `mode` ("sequential", the default, or "parallel") says whether a layer's
    calibration inputs come from the compressed or the original layers before
    it ("asymmetric": from the compressed ones, each linear aiming at the
    original model's outputs), `device` where the forward passes run ("cuda"
    when available). Each finished layer is written to OUTPUT's `.partial`
    directory, which an interrupted run keeps and `resume=True` continues. `on_layer(i)` is called
    after layer i is written."""
    formats = [f for f in formats if f != SAFETENSORS]
    exporters = {name: exporter(name) for name in formats}  # unknown names fail before any work
    output = Path(output)
    refuse_existing(output, force)  # before any work
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(str(recipe))
    recipe = _override_steps(recipe, step_options or {})
    mode = mode or recipe.calibration.get("mode", "sequential")
    if mode not in MODES:
        raise FactorportError(f"calibration mode '{mode}' is not one of {', '.join(MODES)}")
    device = _device(device)
    started = time.perf_counter()
    weights, tokenizer, source = open_source(model)
    skeleton = loading.skeleton(weights.config)
    check(skeleton, recipe.steps)
    calibration = None
    if recipe.needs_calibration:
        calibration = CalibrationConfig(
            source=str(calib or DEFAULT_CALIB),
            samples=samples or recipe.calibration.get("samples", 128),
            seq_len=seq_len or recipe.calibration.get("seq_len", 512),
            mode=mode,
        )
    # tokenized before anything is staged: a missing or short text fails here
    sequences = token_sequences(tokenizer, calibration.source, calibration.samples, calibration.seq_len) if calibration else []
    settings = {
        "factorport_version": __version__,
        "source": source.path,
        "recipe": recipe.text,
        "steps": repr(recipe.steps),
        "calibration": None if calibration is None else dataclasses.asdict(calibration),
        "device": str(device),
    }
    with resumable_output(output, force, settings, resume, progress) as tmp:
        whole = whole_model_reason(recipe.steps)
        if whole:
            if progress:
                print(f"factorport: {whole}: converting the whole model in memory, statistics from the uncompressed model")
            summary = _convert_whole(weights, skeleton, recipe, calibration, sequences, tmp, progress)
        else:
            summary = _convert_by_layer(weights, skeleton, recipe, calibration, sequences, tmp, device, progress, resume, max_shard_bytes, on_layer)
        save_side_files(skeleton.config, _generation_config(source), tokenizer, tmp / SAFETENSORS)
        summary = {"recipe": recipe.name, **summary, "seconds": round(time.perf_counter() - started, 2), "peak_rss_bytes": peak_rss()}
        (tmp / "report").mkdir()
        (tmp / "report" / "convert.json").write_text(json.dumps(summary, indent=2) + "\n")
        if exporters:
            compressed, tokenizer = safetensors_dir.load(tmp / SAFETENSORS)
            compressed.config._name_or_path = source.name  # what exporters name the model (GGUF general.name)
            for name, export_to in exporters.items():
                _export_into(export_to, name, compressed, tokenizer, tmp, (export_options or {}).get(name, {}), progress)
        finished(tmp)
        manifest.write_manifest(
            tmp,
            {
                "factorport_version": __version__,
                "source": {"name": source.name, "kind": source.kind, "path": source.path},
                "recipe": {"name": recipe.name, "text": recipe.text},
                # what `validate` holds this artifact to, so it never re-parses the recipe
                "validation": {"thresholds": dict(recipe.thresholds)},
            },
        )
    return output


def _device(device: str | None):
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise FactorportError(f"device '{device}' is not one of cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise FactorportError("--device cuda: torch sees no CUDA device here; use --device cpu")
    return torch.device(device)


def peak_rss() -> int:
    """This process's peak resident memory, in bytes (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _generation_config(source):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source.path)
    except (OSError, ValueError):  # none shipped (GGUF, bare directories)
        return None


def _calibration_summary(calibration, sequences, seconds: float, mode: str) -> dict | None:
    if calibration is None:
        return None
    tokens = sum(s.numel() for s in sequences)
    return {"source": describe_source(calibration, sequences), "tokens": tokens, "seconds": round(seconds, 2), "mode": mode}


def _convert_whole(weights, skeleton, recipe, calibration, sequences, tmp: Path, progress: bool) -> dict:
    """Steps that see every layer at once: the whole model in float32 memory,
    statistics from the uncompressed model (the `parallel` mode)."""
    model = loading.materialize_source(skeleton, weights)
    stats = collect(model, sequences, describe_source(calibration, sequences), progress=progress) if calibration else None
    reports = apply(model, recipe.steps, stats, progress=progress)
    (tmp / SAFETENSORS).mkdir()
    safetensors_dir.save(model, None, tmp / SAFETENSORS)
    summary = None
    if stats is not None:
        sums = stats.input_sums(list(stats.key_of))
        input_sums.write(tmp / input_sums.FILE, input_sums.InputSums(sums, stats.tokens, calibration.seq_len, stats.source))
        summary = {"source": stats.source, "tokens": stats.tokens, "seconds": round(stats.seconds, 2), "mode": "parallel (whole model)"}
    return {"calibration": summary, "layers": [r.to_dict() for r in reports]}


def _convert_by_layer(weights, skeleton, recipe, calibration, sequences, tmp: Path, device, progress: bool, resume: bool, max_shard_bytes: int, on_layer) -> dict:
    """Layer by layer: each finished layer is a piece in `tmp` (and the hidden
    states after it, for a resume), assembled into OUTPUT/safetensors at the end."""
    described = describe_source(calibration, sequences) if calibration else ""
    state = None
    if resume and (tmp / STATE).is_file():
        tensors, info = safetensors_dir.load_state(tmp / STATE)
        state = Resume(info["next_layer"], tensors.get("hidden"), tensors.get("dense_hidden"))
        if progress:
            print(f"factorport: resuming {tmp} at layer {state.layer}")
    elif resume and safetensors_dir.piece_files(tmp):
        raise FactorportError(f"{tmp} has finished layers but no {STATE} to continue from; run without --resume")
    allocation = None
    if spreading_step(recipe.steps) is not None:
        allocation = _allocate(weights, skeleton, recipe, sequences, described, tmp, device, progress, resume)
    layers = convert_layers(
        skeleton, weights, recipe.steps, sequences, described, calibration.mode if calibration else "parallel",
        device, state, progress, allocation,
    )
    table_dtype = None
    for piece in layers:
        table_dtype = piece.table_dtype  # set by the rest, the last piece
        name = f"layer-{piece.index:05d}" if piece.index >= 0 else "rest"
        owner = skeleton.get_submodule(piece.prefix) if piece.prefix else skeleton
        fragment = describe_linears(skeleton, piece.linears)
        tensors = safetensors_dir.stored_tensors(owner, piece.prefix)
        safetensors_dir.write_piece(tmp, name, tensors, fragment, [r.to_dict() for r in piece.reports], piece.seconds, piece.calibration_seconds)
        if piece.input_sums:  # kept beside the pieces until the end, so a resume keeps them too
            safetensors_dir.write_file(_staged_sums(tmp, name), piece.input_sums, {"format": "pt"})
        del tensors  # the layer's memory goes when the driver releases it, before it reads the next
        if piece.index >= 0:
            hidden = {k: t for k, t in (("hidden", piece.hidden), ("dense_hidden", piece.dense_hidden)) if t is not None}
            safetensors_dir.save_state(tmp / STATE, hidden, {"next_layer": piece.index + 1})
            if on_layer is not None:
                on_layer(piece.index)
    infos = [safetensors_dir.piece_info(path) for path in safetensors_dir.piece_files(tmp)]
    (tmp / SAFETENSORS).mkdir()
    tied = isinstance(skeleton.get_input_embeddings(), TiedEmbedding)
    safetensors_dir.assemble(tmp, tmp / SAFETENSORS, skeleton.config.model_type, tied, table_dtype, max_shard_bytes)
    if calibration is not None:
        _join_input_sums(tmp, sum(s.numel() for s in sequences), calibration.seq_len, described)
    return {
        # calibration seconds: the forward passes and XᵀX inside the layer loop
        "calibration": _calibration_summary(calibration, sequences, sum(i["calibration_seconds"] for i in infos), calibration.mode if calibration else ""),
        "layer_seconds": [i["seconds"] for i in infos[:-1]],  # per decoder layer, this run or the one resumed
        **({"allocation": allocation.chosen} if allocation is not None else {}),
        "layers": [row for i in infos for row in i["reports"]],
    }


def _staged_sums(tmp: Path, piece: str) -> Path:
    (tmp / STAGED_SUMS).mkdir(exist_ok=True)
    return tmp / STAGED_SUMS / f"{piece}.safetensors"


def _join_input_sums(tmp: Path, tokens: int, seq_len: int, described: str) -> None:
    """OUTPUT/calibration/input_sums.safetensors from the pieces' files."""
    staged = sorted((tmp / STAGED_SUMS).glob("*.safetensors")) if (tmp / STAGED_SUMS).is_dir() else []
    sums = {k: v for path in staged for k, v in safetensors_dir.read_file_tensors(path).items()}
    if sums:
        input_sums.write(tmp / input_sums.FILE, input_sums.InputSums(sums, tokens, seq_len, described))
    shutil.rmtree(tmp / STAGED_SUMS, ignore_errors=True)


def _calibration_options(name: str, output: Path, options: dict) -> dict:
    """`options`, plus the calibration's input sums for the one format that
    carries them (GGUF: llama.cpp's importance matrix) when the output has them."""
    path = output / input_sums.FILE
    if name != "gguf" or not path.is_file():
        return options
    return {**options, "input_sums": input_sums.read(path)}


def _allocate(weights, skeleton, recipe, sequences, described: str, tmp: Path, device, progress: bool, resume: bool) -> Allocation:
    """The first pass of a recipe that spreads one budget over every layer:
    each layer's options, scored on the uncompressed model's activations
    (in a skeleton of its own), solved once against `skeleton` (untouched
    until the second pass); kept in `tmp` so a resume does not score again."""
    saved = tmp / ALLOCATION
    if resume and saved.is_file():
        return Allocation(chosen=safetensors_dir.read_json_file(saved, "convert again without --resume"))
    if progress:
        print("factorport: scoring every layer for the budget, then converting with the allocation fixed")
    scoring = Allocation()
    for _ in convert_layers(loading.skeleton(weights.config), weights, recipe.steps, sequences, described, "parallel", device,
                            progress=progress, allocation=scoring):
        pass  # the pieces are thrown away: only the options they filled matter
    allocation = solve(skeleton, recipe.steps, scoring)
    partial = saved.with_name(saved.name + ".tmp")
    partial.write_text(json.dumps(allocation.chosen))
    partial.replace(saved)
    return allocation


def _override_steps(recipe: Recipe, options: dict[str, dict]) -> Recipe:
    import dataclasses

    present = {name for name, _ in recipe.steps}
    if options.get("correct") and "correct" not in present:  # a budget nothing would spend
        raise FactorportError(f"recipe {recipe.name} has no correct step to give an adapter budget to; pick a recipe with one")
    if {"size_of", "bytes"} & set(options.get("llamacpp", {})):
        if "llamacpp" not in present or "correct" in present:  # none to spend it, or a correct step adding bytes beyond it
            raise FactorportError(f"recipe {recipe.name} cannot take a byte target (--size-of, --bytes): it needs a llamacpp step "
                                  "and no correct step (its corrections are bought within the target); use --recipe llamacpp-equal-bytes")
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
    report = export_to(model, tokenizer, output / name, progress=progress, **_calibration_options(name, output, options))
    (output / "report").mkdir(exist_ok=True)
    (output / "report" / f"export-{name}.json").write_text(json.dumps(report, indent=2) + "\n")


def export(
    path: str | Path,
    formats: Sequence[str],
    force: bool = False,
    progress: bool = True,
    export_options: dict[str, dict] | None = None,
    verify: bool = True,
) -> Path:
    """Add OUTPUT/<format> for each of `formats` to an existing factorport
    output, from its safetensors artifact (after checking its files against
    the manifest, unless `verify` is False); the manifest is re-hashed."""
    output = Path(path)
    if not (output / SAFETENSORS).is_dir():
        raise FactorportError(f"{output} is not a factorport output directory (no {SAFETENSORS}/); convert first")
    check_manifest(output, verify, required=True)
    if find_artifact(output) is None:
        raise FactorportError(f"{output} is not a factorport output directory (no {SAFETENSORS}/{safetensors_dir.WEIGHTS}); convert first")
    exporters = {name: exporter(name) for name in formats if name != SAFETENSORS}
    for name in exporters:
        refuse_existing(output / name, force)
    model, tokenizer = load(output, verify=False)  # checked above
    for name, export_to in exporters.items():
        with staged_output(output / name, force) as tmp:
            if progress:
                print(f"factorport: exporting {name} to {output}/{name}")
            report = export_to(model, tokenizer, tmp, progress=progress, **_calibration_options(name, output, (export_options or {}).get(name, {})))
        (output / "report").mkdir(exist_ok=True)
        (output / "report" / f"export-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    manifest.refresh_manifest(output, [*(f"{name}/" for name in exporters), *(f"report/export-{name}.json" for name in exporters)])
    return output


def manifest_root(path: str | Path) -> Path | None:
    """The factorport output whose manifest.json covers `path`: `path` itself,
    or the output above it when `path` is its safetensors directory."""
    path = Path(path)
    if (path / manifest.MANIFEST).is_file():
        return path
    if path.name == SAFETENSORS and (path.parent / manifest.MANIFEST).is_file():
        return path.parent
    return None


def check_manifest(path: str | Path, verify: bool = True, required: bool = False) -> dict | None:
    """The manifest covering `path` (None when there is none and it is not
    `required`), after checking every file it lists against its sha256: a
    changed or missing file is refused, in one line, before any runtime
    reads anything. `verify=False` skips the hashes, not the reading."""
    root = manifest_root(path)
    if root is None:
        if required and verify:
            manifest.read_manifest(Path(path))  # raises: no manifest.json, and what to do
        return None
    info = manifest.read_manifest(root)
    if verify:
        problems = manifest.verify_manifest(root, info)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise FactorportError(
                f"{root / manifest.MANIFEST}: {problems[0]}{more}; re-convert or re-export the artifact (--no-verify skips this check)"
            )
    return info


def load(path: str | Path, verify: bool = True):
    """(model, tokenizer) from a factorport output directory or its safetensors
    directory; its files are checked against manifest.json first when there is
    one (a bare safetensors directory has none)."""
    info = check_manifest(path, verify)
    directory = find_artifact(path)
    if directory is None:
        raise FactorportError(f"{path} is not a factorport artifact (no {SAFETENSORS}/{safetensors_dir.WEIGHTS})")
    model, tokenizer = safetensors_dir.load(directory)
    if info:  # named after its source, not the directory it was loaded from
        model.config._name_or_path = info["source"]["name"]
    return model, tokenizer


def load_any(model_or_dir: str | None):
    """A factorport artifact if `model_or_dir` is one, else a source model."""
    if model_or_dir is not None and find_artifact(model_or_dir) is not None:
        return load(model_or_dir)
    model, tokenizer, _ = load_model(model_or_dir)
    return model, tokenizer


PROTOCOLS = ("windows", "llama-perplexity")


def backend_perplexity(
    backend, text: str | Path | None = None, windows: int = 40, seq_len: int = 512, progress: bool = True, protocol: str = "windows"
) -> float:
    """Perplexity through any backend, on windows cut by the backend's own
    tokenizer: every token of each window scored ("windows"), or as
    `llama-perplexity -c seq_len --chunks windows` scores them, the second
    half of each chunk ("llama-perplexity", to compare with llama.cpp's figure)."""
    from .validators.perplexity import llama_perplexity_protocol, perplexity as ppl, text_windows

    if protocol not in PROTOCOLS:
        raise FactorportError(f"unknown perplexity protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if protocol == "llama-perplexity":
        return llama_perplexity_protocol(backend, text or DEFAULT_TEXT, windows, seq_len)
    ids = text_windows(backend, text or DEFAULT_TEXT, windows, seq_len)
    return ppl(backend.logits, ids, progress=progress)


def perplexity(
    model, tokenizer, text: str | Path | None = None, windows: int = 40, seq_len: int = 512, progress: bool = True, protocol: str = "windows"
) -> float:
    """Perplexity in torch of an in-memory model."""
    from .validators.backends.torch_backend import TorchBackend

    return backend_perplexity(TorchBackend(model, tokenizer), text, windows, seq_len, progress, protocol)


def evaluate(
    model_or_dir: str | None = None,
    text=None,
    windows: int = 40,
    seq_len: int = 512,
    progress: bool = True,
    backend: str = "torch",
    verify: bool = True,
    timeout: float | None = None,
    protocol: str = "windows",
    **options,
) -> float:
    """Perplexity of a model name/path (torch) or of a factorport output
    through `backend` ("torch", "onnxruntime", "llama.cpp"); `timeout`: seconds
    one call of a native runtime may take before its process is killed;
    `protocol` as `backend_perplexity`'s."""
    if model_or_dir is not None:
        check_manifest(model_or_dir, verify)
    if backend == "torch" and (model_or_dir is None or find_artifact(model_or_dir) is None):
        model, tokenizer = load_any(model_or_dir)
        return perplexity(model, tokenizer, text, windows, seq_len, progress, protocol)
    runtime = open_output(model_or_dir, backend, verify=False, timeout=timeout, **options)  # checked above
    try:
        return backend_perplexity(runtime, text, windows, seq_len, progress, protocol)
    finally:
        _close(runtime)


def evaluate_report(
    model_or_dir: str | None = None,
    text=None,
    windows: int = 40,
    backend: str = "torch",
    reference: bool = True,
    progress: bool = True,
    verify: bool = True,
    timeout: float | None = None,
    protocol: str = "windows",
    **options,
) -> dict:
    """`factorport eval`: the perplexity of `model_or_dir` through `backend`
    and, for a factorport output with `reference`, the dense source model's
    beside it (`dense_perplexity`, `ratio`, `dense_name`)."""
    info = check_manifest(model_or_dir, verify) if model_or_dir is not None else None
    result = {"model": model_or_dir or "embedded default", "windows": windows, "seq_len": 512, "backend": backend, "protocol": protocol}
    result["perplexity"] = evaluate(model_or_dir, text, windows, progress=progress, backend=backend, verify=False, timeout=timeout,
                                    protocol=protocol, **options)
    if info and reference and find_artifact(model_or_dir) is not None:
        source = info["source"]
        result["dense_name"] = source["name"]
        result["dense_perplexity"] = evaluate(source_argument(source), text, windows, progress=progress, protocol=protocol)
        result["ratio"] = result["perplexity"] / result["dense_perplexity"]
    return result


def open_output(
    output: str | Path | None,
    backend: str = "torch",
    verify: bool = True,
    isolated: bool | None = None,
    timeout: float | None = None,
    **options,
):
    """Open a factorport output directory with one backend, after checking its
    files against its manifest (`verify`). Native backends run in a child
    process unless `isolated` is False (see validators/backends/isolated.py)."""
    from .validators.backends import open_backend

    if output is not None:
        check_manifest(output, verify)
    if output is None or find_artifact(output) is None:
        raise FactorportError(f"{output} is not a factorport output directory; convert a model first")
    output = Path(output)
    if output.name == SAFETENSORS:  # accept the artifact directory itself
        output = output.parent
    return open_backend(backend, output, isolated=isolated, timeout=timeout, **options)


def generate(
    output: str | Path,
    prompt: str,
    new_tokens: int = 64,
    backend: str = "torch",
    chat: bool = False,
    verify: bool = True,
    timeout: float | None = None,
    **options,
) -> str:
    """Greedy continuation of `prompt` by a factorport output through `backend`.
    With `chat`, the prompt is wrapped in the model's chat template first."""
    runtime = open_output(output, backend, verify=verify, timeout=timeout, **options)
    try:
        if chat:
            from .loading import saved_tokenizer

            tokenizer = saved_tokenizer(find_artifact(output))
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            start = []  # the template writes its own BOS
        else:
            start = runtime.text_start()  # the BOS a plain prompt needs
        ids = start + runtime.tokenize(prompt)
        return runtime.detokenize(runtime.generate(ids, new_tokens).tokens)
    finally:
        _close(runtime)


def _close(runtime) -> None:
    """Free a runtime now (an isolated one's child process exits)."""
    getattr(runtime, "close", lambda: None)()


def validate(
    output: str | Path,
    backends: Sequence[str] | None = None,
    text: str | Path | None = None,
    windows: int = 8,
    against: str | None = None,
    thresholds: dict[str, float] | None = None,
    threads: int | None = None,
    progress: bool = True,
    verify: bool = True,
    timeout: float | None = None,
    report: bool = True,
    json_path: str | Path | None = None,
    junit_path: str | Path | None = None,
) -> dict:
    """Check every exported artifact of `output` (or those of `backends`:
    onnxruntime, onnxruntime-int8, llama.cpp) against the torch reference:
    the manifest's hashes first, then logit parity and perplexity on `windows`
    windows of `text`. Threshold overrides: those stored at convert time, then
    `thresholds` ({"[backend:]metric": limit}). A backend that fails to load,
    crashes or hangs (`timeout` seconds a call) fails its own check.

    Returns the result dict (schema in docs/validation.md; `passed`,
    `failures`); writes OUTPUT/report/validation.md and .json unless `report`
    is False, and the JSON / JUnit XML to `json_path` / `junit_path`."""
    from .validators.report import validation_junit, write_validation_reports
    from .validators.validate import ValidateConfig, validate as run_validation

    config = ValidateConfig(
        text=Path(text or DEFAULT_TEXT),
        backends=list(backends) if backends else None,
        windows=windows,
        against=against,
        thresholds=dict(thresholds or {}),
        options={name: {"threads": threads} for name in ("onnxruntime", "llama.cpp")} if threads else {},
        progress=progress,
        verify=verify,
        timeout=timeout,
    )
    result = run_validation(output, config)
    if report:
        write_validation_reports(result, Path(output) / "report")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if junit_path:
        Path(junit_path).write_text(validation_junit(result))
    return result


def bench(
    output: str | Path,
    backends: Sequence[str] | None = None,
    anchors: bool = True,
    against: str | None = None,
    text: str | Path | None = None,
    prompt_tokens: int = 512,
    new_tokens: int = 64,
    repeats: int = 5,
    threads: int | None = None,
    progress: bool = True,
    verify: bool = True,
    timeout: float | None = None,
    report: bool = True,
    json_path: str | Path | None = None,
    **settings,
) -> dict:
    """Load time, prefill, decode speed and peak memory of every artifact of
    `output` (or those of `backends`), each in a fresh process, next to the
    anchors made from the original model (`against`, default the manifest's
    source; `anchors=False` skips them) and to the memory-bandwidth bound;
    says whether the machine was busy. `settings`: further BenchConfig
    fields (perplexity_windows, bandwidth_repeats).

    Returns the result dict (`runs`, `machine`, `passed`); writes
    OUTPUT/report/bench.md, bench.json and plots unless `report` is False,
    and the JSON to `json_path`."""
    from .validators.bench import BenchConfig, bench as run_bench, targets_for
    from .validators.report import write_bench_reports

    output = Path(output)
    info = check_manifest(output, verify, required=True) or {}
    source = info.get("source") or {}
    model_name = against or source_argument(source)
    config = BenchConfig(
        text=Path(text or DEFAULT_TEXT),
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        repeats=repeats,
        threads=threads,
        progress=progress,
        timeout=timeout,
        **settings,
    )
    targets = targets_for(output, list(backends) if backends else None, anchors, model_name, progress)
    result = run_bench(targets, config)
    result["manifest"] = {"checked": verify}
    if report:
        write_bench_reports(result, output / "report")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
