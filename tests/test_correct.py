"""`correct`: EoRA / GlowQ low-rank corrections of a quantized base."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_reload_bit_exact

from factorport.converters import CorrectConfig, QuantizeConfig, apply
from factorport.converters.ranks import RankPolicy
from factorport.converters.lowrank import shared_name
from factorport.errors import FactorportError
from factorport.ops import CompressedLinear

QKV = tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
W4 = ("quantize", QuantizeConfig(method="rtn", bits=4, group_size=32))


def _run(model, stats, **correct):
    return apply(model, [W4, ("correct", CorrectConfig(**correct))], stats, progress=False)


@pytest.mark.parametrize("shared", [True, False])
def test_correction_reduces_calibration_error(llama, stats_for, shared):
    stats = stats_for(llama)
    reports = _run(llama, stats, shared=shared, ranks=RankPolicy(rank=8))
    quantized = {r.name: r.calib_error for r in reports if r.step == "quantize"}
    corrected = {r.name: r.calib_error for r in reports if r.step == "correct" and r.calib_error is not None}
    assert set(corrected) == set(quantized)
    assert all(corrected[n] < quantized[n] for n in corrected)
    q = llama.get_submodule(QKV[0])
    assert q.base is not None and q.rank == 8
    assert (q.shared_name == shared_name(QKV)) is shared


def test_shared_correction_is_one_projection_computed_once(llama, stats_for, input_ids):
    _run(llama, stats_for(llama), shared=True, ranks=RankPolicy(rank=8))
    members = [llama.get_submodule(n) for n in QKV]
    assert members[0].V is members[1].V is members[2].V
    projection = members[0].V
    with torch.no_grad():
        llama(input_ids)
    assert projection.calls == 1


def test_balanced_members_lower_the_summed_relative_error(make_model, stats_for):
    """Balancing makes the shared V minimise the sum of the members' relative
    errors, which is what the per-linear report measures."""
    totals = {}
    for balance in (False, True):
        model = make_model("llama")
        reports = _run(model, stats_for(model), shared=True, ranks=RankPolicy(rank=4), factor_dtype="float32", balance_members=balance)
        totals[balance] = sum(r.calib_error for r in reports if r.step == "correct" and r.calib_error is not None)
    assert totals[True] < totals[False]


def test_balancing_a_single_linear_changes_nothing(make_model, stats_for):
    dense = {}
    for balance in (False, True):
        model = make_model("llama")
        _run(model, stats_for(model), shared=False, ranks=RankPolicy(rank=4), factor_dtype="float32", balance_members=balance)
        dense[balance] = model.get_submodule(QKV[0]).to_dense()
    assert torch.equal(dense[True], dense[False])


def test_full_rank_correction_restores_the_weight(llama, stats_for):
    weights = {n: llama.get_submodule(n).weight.detach().clone() for n in QKV}
    _run(llama, stats_for(llama), shared=False, ranks=RankPolicy(rank=32), factor_dtype="float32")
    for name in QKV[1:]:  # k/v are 32x64: rank 32 is their full rank
        torch.testing.assert_close(llama.get_submodule(name).to_dense(), weights[name].float(), rtol=1e-4, atol=1e-4)


def test_budget_is_selective_and_respected(llama, stats_for):
    budget = 6000  # bytes: a few rank-8 corrections, not all
    reports = _run(llama, stats_for(llama), shared=True, ranks=RankPolicy(budget={"added_bytes": budget}, multiple=4))
    added = sum(r.bytes_after - r.bytes_before for r in reports if r.step == "correct")
    assert 0 < added <= budget
    corrected = [n for n, m in llama.named_modules() if isinstance(m, CompressedLinear) and m.U is not None]
    quantized = [n for n, m in llama.named_modules() if isinstance(m, CompressedLinear)]
    assert 0 < len(corrected) < len(quantized)  # GlowQ-S: only where it pays


def test_corrected_model_round_trips(llama, stats_for, input_ids, tmp_path):
    _run(llama, stats_for(llama), shared=True, ranks=RankPolicy(rank=4))
    assert_reload_bit_exact(llama, input_ids, tmp_path)


def test_correct_without_a_base_is_refused(llama, stats_for):
    with pytest.raises(FactorportError, match="compressed base"):
        apply(llama, [("correct", CorrectConfig())], stats_for(llama), progress=False)
