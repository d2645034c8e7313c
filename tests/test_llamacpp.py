"""The llama.cpp backend on tiny random models: logits match the torch
reference (llama tied / mistral untied / qwen2 with biases), the LoRA
adapter applies U·(V·x) unscaled at any rank, greedy generation is timed,
and bad files give one-line errors before llama.cpp sees them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from gguf import GGUFReader

from factorport.converters import apply
from factorport.errors import FactorportError
from factorport.formats import manifest, safetensors_dir
from factorport.formats.gguf import MODEL_FILE, export
from factorport.recipe import parse_recipe
from factorport.validators.backends.llamacpp_backend import LlamaCppBackend

RECIPE = """
name: t
steps:
  - quantize: {targets: [linears], bits: 4, group_size: 32, symmetric: false}
  - correct: {targets: [linears], shared: %s, ranks: {ratio: %s}}
"""


def exported(model, out, gguf_type=None):
    out.mkdir(parents=True, exist_ok=True)
    export(model, None, out, progress=False, gguf_type=gguf_type)
    return out


@pytest.fixture
def window():
    return torch.arange(1, 41) % 128


def torch_logits(model, ids):
    with torch.no_grad():
        return model(ids.reshape(1, -1)).logits[0]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"])
def test_llamacpp_logits_match_torch_and_the_adapter_closes_the_gap(make_model, stats_for, tmp_path, window, arch):
    model = make_model(arch)
    # per-linear EoRA with a ratio policy: ranks differ between tensors, so
    # the adapter's unscaled alpha must hold for every rank
    apply(model, parse_recipe(RECIPE % ("false", "0.2")).steps, stats_for(model), progress=False)
    ranks = {m.rank for m in model.modules() if hasattr(m, "rank") and isinstance(getattr(m, "rank"), int)}
    assert len(ranks) > 1
    reference = torch_logits(model, window)
    out = exported(model, tmp_path)
    with_adapter = LlamaCppBackend.open(out)
    without = LlamaCppBackend.open(out, adapter=False)
    try:
        error = (with_adapter.logits(window) - reference).abs().max().item()
        error_base = (without.logits(window) - reference).abs().max().item()
    finally:
        with_adapter.close()
        without.close()
    scale = reference.abs().max().item()
    # llama.cpp rounds activations to 8 bits for its int4 dot products: 0.4%
    # of the largest logit on the tiny Llama, 2.1% on the tiny Gemma (whose
    # logits int4 moves by 26%, against Llama's 3%)
    assert error < 0.03 * scale, (error, scale)
    assert error < error_base / 3  # the low-rank terms are applied, unscaled


# Llama 3.1+'s rotary scaling, its wavelength bounds moved inside the tiny
# model's (head size 16): the first frequency interpolated, the other seven divided by the factor
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def test_llama3_rope_scaling_travels_as_rope_freqs(make_model, tmp_path, window):
    model = make_model("llama", rope_scaling=LLAMA3_ROPE)
    out = exported(model, tmp_path, "F32")
    factors = next(t for t in GGUFReader(out / MODEL_FILE).tensors if t.name == "rope_freqs.weight").data
    assert 1 < factors[0] < 8 and list(factors[1:]) == pytest.approx([8.0] * 7)
    backend = LlamaCppBackend.open(out)
    try:
        error = (backend.logits(window) - torch_logits(model, window)).abs().max().item()
    finally:
        backend.close()
    assert error < 1e-3 * torch_logits(model, window).abs().max().item()


def test_gemma3_linear_rope_scaling_travels_as_keys_and_scales_the_global_layers_only(make_model, tmp_path, window):
    # Gemma 3 4B and larger: positions divided by 8 in the global layers, the sliding ones unscaled
    model = make_model("gemma3_text", rope_scaling={"rope_type": "linear", "factor": 8.0})
    out = exported(model, tmp_path, "F32")
    fields = GGUFReader(out / MODEL_FILE).fields
    assert bytes(fields["gemma3.rope.scaling.type"].parts[-1]) == b"linear"
    assert float(fields["gemma3.rope.scaling.factor"].parts[-1][0]) == 8.0
    reference = torch_logits(model, window)
    unscaled = torch_logits(make_model("gemma3_text"), window)
    backend = LlamaCppBackend.open(out)
    try:
        error = (backend.logits(window) - reference).abs().max().item()
    finally:
        backend.close()
    scale = reference.abs().max().item()
    assert (unscaled - reference).abs().max().item() > 0.01 * scale  # the scaling matters at these positions
    assert error < 1e-3 * scale


def test_rope_scalings_llamacpp_would_compute_otherwise_are_refused(make_model, tmp_path):
    model = make_model("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    with pytest.raises(FactorportError, match="does not carry rope scaling 'yarn' for llama"):
        exported(model, tmp_path)


def test_generate_is_greedy_and_timed(make_model, tmp_path, window):
    model = make_model("llama")
    backend = LlamaCppBackend.open(exported(model, tmp_path, "F32"))
    try:
        result = backend.generate(window[:8].tolist(), 6)
        ids = window[:8].tolist()
        for token in result.tokens:  # each step is the argmax of a full re-scoring
            assert token == int(backend.logits(torch.tensor(ids))[-1].argmax())
            ids.append(token)
    finally:
        backend.close()
    assert len(result.tokens) == 6 and len(result.decode_seconds) == 5
    assert result.prefill_seconds > 0 and result.decode_tokens_per_second > 0 and backend.load_seconds > 0


def test_truncated_model_is_refused_before_llamacpp(make_model, tmp_path):
    out = exported(make_model("llama"), tmp_path)
    data = (out / MODEL_FILE).read_bytes()
    (out / MODEL_FILE).write_bytes(data[: len(data) - 1000])
    with pytest.raises(FactorportError, match="truncated"):
        LlamaCppBackend.open(out)


def test_factorport_layout_is_not_handed_to_llamacpp(make_model, tmp_path):
    out = exported(make_model("llama"), tmp_path)
    with pytest.raises(FactorportError, match="llama.cpp does not run"):
        LlamaCppBackend.open(out, model_file="model.factorport.gguf")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "factorport.cli", *args], capture_output=True, text=True, timeout=300)


def one_line_error(result, needle):
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.startswith("factorport: error:")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_cli_eval_generate_and_bad_input(make_model, tmp_path):
    model = make_model("llama")
    (tmp_path / "out" / "safetensors").mkdir(parents=True)
    safetensors_dir.save(model, None, tmp_path / "out" / "safetensors")
    exported(model, tmp_path / "out" / "gguf")
    manifest.write_manifest(tmp_path / "out", {"source": {"name": "tiny", "kind": "directory", "path": "-"}})
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    result = cli("eval", str(tmp_path / "out"), "--backend", "llama.cpp", "--threads", "1", "--text", str(text), "--windows", "1", "--no-reference", "--quiet")
    assert result.returncode == 0, result.stderr
    ppl = float(result.stdout.split(":")[-1])
    assert 1 < ppl < 1000
    result = cli("eval", str(tmp_path / "out"), "--backend", "llama.cpp", "--threads", "1", "--text", str(text), "--windows", "1", "--no-reference",
                 "--quiet", "--protocol", "llama-perplexity")
    assert result.returncode == 0, result.stderr
    assert 1 < float(result.stdout.split(":")[-1]) < 1000 and float(result.stdout.split(":")[-1]) != ppl  # the second half only
    result = cli("generate", str(tmp_path / "out"), "--backend", "llama.cpp", "--prompt", "the fox", "--new-tokens", "4")
    assert result.returncode == 0, result.stderr
    one_line_error(cli("export", str(tmp_path / "out"), "--format", "gguf", "--gguf-type", "Q9_Z", "--force"), "unknown --gguf-type")
    data = (tmp_path / "out" / "gguf" / MODEL_FILE).read_bytes()
    (tmp_path / "out" / "gguf" / MODEL_FILE).write_bytes(data[:-64])
    one_line_error(cli("eval", str(tmp_path / "out"), "--backend", "llama.cpp", "--text", str(text), "--windows", "1", "--no-reference"), "the manifest says")
    # past the manifest, the GGUF reader's own check refuses it
    one_line_error(cli("eval", str(tmp_path / "out"), "--backend", "llama.cpp", "--text", str(text), "--windows", "1", "--no-reference", "--no-verify"), "model.gguf")
