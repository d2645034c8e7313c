"""onnxruntime-genai on tiny random models: the exporter's genai_config.json
names what the graph has, og.Model runs the directory as onnxruntime does,
and a genai_config.json that disagrees with the graph is refused before
onnxruntime-genai reads it."""

from __future__ import annotations

import json

import pytest
import torch

from factorport.errors import FactorportError
from factorport.formats.onnx.genai import GENAI_CONFIG
from factorport.validators.backends.onnxruntime_backend import OnnxruntimeBackend
from factorport.validators.backends.torch_backend import TorchBackend
from test_onnx import compressed, exported

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai does not install on this platform")
from factorport.validators.backends.genai_backend import GenaiBackend  # noqa: E402


@pytest.fixture
def tiny_export(make_model, stats_for, tmp_path):
    model = compressed(make_model, stats_for, "w4-rtn")
    out, _, graph = exported(model, tmp_path)
    return model, out, graph


def test_config_names_the_graphs_inputs_and_shape(tiny_export):
    model, out, graph = tiny_export
    config = json.loads((out / GENAI_CONFIG).read_text())
    decoder = config["model"]["decoder"]
    names = {i.name for i in graph.graph.input}
    assert set(decoder["inputs"].values()) - {"past_key_values.%d.key", "past_key_values.%d.value"} <= names
    assert {decoder["inputs"]["past_key_names"] % i for i in range(model.config.num_hidden_layers)} <= names
    assert decoder["num_hidden_layers"] == model.config.num_hidden_layers
    assert decoder["num_key_value_heads"] == model.config.num_key_value_heads
    assert config["search"]["past_present_share_buffer"] is False


def test_og_runs_the_export_as_onnxruntime_and_torch_do(tiny_export, input_ids):
    model, out, _ = tiny_export
    ours = GenaiBackend.open(out, threads=1)
    ids = input_ids[0]
    expected = OnnxruntimeBackend.open(out, threads=1).logits(ids)
    got = ours.logits(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    prompt = ids.tolist()
    generation = ours.generate(prompt, 8)
    reference = TorchBackend(model).generate(prompt, 8).tokens
    assert generation.tokens == reference[: len(generation.tokens)] and generation.tokens
    assert generation.prefill_seconds > 0 and len(generation.decode_seconds) == len(generation.tokens) - 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["model"]["decoder"].update(num_hidden_layers=99), "num_hidden_layers"),
        (lambda c: c["model"]["decoder"]["inputs"].update(past_key_names="past.%d.k"), "inputs"),
        (lambda c: c["search"].update(past_present_share_buffer=True), "past_present_share_buffer"),
        (lambda c: c.pop("model"), "no model.decoder"),
    ],
)
def test_a_config_that_disagrees_with_the_graph_is_refused(tiny_export, change, message):
    _, out, _ = tiny_export
    config = json.loads((out / GENAI_CONFIG).read_text())
    change(config)
    (out / GENAI_CONFIG).write_text(json.dumps(config))
    with pytest.raises(FactorportError, match=message):
        GenaiBackend.open(out)


def test_missing_or_broken_config_is_one_line(tiny_export):
    _, out, _ = tiny_export
    (out / GENAI_CONFIG).write_text("{not json")
    with pytest.raises(FactorportError, match="not valid JSON"):
        GenaiBackend.open(out)
    (out / GENAI_CONFIG).unlink()
    with pytest.raises(FactorportError, match="re-export"):
        GenaiBackend.open(out)


def test_og_runs_the_written_accuracy_level_and_validation_follows_it(make_model, stats_for, input_ids, tmp_path):
    from factorport.validators.backends import written_options
    from factorport.validators.thresholds import numeric_path

    model = compressed(make_model, stats_for, "w4-gptq-tied4")
    out, _, _ = exported(model, tmp_path, accuracy_level=4)
    ids = input_ids[0]
    got = GenaiBackend.open(out, threads=1).logits(ids)
    fast = OnnxruntimeBackend.open(out, threads=1, accuracy_level=4).logits(ids)
    exact = OnnxruntimeBackend.open(out, threads=1).logits(ids)
    assert (got - fast).abs().max() <= 1e-4 * fast.abs().max()  # og ran int8 activations, as written
    assert not torch.equal(fast, exact)
    with pytest.raises(FactorportError, match="runs the graph's MatMulNBits accuracy_level 4, not 0"):
        GenaiBackend.open(out, accuracy_level=0)
    (tmp_path / "output").mkdir()
    (tmp_path / "onnx").rename(tmp_path / "output" / "onnx")
    options = written_options("onnxruntime-genai", tmp_path / "output")
    assert options == {"accuracy_level": 4} and numeric_path("onnxruntime-genai", options) == "onnxruntime-int8"
    assert written_options("onnxruntime", tmp_path / "output") == {}
