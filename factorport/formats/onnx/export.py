"""`export(model, tokenizer, out_dir)`: trace with Optimum, then check and describe the graph."""

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

from ...architectures import arch_for
from ...errors import FactorportError
from . import attention as fused_attention
from . import genai, graph
from .operators import export_modules, swapped

TASK = "text-generation-with-past"


def _trace(model, out_dir: Path) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    # Optimum's own validation is replaced by `graph.check_parity` below, which
    # compares with the compressed torch model rather than a dense one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("optimum").setLevel(logging.ERROR)
        onnx_export_from_model(model, out_dir, task=TASK, do_validation=False)


def export(
    model, tokenizer, out_dir: Path, *, progress: bool = True, densify_sparse: bool = False, attention: str = "fused"
) -> dict:
    """Write `out_dir/model.onnx` (+ `model.onnx_data` beyond 2 GB), config,
    tokenizer files and onnxruntime-genai's genai_config.json; returns the report (operator counts, parity, seconds).

    attention: "fused" = RotaryEmbedding + GroupQueryAttention per layer where the
    model allows it (see `attention`), "traced" = Optimum's trace as is."""
    if attention not in fused_attention.ATTENTION_FORMS:
        raise FactorportError(f"unknown ONNX attention form {attention!r}; choose one of {', '.join(fused_attention.ATTENTION_FORMS)}")
    out_dir = Path(out_dir)
    started = time.perf_counter()
    model = model.eval()
    arch = arch_for(model.config)
    replacements, info = export_modules(model, densify_sparse)
    inputs = None
    if attention == "fused":
        # after the linears: the fused modules call the projections installed on the original attention
        fused, inputs = fused_attention.replacements(model, arch)
        replacements.update(fused)
    info["attention"] = "GroupQueryAttention" if inputs is not None else "traced"
    if progress:
        print(f"factorport: onnx: tracing the decoder ({len(replacements)} modules replaced, attention {info['attention']})")
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        swapped(model, replacements),
        fused_attention.capturing(model, arch, inputs),
    ):
        try:
            _trace(model, out_dir)
        except Exception as exc:  # noqa: BLE001 - Optimum raises plain exceptions
            raise FactorportError(f"ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if progress:
        print("factorport: onnx: checking the graph against the torch model")
    model_path = out_dir / graph.MODEL_FILE
    structure = graph.load_structure(model_path)
    genai.write_genai_config(out_dir, structure)
    counts = Counter(node.op_type for node in structure.graph.node)
    parity = graph.check_parity(model, out_dir)
    return {
        "format": "onnx",
        "task": TASK,
        "densify_sparse": densify_sparse,
        "attention": info["attention"],
        "embedding": info["embedding"],
        "shared_projections": info["shared_projections"],
        "fused_groups": info["fused_groups"],
        "nodes": dict(sorted(counts.items())),
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()},
        "parity": parity,
        "seconds": round(time.perf_counter() - started, 2),
    }
