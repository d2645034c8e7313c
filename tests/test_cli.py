"""The command line on the real embedded sample: every bad input is one line
on stderr, a non-zero exit, and no partial output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
SMALL_CALIB = ["--calib-samples", "2", "--calib-seq-len", "64"]


def factorport(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "factorport.cli", *args], capture_output=True, text=True, env=ENV, timeout=900
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("factorport: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def w8_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "w8"
    result = factorport("convert", "--recipe", "w8-rtn", "--output", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    return out


def test_convert_writes_layout_manifest_and_report(w8_artifact):
    from factorport.formats.manifest import verify_manifest

    manifest = json.loads((w8_artifact / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "w8-rtn"
    assert "safetensors/model.safetensors" in manifest["files"]
    assert verify_manifest(w8_artifact) == []
    report = json.loads((w8_artifact / "report" / "convert.json").read_text())
    assert len(report["layers"]) == 30 * 7 + 1  # every decoder linear and lm_head
    assert all(r["bytes_after"] < r["bytes_before"] for r in report["layers"])


def test_inspect_reports_bytes(w8_artifact):
    table = factorport("inspect", str(w8_artifact))
    assert table.returncode == 0, table.stderr
    assert "lm_head" in table.stdout and "quantized int8s" in table.stdout
    summary = json.loads(factorport("inspect", str(w8_artifact), "--json").stdout)
    assert summary["tied_embeddings"] is True
    # int8 codes + fp16 scales per 64: 1 + 2/64 bytes a weight, about a quarter of fp32
    ratio = summary["totals"]["compressed_bytes"] / (4 * sum(l["dense_params"] for l in summary["layers"]))
    assert 0.25 < ratio < 0.26


def test_eval_prints_perplexity_next_to_dense(w8_artifact, tmp_path):
    out = tmp_path / "eval.json"
    result = factorport("eval", str(w8_artifact), "--windows", "2", "--json", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert "perplexity (dense" in result.stdout
    # int8 in groups of 64 barely moves perplexity; far from a broken model
    assert 0.97 < data["ratio"] < 1.03
    assert 5 < data["perplexity"] < 100


def test_existing_output_needs_force(w8_artifact):
    before = (w8_artifact / "manifest.json").read_text()
    result = factorport("convert", "--recipe", "w8-rtn", "--output", str(w8_artifact))
    assert_one_line_error(result, "already exists", "--force")
    assert (w8_artifact / "manifest.json").read_text() == before


def test_truncated_safetensors(w8_artifact, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(w8_artifact, broken)
    weights = broken / "safetensors" / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    # the manifest is checked before anything reads the file ...
    assert_one_line_error(factorport("eval", str(broken), "--windows", "1"), "manifest.json: safetensors/model.safetensors: ", "--no-verify")
    # ... and without it, the reader's own check still refuses the file
    result = factorport("eval", str(broken), "--windows", "1", "--no-verify")
    assert_one_line_error(result, "truncated or corrupted")
    assert "factorport: not checking manifest.json (--no-verify)" in result.stderr


def test_unknown_architecture(tmp_path):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}))
    out = tmp_path / "out"
    result = factorport("convert", str(model), "--recipe", "w8-rtn", "--output", str(out))
    assert_one_line_error(result, "gpt2", "llama", "mistral", "qwen2")
    assert not out.exists()


@pytest.mark.parametrize(
    "recipe, needles",
    [
        ("steps:\n  - quantize: {bits: 3}\n", ["bits", "3"]),
        ("steps:\n  - prune: {}\n", ["unknown step", "prune"]),
        ("steps: [\n", ["not valid YAML"]),
        ("steps:\n  - factorize: {ranks: {rank: 10000}}\n", ["rank 10000", "at most 576"]),
        ("steps:\n  - quantize: {group_size: 128}\n", ["group size 128", "576"]),
    ],
)
def test_bad_recipes(tmp_path, recipe, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(recipe)
    out = tmp_path / "out"
    assert_one_line_error(factorport("convert", "--recipe", str(path), "--output", str(out)), *needles)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


@pytest.mark.parametrize("content", [None, ""])
def test_missing_or_empty_calibration_text(tmp_path, content):
    calib = tmp_path / "calib.txt"
    if content is not None:
        calib.write_text(content)
    out = tmp_path / "out"
    result = factorport("convert", "--recipe", "w4-gptq", "--output", str(out), "--calib", str(calib), *SMALL_CALIB)
    assert_one_line_error(result, "calib")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
