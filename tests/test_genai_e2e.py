"""onnxruntime-genai on the real SmolLM2-135M sample, for glowq-w4 and
w4-gptq exports: og's tokenizer gives the HF tokenizer's ids (WikiText-2
test, a chat-template prompt) and decodes them back, og.Generator continues
greedily as factorport's onnxruntime backend does, and `validate` passes the
fp32 thresholds (top-1 100%, max |logit diff| <= 1e-3 of the max logit)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from factorport.api import DEFAULT_TEXT

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai does not install on this platform")
pytestmark = pytest.mark.e2e
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
PROMPTS = ("The capital of France is", "In 1998, the band released their second album, which")


def factorport(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "factorport.cli", *args], capture_output=True, text=True, env=ENV, timeout=1800)


@pytest.fixture(scope="module", params=["glowq-w4", "w4-gptq"])
def output(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("genai") / request.param
    result = factorport("convert", "--recipe", request.param, "--output", str(out), "--format", "onnx",
                        "--calib-samples", "16", "--calib-seq-len", "256", "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def until_end(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_og_tokenizer_is_the_hf_tokenizer(output):
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    directory = str(output / "onnx")
    tokenizer = og.Tokenizer(og.Model(directory))
    hf = AutoTokenizer.from_pretrained(directory)
    text = Path(DEFAULT_TEXT).read_text()[:20_000]
    ids = hf(text, add_special_tokens=False)["input_ids"]
    assert [int(i) for i in tokenizer.encode(text)] == ids
    assert tokenizer.decode(ids) == hf.decode(ids) == text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    assert prompt == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    chat_ids = [int(i) for i in tokenizer.encode(prompt)]
    assert chat_ids == hf(prompt, add_special_tokens=False)["input_ids"] and hf.convert_tokens_to_ids("<|im_start|>") in chat_ids
    assert tokenizer.decode(chat_ids) == hf.decode(chat_ids, skip_special_tokens=True)


def test_og_generates_what_the_onnxruntime_backend_generates(output):
    from factorport.api import open_output

    ours, reference = open_output(output, "onnxruntime-genai"), open_output(output, "onnxruntime")
    eos = json.loads((output / "onnx" / "genai_config.json").read_text())["model"]["eos_token_id"]
    for prompt in PROMPTS:
        ids = reference.tokenize(prompt)
        assert ours.tokenize(prompt) == ids
        got, expected = ours.generate(ids, 24).tokens, reference.generate(ids, 24).tokens
        assert got == until_end(expected, eos) and len(got) >= 8


def test_validate_passes_fp32_thresholds(output):
    result = factorport("validate", str(output), "--backend", "onnxruntime-genai", "--windows", "2", "--json", str(output / "genai.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((output / "genai.json").read_text())
    backend = report["backends"]["onnxruntime-genai"]
    assert backend["passed"] and backend["top1_agreement"] == 1.0
    assert backend["max_abs_logit_diff_rel"] <= 1e-3
