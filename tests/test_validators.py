"""validate / bench machinery on hand-made inputs: parity metrics, thresholds,
reports, the JSON schema, the manifest gate, bytes read per token."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest
import torch

from factorport.errors import FactorportError
from factorport.formats.manifest import write_manifest
from factorport.recipe import parse_recipe
from factorport.validators.parity import ParityAccumulator
from factorport.validators.report import validation_junit, validation_markdown
from factorport.validators.thresholds import checks_for
from factorport.validators.validate import ValidateConfig, validate

SCHEMA = json.loads((Path(__file__).parents[1] / "docs" / "validation.schema.json").read_text())


def _window(seed: int = 0, n: int = 16, vocab: int = 50):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * 4, torch.randint(0, vocab, (n,), generator=g)


def test_identical_logits_are_perfect_parity():
    logits, ids = _window()
    acc = ParityAccumulator()
    acc.add(logits, logits.clone(), ids)
    m = acc.metrics()
    assert m["max_abs_logit_diff"] == 0 and m["top1_agreement"] == 1.0
    assert abs(m["mean_kl"]) < 1e-9 and m["perplexity_rel_diff"] == 0


def test_a_flipped_near_tie_agrees_and_is_counted_but_a_real_flip_does_not():
    """fp32 summation order can flip two logits 1e-6 apart; a flip by more
    than the tolerance is a different prediction."""
    from factorport.validators.parity import TIE_TOLERANCE

    logits, ids = _window()
    scale = float(logits.abs().max())
    for gap, agreement, ties in ((0.5 * TIE_TOLERANCE, 1.0, 1), (2 * TIE_TOLERANCE, 15 / 16, 0)):
        reference = logits.clone()
        best, runner_up = reference[3].topk(2).indices
        reference[3, runner_up] = reference[3, best] - gap * scale  # the reference's runner-up, `gap` below its best
        backend = reference.clone()
        backend[3, [best, runner_up]] = reference[3, [runner_up, best]]  # the backend picks the runner-up
        acc = ParityAccumulator()
        acc.add(reference, backend, ids)
        m = acc.metrics()
        assert (m["top1_agreement"], m["top1_near_ties"]) == (pytest.approx(agreement), ties)


def test_parity_metrics_see_a_flipped_prediction():
    logits, ids = _window()
    changed = logits.clone()
    runner_up = changed[3].topk(2).indices[1]
    changed[3, runner_up] = changed[3].max() + 1.0  # position 3 now predicts another token
    delta = float(changed[3, runner_up] - logits[3, runner_up])
    acc = ParityAccumulator()
    acc.add(logits, changed, ids)
    m = acc.metrics()
    assert m["top1_agreement"] == pytest.approx(15 / 16)
    assert m["max_abs_logit_diff"] == pytest.approx(delta)
    assert m["max_abs_logit_diff_rel"] == pytest.approx(delta / float(logits.abs().max()))
    assert m["mean_kl"] > 0
    # perplexity of the backend, computed independently
    log_q = torch.log_softmax(changed, -1)
    nll = -float(log_q[torch.arange(15), ids[1:]].sum())
    assert m["perplexity"] == pytest.approx(math.exp(nll / 15), rel=1e-6)


def test_thresholds_per_path_and_overrides():
    fp32 = checks_for("onnxruntime", {"accuracy_level": 0})
    int8 = checks_for("onnxruntime", {"accuracy_level": 4})
    assert "max_abs_logit_diff_rel" in fp32 and "max_abs_logit_diff_rel" not in int8
    assert not fp32["max_abs_logit_diff_rel"].passes(2e-3) and fp32["max_abs_logit_diff_rel"].passes(5e-4)
    assert int8["top1_agreement"].passes(0.95) and not int8["top1_agreement"].passes(0.9)
    over = {"llama.cpp:top1_agreement": 0.5}
    assert checks_for("llama.cpp", {}, over)["top1_agreement"].limit == 0.5
    assert checks_for("onnxruntime", {}, over)["top1_agreement"].limit == 1.0  # scoped to llama.cpp
    with pytest.raises(FactorportError, match="unknown threshold"):
        checks_for("llama.cpp", {}, {"speed": 1.0})


def test_recipe_carries_thresholds():
    text = "steps:\n  - quantize: {bits: 8}\nvalidate: {thresholds: {'llama.cpp:mean_kl': 0.05}}\n"
    assert parse_recipe(text).thresholds == {"llama.cpp:mean_kl": 0.05}
    with pytest.raises(FactorportError, match="validate.thresholds.latency: unknown metric"):
        parse_recipe("steps:\n  - quantize: {bits: 8}\nvalidate: {thresholds: {latency: 1}}\n")


def _result(passed_check: bool) -> dict:
    check = {"check": "top1_agreement", "value": 0.99 if passed_check else 0.5, "threshold": ">= 0.97", "passed": passed_check}
    metrics = {"perplexity": 30.0, "perplexity_rel_diff": 0.001, "max_abs_logit_diff": 0.1, "max_abs_logit_diff_rel": 0.01,
               "mean_abs_logit_diff": 0.01, "mean_kl": 0.001, "top1_agreement": check["value"]}
    entry = {"backend": "llama.cpp", "options": {}, "error": None, **metrics, "checks": [check], "passed": passed_check}
    failures = [] if passed_check else ["llama.cpp: top1_agreement = 0.5 (needs >= 0.97)"]
    return {
        "schema": "factorport.validation/1", "artifact": "out", "text": "t.txt", "windows": 2, "seq_len": 512,
        "manifest": {"passed": True, "problems": []},
        "reference": {"backend": "torch", "perplexity": 30.0, "original": "m", "original_perplexity": 28.0},
        "backends": {"llama.cpp": entry}, "failures": failures, "passed": passed_check,
    }


def test_reports_show_each_check():
    failing = _result(False)
    jsonschema.validate(failing, SCHEMA)
    suites = ET.fromstring(validation_junit(failing).split("?>", 1)[1])
    assert suites.get("tests") == "2" and suites.get("failures") == "1"
    case = suites.find("testsuite[@name='llama.cpp']/testcase[@name='top1_agreement']")
    assert case is not None and case.find("failure") is not None
    markdown = validation_markdown(failing)
    assert "**FAILED**" in markdown and "top1_agreement = 0.5" in markdown
    assert "**PASSED**" in validation_markdown(_result(True))


def test_schema_rejects_a_result_missing_metrics():
    broken = _result(True)
    del broken["backends"]["llama.cpp"]["mean_kl"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)


def test_a_changed_file_fails_before_anything_runs(tmp_path):
    (tmp_path / "safetensors").mkdir()
    weights = tmp_path / "safetensors" / "model.safetensors"
    weights.write_bytes(b"not really weights")
    write_manifest(tmp_path, {"source": {"kind": "default"}})
    weights.write_bytes(b"not really weightz")
    result = validate(tmp_path, ValidateConfig(text=tmp_path / "missing.txt", progress=False))
    jsonschema.validate(result, SCHEMA)
    assert result["passed"] is False and result["reference"] is None
    assert result["failures"] == ["manifest: safetensors/model.safetensors: sha256 differs from the manifest"]


def test_onnx_bytes_read_leave_out_a_gathered_table(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from factorport.validators.bandwidth import bytes_read_per_token

    table = numpy_helper.from_array(np.zeros((100, 8), np.float32), "table")
    weight = numpy_helper.from_array(np.zeros((8, 4), np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["h"]), helper.make_node("MatMul", ["h", "weight"], ["y"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [table, weight],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    assert bytes_read_per_token(tmp_path) == 8 * 4 * 4
