"""ONNX on the real SmolLM2-135M sample: `convert --format onnx` with w4-rtn,
parity with the torch reference on 2 windows of 512 tokens of WikiText-2
test, Optimum's ORTModelForCausalLM generates from the directory, and the
CLI's bad-input errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from factorport.api import DEFAULT_TEXT
from factorport.validators.perplexity import text_windows

pytestmark = pytest.mark.e2e
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def factorport(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factorport.cli", *args], capture_output=True, text=True, env=ENV, timeout=900)


@pytest.fixture(scope="module")
def w4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "w4"
    result = factorport("convert", "--recipe", "w4-rtn", "--output", str(out), "--format", "onnx", "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_parity_with_torch_on_two_windows(w4):
    from factorport.api import open_output

    ours = open_output(w4, "onnxruntime")
    reference = open_output(w4, "torch")
    for ids in text_windows(reference, DEFAULT_TEXT, 2, 512):
        expected, got = reference.logits(ids), ours.logits(ids)
        assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_optimum_loads_and_generates(w4):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    model = ORTModelForCausalLM.from_pretrained(w4 / "onnx")
    tokenizer = AutoTokenizer.from_pretrained(w4 / "onnx")
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][inputs["input_ids"].shape[1]:])
    # a left-padded batch continues each prompt as it does alone (fused attention)
    prompts = ["The capital of France is", "In 1998, the band released their second album, which"]
    tokenizer.padding_side = "left"
    batch = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=12, do_sample=False)
    alone = [model.generate(**tokenizer(p, return_tensors="pt"), max_new_tokens=12, do_sample=False)[0] for p in prompts]
    texts = tokenizer.batch_decode(batch, skip_special_tokens=True)
    assert texts == [tokenizer.decode(a, skip_special_tokens=True) for a in alone]


def test_cli_generate_and_bad_directories(w4, tmp_path):
    result = factorport("generate", str(w4), "--backend", "onnxruntime", "--prompt", "The capital of France is", "--new-tokens", "8")
    assert result.returncode == 0 and "Paris" in result.stdout, result.stderr
    broken = tmp_path / "broken"
    (broken / "onnx").mkdir(parents=True)
    (broken / "safetensors").symlink_to(w4 / "safetensors")
    result = factorport("eval", str(broken), "--backend", "onnxruntime", "--windows", "1", "--no-reference")
    assert result.returncode == 2 and "has no model.onnx" in result.stderr and "Traceback" not in result.stderr
    data = (w4 / "onnx" / "model.onnx").read_bytes()
    (broken / "onnx" / "model.onnx").write_bytes(data[: len(data) // 2])
    result = factorport("generate", str(broken), "--backend", "onnxruntime", "--prompt", "x")
    assert result.returncode == 2 and "truncated" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
