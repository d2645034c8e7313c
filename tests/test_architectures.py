"""Each model family of the architecture table end to end on a tiny random
config: converted layer by layer, exported to ONNX and GGUF, and validated
on every backend (the per-format unit tests parametrize over the families
too; this is the whole path a user takes)."""

from __future__ import annotations

import json

import gguf
import pytest
import torch

import factorport
from factorport.architectures import ARCHITECTURES
from test_pipeline import RECIPE
from tiny_outputs import TEXT, tiny_source


@pytest.mark.parametrize(("arch", "config", "particular", "optimum", "attention"), [
    # q/k norms and heads wider than width / heads (Qwen3-0.6B: 16 x 128 on
    # 1024). Optimum 2.1's ORTModelForCausalLM sizes qwen3's empty past as
    # width / heads, so it cannot run such a model (docs/onnx.md)
    ("qwen3", {"head_dim": 32}, "blk.0.attn_q_norm.weight", False, "GroupQueryAttention"),
    # q/k/v one linear, gate/up one linear, kept fused in llama.cpp's phi3 too;
    # as many kv heads as heads, as Phi-3-mini (Optimum 2.1 runs phi3 so)
    ("phi3", {"num_key_value_heads": 4}, "blk.0.attn_qkv.weight", True, "GroupQueryAttention"),
    # sliding and global layers (traced: GroupQueryAttention here has no
    # window), norms of 1 + weight, the embedding scaled by sqrt(hidden)
    ("gemma3_text", {}, "blk.0.post_ffw_norm.weight", True, "traced"),
])
def test_converts_exports_and_validates_on_every_backend(tmp_path, arch, config, particular, optimum, attention):
    source = tiny_source(tmp_path / "source", layers=2, arch=arch, **config)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    out = factorport.convert(str(source), recipe=str(tmp_path / "recipe.yaml"), output=tmp_path / "out", progress=False)
    factorport.export(out, formats=["onnx", "gguf"], progress=False)

    onnx_report = json.loads((out / "report" / "export-onnx.json").read_text())
    assert onnx_report["attention"] == attention
    reader = gguf.GGUFReader(out / "gguf" / "model.gguf")
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == ARCHITECTURES[arch].gguf_arch  # llama.cpp's own graph
    assert particular in {t.name for t in reader.tensors}

    if optimum:  # Optimum's runtime class loads the same directory and computes the same logits
        from optimum.onnxruntime import ORTModelForCausalLM

        ids = (torch.arange(1, 25) % 128).reshape(1, -1)
        model, _ = factorport.load(out)
        with torch.no_grad():
            expected = model(ids).logits
        got = ORTModelForCausalLM.from_pretrained(out / "onnx")(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()

    result = factorport.validate(out, text=TEXT, windows=1, progress=False)
    assert set(result["backends"]) == {"onnxruntime", "llama.cpp"}
    failed = [(b, c["check"], c.get("value")) for b, r in result["backends"].items() for c in r["checks"] if not c.get("passed")]
    assert result["passed"] and not failed, failed
