"""The baselines a user would otherwise pick, made from the same original
model and cached: Optimum's fp32 ONNX export, onnxruntime-genai's model
builder (`-p int4 -e cpu`), and llama.cpp's own quantization
(`llama_model_quantize`) at a named type, without and with the importance
matrix `llama-imatrix` computes on a calibration text (the strongest
llama.cpp baseline). Each is a directory a backend opens (`onnx` ->
onnxruntime, the builder's -> onnxruntime-genai, `model.gguf` -> llama.cpp)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import FactorportError
from ..loading import CACHE_REVISION, Source, cache_dir, embedded_gguf, load_model, resolve

# Types `bench` picks the size-nearest anchor from.
LLAMACPP_TYPES = ("Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q8_0")


def _anchor_dir(source: Source, name: str) -> Path:
    import transformers

    return cache_dir() / "anchors" / f"{source.name}-r{CACHE_REVISION}-transformers-{transformers.__version__}" / name


def _build(target: Path, make, progress: bool) -> Path:
    """Run `make(tmp_dir)` into a temporary directory renamed to `target` when done."""
    if target.is_dir():
        return target
    if progress:
        print(f"factorport: building anchor {target.name} once (cached in {target.parent})")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        make(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def optimum_fp32(model_name: str | None, progress: bool = True) -> Path:
    """Optimum's own fp32 export (text-generation-with-past) of the original
    model, with the genai_config.json factorport writes for its own exports
    (the same inputs and outputs), so onnxruntime-genai runs it too."""
    source = resolve(model_name)

    def make(tmp: Path) -> None:
        from optimum.exporters.onnx import onnx_export_from_model

        model, tokenizer, _ = load_model(model_name)
        onnx_export_from_model(model, tmp, task="text-generation-with-past", do_validation=False)
        tokenizer.save_pretrained(tmp)

    return with_genai_config(_build(_anchor_dir(source, "optimum-fp32"), make, progress))


def with_genai_config(directory: Path) -> Path:
    """An Optimum-form ONNX directory (cached before it had one) gets the
    genai_config.json factorport writes for its own exports."""
    from ..formats.onnx.genai import GENAI_CONFIG, write_genai_config
    from ..formats.onnx.graph import MODEL_FILE, load_structure

    if not (directory / GENAI_CONFIG).is_file():
        write_genai_config(directory, load_structure(directory / MODEL_FILE))
    return directory


# onnxruntime-genai 0.18's builder needs transformers 5 (factorport pins 4.57
# for Optimum), so it runs from its own environment; it imports onnx_ir
# without declaring it. torch first, so pip takes the CPU build.
BUILDER_TORCH = "torch==2.13.0"
BUILDER_PACKAGES = ("onnxruntime-genai==0.18.0", "onnxruntime==1.32.0", "transformers==5.25.0", "onnx==1.23.2", "onnx-ir==1.1.0")
BUILDER_ALGORITHMS = ("default", "rtn", "k_quant")  # its `algo_config` base methods


def builder_python(progress: bool = True) -> Path:
    """The Python of a cached virtual environment with onnxruntime-genai's
    model builder (created on first use: a few minutes, a ~1 GB download)."""
    digest = hashlib.sha256(" ".join((BUILDER_TORCH, *BUILDER_PACKAGES)).encode()).hexdigest()[:12]
    target = cache_dir() / "tools" / f"genai-builder-{digest}"

    def make(tmp: Path) -> None:
        log = tmp / "install.log"
        with log.open("w") as out:
            for command in ([sys.executable, "-m", "venv", str(tmp)],
                            [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", BUILDER_TORCH],
                            [str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", *BUILDER_PACKAGES]):
                if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode:
                    tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
                    raise FactorportError(f"installing onnxruntime-genai's model builder failed ({tail[0][:200]}; log {log}); "
                                          "it needs PyPI: check the network and retry")

    if not target.is_dir():
        if progress:
            print(f"factorport: installing onnxruntime-genai's model builder once in {target}")
        # built aside and renamed when complete; only `python -m` is used, which a moved venv keeps
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        make(tmp)
        os.replace(tmp, target)
    return target / "bin" / "python"


def genai_builder_int4(model_name: str | None, algorithm: str = "default", progress: bool = True) -> Path:
    """onnxruntime-genai's model builder, `-p int4 -e cpu` with
    `algo_config=algorithm`, on the original model's HF directory: the int4
    ONNX (MatMulNBits, GroupQueryAttention, genai_config.json) an
    onnxruntime-genai user would build instead."""
    if algorithm not in BUILDER_ALGORITHMS:
        raise FactorportError(f"unknown builder algorithm {algorithm!r}; choose one of {', '.join(BUILDER_ALGORITHMS)}")
    source = resolve(model_name)
    if source.kind not in ("embedded", "directory"):
        raise FactorportError(f"the model builder anchor needs an HF directory, not a {source.kind} source ({source.name})")

    def make(tmp: Path) -> None:
        python = builder_python(progress)
        log = tmp.parent / f"{tmp.name}.log"
        command = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", source.path, "-o", str(tmp),
                   "-p", "int4", "-e", "cpu", "-c", str(tmp / "cache")]
        if algorithm != "default":
            command += ["--extra_options", f"algo_config={algorithm}"]
        with log.open("w") as out:  # its progress bars run to megabytes: kept in a file
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
        if code or not (tmp / "genai_config.json").is_file():
            raise FactorportError(f"onnxruntime-genai's model builder failed (exit {code}); its output is in {log}")
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        log.unlink()

    return _build(_anchor_dir(source, f"genai-builder-int4-{algorithm}"), make, progress)


def llamacpp_quantized(model_name: str | None, ggml_type: str, progress: bool = True) -> Path:
    """llama.cpp's `llama_model_quantize` of the original model at `ggml_type`."""
    from ..llamacpp.quantize import ftype_value, quantize_file

    source = resolve(model_name)
    ftype_value(ggml_type)  # an unknown type is refused before any work

    def make(tmp: Path) -> None:
        # allow_requantize: the embedded sample is itself Q4_1: dequantized exactly, then quantized
        quantize_file(_source_gguf(source, tmp), tmp / "model.gguf", ggml_type, os.cpu_count() or 1, allow_requantize=True)
        shutil.rmtree(tmp / "source", ignore_errors=True)

    return _build(_anchor_dir(source, f"llama.cpp-{ggml_type}"), make, progress)


