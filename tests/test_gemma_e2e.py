"""End to end on the second real model, Gemma-3-270M (installed from PyPI on
first use): `convert gemma3-270m` with a GPTQ recipe lossless in every format,
`validate` passes on onnxruntime (exact fp32 path: top-1 100%, max |diff| <=
1e-3 of max) and llama.cpp (perplexity within 1% of torch), llama.cpp
continues a prompt coherently, and the two reloads of the artifact agree
bit-exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from factorport.cli import main

pytestmark = pytest.mark.e2e

# int4 sym g32 GPTQ (= Q4_0 / MatMulNBits block 32) + a shared correction of
# the gate/up group (GGUF: LoRA adapter) + the tied 262k-token table int8 g32
# (= Q8_0): lossless in every format. Small calibration to keep the test short.
RECIPE = """
name: gemma-e2e
calibration: {samples: 8, seq_len: 128}
steps:
  - quantize: {targets: [linears], method: gptq, bits: 4, group_size: 32, symmetric: true}
  - correct: {targets: ["*.mlp.gate_proj", "*.mlp.up_proj"], shared: true, ranks: {rank: 8}}
  - quantize: {targets: [lm_head], method: rtn, bits: 8, group_size: 32, symmetric: true}
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gemma")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = root / "out"
    assert main(["convert", "gemma3-270m", "--recipe", str(recipe), "--output", str(out), "--format", "safetensors,onnx,gguf", "--quiet"]) == 0
    return out


def test_the_manifest_names_the_embedded_source(artifact):
    source = json.loads((artifact / "manifest.json").read_text())["source"]
    assert (source["kind"], source["name"]) == ("embedded", "gemma3-270m")


def test_validate_passes_on_onnxruntime_and_llamacpp(artifact, tmp_path):
    report = tmp_path / "v.json"
    status = main(["validate", str(artifact), "--windows", "2", "--json", str(report), "--quiet"])
    result = json.loads(report.read_text())
    assert status == 0, result["failures"]
    onnx, llama = result["backends"]["onnxruntime"], result["backends"]["llama.cpp"]
    assert onnx["top1_agreement"] == 1.0 and onnx["max_abs_logit_diff_rel"] <= 1e-3
    assert onnx["top1_near_ties"] <= 2  # measured 1 of 1024 positions: a flip within 1e-5 of the largest logit
    assert llama["perplexity_rel_diff"] < 0.01
    reference = result["reference"]
    # the compressed model is close to, and not better than, the original it came from
    assert reference["original_perplexity"] < reference["perplexity"] < 1.5 * reference["original_perplexity"]


@pytest.mark.parametrize("prompt, answer", [("The Eiffel Tower is located in the city of", "Paris"), ("The capital of France is the city of", "Paris")])
def test_llamacpp_continues_a_prompt_coherently(artifact, prompt, answer):
    """Prompts the dense 270M base model completes correctly ("The capital of
    France is" it does not: " a 100% natural product"). "The capital of
    Germany is the city of" the torch reference continues with " Berlin" and
    llama.cpp, with 8-bit activations, with " Frankfurt": a near-tie."""
    from factorport.api import generate

    text = generate(artifact, prompt, backend="llama.cpp", new_tokens=8)
    assert answer in text, text


def test_the_artifacts_tokenizer_cuts_text_as_llamacpp_does(artifact):
    """transformers reads Gemma's SentencePiece GGUF as a Unigram model (8776
    tokens where llama.cpp makes 4512 of the same text): factorport rebuilds
    it as BPE, with the file's whitespace pieces matched whole."""
    from factorport.api import open_output

    hf, llama = open_output(artifact, "torch"), open_output(artifact, "llama.cpp")
    text = (Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.test.raw").read_text()[:20000]
    try:
        for sample in (text, "tabs\tand\nnewlines  double   spaces\t\t<start_of_turn>"):
            assert hf.tokenize(sample) == llama.tokenize(sample)
        assert hf.tokenizer.decode(hf.tokenize(text)) == text
    finally:
        llama.close()


def test_the_gguf_and_safetensors_reloads_agree_bit_exactly(artifact):
    """Two writers and two readers of the same converted model: a lossy or
    misplaced tensor in either gives different logits."""
    from factorport.api import open_output
    from factorport.formats.gguf import NATIVE_FILE, load_native

    reference = open_output(artifact, "torch")
    loaded, _ = load_native(artifact / "gguf" / NATIVE_FILE)
    ids = reference.tokenize("The quick brown fox jumps over the lazy dog")
    with torch.no_grad():
        assert torch.equal(loaded(torch.tensor([ids])).logits[0], reference.logits(ids))


def test_an_embedded_tokenizer_installed_after_a_first_export_is_found(monkeypatch, tmp_path):
    """A GGUF export before Gemma is installed (SmolLM2's, in the same process)
    must not hide Gemma's tokenizer from every later export."""
    from factorport.formats.gguf import metadata
    from factorport.loading import embedded_gguf

    installed = embedded_gguf("gemma3-270m")
    monkeypatch.setenv("FACTORPORT_CACHE", str(tmp_path))
    monkeypatch.setattr(metadata, "_EMBEDDED_FIELDS", {})
    assert metadata._embedded_fields("gemma3-270m") is None
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / installed.name).symlink_to(installed)
    assert len(metadata._embedded_fields("gemma3-270m")[0]) == 262144
