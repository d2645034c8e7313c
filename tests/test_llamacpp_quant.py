"""The `llamacpp` step: bases quantized by llama.cpp's own quantizer, copied
byte for byte into model.gguf, corrected by a LoRA adapter that llama.cpp
applies; the safetensors layout keeps the raw blocks."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from conftest import assert_reload_bit_exact
from factorport.converters import apply
from factorport.converters.llamacpp import LORA_PAIR_OVERHEAD
from factorport.errors import FactorportError
from factorport.formats.gguf import MODEL_FILE, export
from factorport.llamacpp.names import rotary_row_order
from factorport.ops.ggml import GGMLBase
from factorport.recipe import load_recipe, parse_recipe
from factorport.validators.backends.llamacpp_backend import LlamaCppBackend

STEPS = """
name: t
steps:
  - llamacpp: {type: %s}
  - correct: {targets: [linears], shared: false, ranks: {budget: {added_bytes: 6000}}}
"""


@pytest.fixture
def converted(make_model, stats_for):
    model = make_model("llama")
    apply(model, parse_recipe(STEPS % "Q4_K_M").steps, stats_for(model), progress=False)
    return model


def test_every_target_gets_llamacpp_blocks(converted):
    q = converted.model.layers[0].self_attn.q_proj
    assert isinstance(q.base, GGMLBase) and isinstance(converted.lm_head.base, GGMLBase)
    types = {m.base.type_name for m in converted.modules() if isinstance(getattr(m, "base", None), GGMLBase)}
    assert types <= {"Q5_0", "Q8_0", "Q6_K", "Q4_K", "Q5_1", "Q4_0"} and len(types) > 1  # a mix, as llama.cpp picks
    added = [m.rank * (m.in_features + m.out_features) * 2 for m in converted.modules() if isinstance(getattr(m, "base", None), GGMLBase)]
    assert 0 < sum(added) <= 6000  # fp16 U and V: exactly what the adapter holds


def test_blocks_are_copied_unchanged_and_llamacpp_runs_them_with_the_adapter(converted, tmp_path):
    report = export(converted, None, tmp_path, progress=False)
    assert report["requantized"] == []
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / MODEL_FILE).tensors}
    q = converted.model.layers[1].self_attn.q_proj.base
    stored = tensors["blk.1.attn_q.weight"]
    assert stored.tensor_type.name == q.type_name
    assert np.array_equal(np.array(stored.data).reshape(64, -1), q.blocks.numpy()[rotary_row_order(64, 4)])
    assert_llamacpp_matches(converted, tmp_path)


def assert_llamacpp_matches(model, gguf_dir):
    """llama.cpp's logits of the exported model (with its adapter) are torch's, within 2% of the largest."""
    ids = torch.arange(3, 43)
    with torch.no_grad():
        reference = model(ids[None]).logits[0]
    backend = LlamaCppBackend.open(gguf_dir)
    try:
        error = (backend.logits(ids) - reference).abs().max().item()
    finally:
        backend.close()
    assert error < 0.02 * reference.abs().max().item()


def test_safetensors_layout_keeps_the_blocks(converted, input_ids, tmp_path):
    loaded = assert_reload_bit_exact(converted, input_ids, tmp_path)
    assert isinstance(loaded.model.layers[0].mlp.down_proj.base, GGMLBase)


def test_unknown_type_and_the_preset(make_model):
    with pytest.raises(FactorportError, match="not a llama.cpp quantization type"):
        from factorport.converters import check

        check(make_model("llama"), parse_recipe(STEPS % "Q9_Z").steps)
    recipe = load_recipe("glowq-llamacpp")
    assert [name for name, _ in recipe.steps] == ["llamacpp", "correct"] and recipe.needs_calibration


def test_convert_flags_set_the_llamacpp_type_and_the_adapter_budget():
    from factorport.api import _override_steps
    from factorport.cli import _step_options, build_parser

    args = build_parser().parse_args(["convert", "--recipe", "glowq-llamacpp", "-o", "x", "--gguf-type", "Q3_K_M", "--adapter-budget", "2.5"])
    recipe = _override_steps(load_recipe("glowq-llamacpp"), _step_options(args))
    (_, quantize), (_, correct) = recipe.steps
    assert quantize.type == "Q3_K_M" and correct.ranks.budget == {"added_bytes": 2.5e6}
    assert correct.ranks.multiple == 32  # the preset's rank step is kept
    w4 = _override_steps(load_recipe("glowq-w4"), _step_options(args))  # a fixed rank gives way to the budget
    assert [(c.ranks.rank, c.ranks.budget) for name, c in w4.steps if name == "correct"] == [(None, {"added_bytes": 2.5e6})]
    with pytest.raises(FactorportError, match="no correct step"):
        _override_steps(load_recipe("w4-rtn"), _step_options(args))


def test_with_calibration_the_base_is_llama_quantize_with_that_imatrix(make_model, stats_for, tmp_path):
    """The step hands llama.cpp the same importance matrix that
    `llama-quantize --imatrix imatrix.gguf` reads from factorport's file: the
    blocks are byte-identical, differ from a plain quantization, and fit the
    calibration's inputs better."""
    from factorport.converters.llamacpp import _all_tensors
    from factorport.formats.gguf.imatrix import write_imatrix
    from factorport.formats.input_sums import InputSums
    from factorport.llamacpp.hparams import hparams
    from factorport.llamacpp.quantize import write_f32
    from factorport.llamacpp.tools import run_tool

    model = make_model("llama")
    stats = stats_for(model)
    source, imatrix, target = tmp_path / "f32.gguf", tmp_path / "imatrix.gguf", tmp_path / "q4_0.gguf"
    write_f32(source, _all_tensors(model), hparams(model.config))
    write_imatrix(imatrix, model, InputSums(stats.input_sums(list(stats.key_of)), stats.tokens, 64, "random"))
    run_tool("llama-quantize", ["--imatrix", str(imatrix), str(source), str(target), "Q4_0"], timeout=120)
    by_tool = {t.name: np.array(t.data).view(np.uint8).reshape(int(t.shape[1]), -1) for t in gguf.GGUFReader(target).tensors if len(t.shape) == 2}

    errors = {}
    for imatrix_on in (True, False):
        converted = make_model("llama")
        recipe = parse_recipe(f"name: t\nsteps:\n  - llamacpp: {{type: Q4_0, imatrix: {str(imatrix_on).lower()}}}\n")
        reports = apply(converted, recipe.steps, stats, progress=False)
        errors[imatrix_on] = sum(r.calib_error for r in reports if r.name != "lm_head")
        q = converted.model.layers[1].mlp.down_proj
        assert ("imatrix" in q_report(reports, "model.layers.1.mlp.down_proj").operator) == imatrix_on
        same = np.array_equal(q.base.blocks.numpy(), by_tool["blk.1.ffn_down.weight"])
        assert same == imatrix_on
    assert errors[True] < 0.97 * errors[False]


