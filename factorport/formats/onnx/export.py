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
from . import genai, graph, nbits
from .operators import export_modules, swapped
from .runtime import ACCURACY_LEVELS, with_accuracy_level

TASK = "text-generation-with-past"


def _trace(model, out_dir: Path) -> None:
    from optimum.exporters.onnx import onnx_export_from_model

    # Optimum's own validation is replaced by `graph.check_parity` below, which
    # compares with the compressed torch model rather than a dense one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("optimum").setLevel(logging.ERROR)
        onnx_export_from_model(model, out_dir, task=TASK, do_validation=False)


def _finish_graph(model_path: Path, share_table: bool, accuracy_level: int) -> bool:
    """Rewrite the traced file where the tracer cannot say it: the tied int4
    table stored once (nbits.share_tied_table) and MatMulNBits' accuracy_level.
    Returns whether the table is shared."""
    import onnx

    if not share_table and not accuracy_level:
        return False  # nothing to rewrite: the file is never read in whole
    locations = {e.value for t in onnx.load(str(model_path), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    model = onnx.load(str(model_path))  # external data read into memory, written afresh below
    shared = share_table and nbits.share_tied_table(model)
    if not shared and not accuracy_level:
        return False
    with_accuracy_level(model, accuracy_level)
    external = sorted(locations)
    for location in external:  # onnx appends to an existing data file
        (model_path.parent / location).unlink()
    if external or model.ByteSize() > graph.MAX_PROTOBUF:
        onnx.save(model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=external[0] if external else model_path.name + "_data", size_threshold=1024)
    else:
        onnx.save(model, str(model_path))
    return shared


def export(
    model, tokenizer, out_dir: Path, *, progress: bool = True, densify_sparse: bool = False, attention: str = "fused",
    accuracy_level: int = 0,
) -> dict:
    """Write `out_dir/model.onnx` (+ `model.onnx_data` beyond 2 GB), config,
    tokenizer files and onnxruntime-genai's genai_config.json; returns the report (operator counts, parity, seconds).

    attention: "fused" = RotaryEmbedding + GroupQueryAttention per layer where the
    model allows it (see `attention`), "traced" = Optimum's trace as is.
    accuracy_level: written on every MatMulNBits (0: float32 compute, exact;
    4: int8 activations, what onnxruntime-genai's builder writes for CPU int4).
    onnxruntime-genai runs the level written; the onnxruntime backend sets its own."""
    if attention not in fused_attention.ATTENTION_FORMS:
        raise FactorportError(f"unknown ONNX attention form {attention!r}; choose one of {', '.join(fused_attention.ATTENTION_FORMS)}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise FactorportError(f"ONNX accuracy_level {accuracy_level} is not one of {ACCURACY_LEVELS}")
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
    if _finish_graph(out_dir / graph.MODEL_FILE, info["embedding"] == "GatherBlockQuantized int4", accuracy_level):
        info["embedding"] += " (the lm_head's table)"
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    if progress:
        print("factorport: onnx: checking the graph against the torch model")
    model_path = out_dir / graph.MODEL_FILE
    structure = graph.load_structure(model_path)
    genai.write_genai_config(out_dir, structure)
    counts = Counter(node.op_type for node in structure.graph.node)
    parity = graph.check_parity(model, out_dir, accuracy_level)
    return {
        "format": "onnx",
        "task": TASK,
        "densify_sparse": densify_sparse,
        "attention": info["attention"],
        "accuracy_level": accuracy_level,
        "embedding": info["embedding"],
        "shared_projections": info["shared_projections"],
        "fused_groups": info["fused_groups"],
        "stacked_groups": info["stacked_groups"],
        "nodes": dict(sorted(counts.items())),
        "files": {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()},
        "parity": parity,
        "seconds": round(time.perf_counter() - started, 2),
    }
