"""The baselines a user would otherwise pick, made from the same original
model and cached: Optimum's fp32 ONNX export, and llama.cpp's own
quantization (`llama_model_quantize`) at a named type, without and with the
importance matrix `llama-imatrix` computes on a calibration text (the
strongest llama.cpp baseline). Each is a directory a backend opens (`onnx` ->
onnxruntime, `model.gguf` -> llama.cpp)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

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
    """Optimum's own fp32 export (text-generation-with-past) of the original model."""
    source = resolve(model_name)

    def make(tmp: Path) -> None:
        from optimum.exporters.onnx import onnx_export_from_model

        model, tokenizer, _ = load_model(model_name)
        onnx_export_from_model(model, tmp, task="text-generation-with-past", do_validation=False)
        tokenizer.save_pretrained(tmp)

    return _build(_anchor_dir(source, "optimum-fp32"), make, progress)


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