def q_report(reports, name):
    return next(r for r in reports if r.name == name)


def test_equal_bytes_spends_llamacpps_bytes_over_types(make_model, stats_for):
    """`size_of: Q4_K_M`: per-tensor llama.cpp types within the bytes
    llama.cpp's own Q4_K_M mix gives the same tensors, with less calibration
    output error than that mix; the report names each tensor's type and rank."""
    stats = stats_for(make_model("llama"))
    mix = make_model("llama")
    mix_reports = apply(mix, parse_recipe("name: t\nsteps:\n  - llamacpp: {type: Q4_K_M}\n").steps, stats, progress=False)
    model = make_model("llama")
    reports = apply(model, parse_recipe("name: t\nsteps:\n  - llamacpp: {size_of: Q4_K_M}\n").steps, stats, progress=False)
    assert sum(_spent(model)) <= sum(_spent(mix))
    assert len({m.base.type_name for m in _ggml(model)}) > 1
    assert sum(r.calib_error for r in reports) < 0.95 * sum(r.calib_error for r in mix_reports)
    assert all(f"llama.cpp {m.base.type_name}, imatrix, correction rank {m.rank}" in q_report(reports, n).operator
               for n, m in model.named_modules() if n != "lm_head" and m in _ggml(model))


def test_equal_bytes_buys_corrections_that_llamacpp_applies(make_model, stats_for, tmp_path):
    """Bytes beyond one type's bases go to corrections, which llama.cpp runs as the adapter."""
    model = make_model("llama")
    q4_0 = make_model("llama")
    stats = stats_for(model)
    apply(q4_0, parse_recipe("name: t\nsteps:\n  - llamacpp: {type: Q4_0}\n").steps, stats, progress=False)
    target = sum(_spent(q4_0)) + 3000
    recipe = parse_recipe(f"name: t\nsteps:\n  - llamacpp: {{bytes: {target}, types: [Q4_0], correction_ranks: [0, 4]}}\n")
    apply(model, recipe.steps, stats, progress=False)
    assert 0 < sum(_spent(model)) - sum(_spent(q4_0)) <= 3000 and {m.rank for m in _ggml(model)} == {0, 4}
    export(model, None, tmp_path, progress=False)
    assert_llamacpp_matches(model, tmp_path)


def _ggml(model):
    return [m for m in model.modules() if isinstance(getattr(m, "base", None), GGMLBase)]


def _spent(model):
    """The bytes of each llama.cpp base and its correction (fp16 U and V, and the adapter's entries)."""
    return [m.base.blocks.numel() + (m.rank * (m.in_features + m.out_features) * 2 + LORA_PAIR_OVERHEAD if m.rank else 0) for m in _ggml(model)]


def test_equal_bytes_refuses_what_does_not_fit(make_model, stats_for):
    from factorport.converters import check

    model = make_model("llama")
    with pytest.raises(FactorportError, match="size_of 'Q9' is not a llama.cpp"):
        check(model, parse_recipe("name: t\nsteps:\n  - llamacpp: {size_of: Q9}\n").steps)
    with pytest.raises(FactorportError, match="not a ggml type on offer"):
        check(model, parse_recipe("name: t\nsteps:\n  - llamacpp: {size_of: Q4_0, types: [Q4_0, Q7]}\n").steps)
    with pytest.raises(FactorportError, match="below the cheapest option"):
        apply(model, parse_recipe("name: t\nsteps:\n  - llamacpp: {bytes: 1000, types: [Q4_0]}\n").steps, stats_for(model), progress=False)


def test_convert_flags_set_the_byte_target():
    from factorport.api import _override_steps
    from factorport.cli import _step_options, build_parser

    def steps(*flags, recipe="llamacpp-equal-bytes"):
        args = build_parser().parse_args(["convert", "--recipe", recipe, "-o", "x", *flags])
        return _override_steps(load_recipe(recipe), _step_options(args)).steps

    [(_, step)] = steps("--size-of", "Q3_K_M")
    assert (step.size_of, step.bytes) == ("Q3_K_M", None)
    [(_, step)] = steps("--bytes", "9.5e7")
    assert (step.size_of, step.bytes) == (None, 9.5e7)  # replaces the preset's size_of
    with pytest.raises(FactorportError, match="cannot take a byte target"):
        steps("--size-of", "Q4_0", recipe="glowq-llamacpp")  # its correct step would add bytes beyond the target
    with pytest.raises(SystemExit):
        steps("--size-of", "Q4_0", "--bytes", "1e6")