def llamacpp_imatrix_quantized(model_name: str | None, ggml_type: str, text: Path, chunks: int, chunk_size: int, progress: bool = True) -> Path:
    """`llama-imatrix` of the original model on `chunks` chunks of
    `chunk_size` tokens of `text`, then `llama-quantize --imatrix` at
    `ggml_type`: what a llama.cpp user would do with the calibration text."""
    from ..llamacpp.quantize import ftype_value
    from ..llamacpp.tools import run_tool

    source = resolve(model_name)
    ftype_value(ggml_type)
    threads = str(os.cpu_count() or 1)
    digest = hashlib.sha256(f"{text.resolve()}:{text.stat().st_size}:{chunks}x{chunk_size}".encode()).hexdigest()[:12]

    def make(tmp: Path) -> None:
        original, imatrix = _source_gguf(source, tmp), tmp / "source" / "imatrix.gguf"
        imatrix.parent.mkdir(exist_ok=True)
        run_tool("llama-imatrix", ["-m", str(original), "-f", str(text), "-c", str(chunk_size), "--chunks", str(chunks),
                                   "-o", str(imatrix), "--no-ppl", "-t", threads], timeout=7200)
        run_tool("llama-quantize", ["--allow-requantize", "--imatrix", str(imatrix), str(original), str(tmp / "model.gguf"), ggml_type, threads],
                 timeout=3600)
        shutil.rmtree(tmp / "source", ignore_errors=True)

    return _build(_anchor_dir(source, f"llama.cpp-{ggml_type}-imatrix-{digest}"), make, progress)


def _source_gguf(source: Source, scratch: Path) -> Path:
    """A GGUF of the original weights: the source file itself when it is one
    (llama.cpp re-quantizes from its exact dequantized values), else an F32
    GGUF written by factorport's exporter."""
    if source.kind in ("embedded", "gguf"):
        return Path(source.path) if source.kind == "gguf" else embedded_gguf(source.name)
    from ..formats import exporter

    model, tokenizer, _ = load_model(source.path)
    out = scratch / "source"
    out.mkdir()
    exporter("gguf")(model, tokenizer, out, progress=False)
    return out / "model.gguf"
