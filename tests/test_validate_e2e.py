"""`factorport validate` and `bench` on a freshly converted sample artifact
exported to every format: it passes; a corrupted copy fails on the check
that should catch it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from factorport.cli import main
from factorport.formats.manifest import refresh_manifest

pytestmark = pytest.mark.e2e

SCHEMA = json.loads((Path(__file__).parents[1] / "docs" / "validation.schema.json").read_text())

# int4 sym g32 (= Q4_0 / MatMulNBits block 32) + a shared correction of the
# gate/up group (ONNX: one MatMul per group; GGUF: LoRA adapter; only that
# group, to keep the test short) + lm_head int8 g32 (= Q8_0): lossless in
# every format, with a small calibration.
RECIPE = """
name: validate-e2e
calibration: {samples: 8, seq_len: 128}
steps:
  - quantize: {targets: [linears], method: rtn, bits: 4, group_size: 32, symmetric: true}
  - correct: {targets: ["*.mlp.gate_proj", "*.mlp.up_proj"], shared: true, ranks: {rank: 8}}
  - quantize: {targets: [lm_head], method: rtn, bits: 8, group_size: 32, symmetric: true}
"""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    out = root / "out"
    assert main(["convert", "--recipe", str(recipe), "--output", str(out), "--format", "safetensors,onnx,gguf", "--quiet"]) == 0
    return out


def test_gguf_is_named_after_the_source_model(artifact, tmp_path):
    """Not after the staging directory it was exported from, on convert and on a later export."""
    from gguf import GGUFReader

    from factorport.api import export

    def name_in(path: Path) -> str:
        field = GGUFReader(path).fields["general.name"]
        return bytes(field.parts[field.data[0]]).decode()

    expected = json.loads((artifact / "manifest.json").read_text())["source"]["name"]
    assert name_in(artifact / "gguf" / "model.gguf") == expected
    copy = _copy(artifact, tmp_path)
    export(copy, ["gguf"], force=True, progress=False)
    assert name_in(copy / "gguf" / "model.gguf") == expected


def _validate(out: Path, tmp: Path, *extra: str) -> tuple[int, dict, str]:
    json_path, junit = tmp / "v.json", tmp / "v.xml"
    status = main(["validate", str(out), "--windows", "2", "--json", str(json_path), "--junit", str(junit), "--quiet", *extra])
    return status, json.loads(json_path.read_text()), junit.read_text()


def test_fresh_artifact_passes_on_every_backend(artifact, tmp_path):
    status, result, junit = _validate(artifact, tmp_path)
    jsonschema.validate(result, SCHEMA)
    assert status == 0, result["failures"]
    assert set(result["backends"]) == {"onnxruntime", "llama.cpp"}
    assert result["backends"]["onnxruntime"]["top1_agreement"] == 1.0
    assert result["reference"]["original_perplexity"] < result["reference"]["perplexity"] < 2 * result["reference"]["original_perplexity"]
    assert 'failures="0"' in junit
    assert (artifact / "report" / "validation.md").read_text().count("| yes |") >= 4


def _copy(artifact: Path, tmp: Path) -> Path:
    copy = tmp / "copy"
    shutil.copytree(artifact, copy)
    return copy


def _corrupt_onnx(copy: Path) -> None:
    """Scale the scales of the graph's first MatMulNBits (layer 0's first linear) by 50."""
    import onnx
    from onnx import numpy_helper

    path = copy / "onnx" / "model.onnx"
    model = onnx.load(str(path), load_external_data=True)
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    init = next(i for i in model.graph.initializer if i.name == node.input[2])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 50, init.name))
    for extra in (copy / "onnx").glob("*.onnx_data"):
        extra.unlink()
    onnx.save(model, str(path), save_as_external_data=False)


def _corrupt_gguf(copy: Path) -> None:
    """Overwrite the bytes of one tensor (layer 0's ffn_down) with noise."""
    from gguf import GGUFReader

    path = copy / "gguf" / "model.gguf"
    reader = GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    offset, size = int(tensor.data_offset), int(tensor.n_bytes)
    del reader
    noise = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(noise)


@pytest.mark.parametrize("backend, corrupt", [("onnxruntime", _corrupt_onnx), ("llama.cpp", _corrupt_gguf)])
def test_corrupted_file_fails_the_manifest_check(artifact, tmp_path, backend, corrupt):
    copy = _copy(artifact, tmp_path)
    corrupt(copy)
    status, result, junit = _validate(copy, tmp_path)
    assert status == 1 and result["reference"] is None  # nothing ran on a changed file
    assert result["failures"] and all(f.startswith("manifest: ") for f in result["failures"])
    assert ("onnx/" if backend == "onnxruntime" else "gguf/model.gguf") in result["failures"][0]


@pytest.mark.parametrize("backend, corrupt", [("onnxruntime", _corrupt_onnx), ("llama.cpp", _corrupt_gguf)])
def test_corruption_behind_a_fresh_manifest_fails_parity(artifact, tmp_path, backend, corrupt):
    """A bad exporter writes its own (matching) manifest: the parity checks of
    that backend catch it, and only that backend fails."""
    copy = _copy(artifact, tmp_path)
    corrupt(copy)
    refresh_manifest(copy)
    status, result, _ = _validate(copy, tmp_path)
    assert status == 1 and result["manifest"]["passed"]
    assert not result["backends"][backend]["passed"]
    other = "llama.cpp" if backend == "onnxruntime" else "onnxruntime"
    assert result["backends"][other]["passed"]
    assert all(f.startswith(f"{backend}: ") for f in result["failures"])


def test_bench_reports_speed_next_to_its_bound(artifact, tmp_path):
    json_path = tmp_path / "bench.json"
    status = main(["bench", str(artifact), "--no-anchors", "--repeats", "2", "--prompt-tokens", "64", "--new-tokens", "8", "--json", str(json_path), "--quiet"])
    result = json.loads(json_path.read_text())
    assert status == 0, [r.get("error") for r in result["runs"]]
    assert {r["backend"] for r in result["runs"]} == {"onnxruntime", "llama.cpp"}
    for run in result["runs"]:
        assert 0 < run["decode_tokens_per_s"]["min"] <= run["decode_tokens_per_s"]["median"] <= run["decode_tokens_per_s"]["max"]
        assert run["bound_tokens_per_s"] == pytest.approx(result["machine"]["bandwidth_bytes_per_s"] / run["bytes_read_per_token"])
        assert run["peak_rss_bytes"] > run["baseline_rss_bytes"] > 0
        assert run["perplexity"] < 100
    assert os.path.getsize(artifact / "report" / "plots" / "pareto.png") > 10_000
    assert "bound tok/s" in (artifact / "report" / "bench.md").read_text()
