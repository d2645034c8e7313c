"""converters: calibration statistics, factorize (methods x rank policies),
quantize (RTN, GPTQ), tied lm_head, biases, and errors through `apply`."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import correlated_activations
from tolerances import network_tolerance
from factorport.converters import (
    CalibrationConfig,
    FactorizeConfig,
    QuantizeConfig,
    apply,
    calibrate,
    check,
)
from factorport.converters.lowrank import input_transform
from factorport.converters.quantize import InverseHessian, clipped_group_params, gptq
from factorport.converters.ranks import Candidate, RankPolicy, allocate
from factorport.converters.report import model_params, module_params, output_error
from factorport.errors import FactorportError
from factorport.ops import CompressedLinear, DenseBase, Projection, QuantizedBase, QuantSpec, TiedEmbedding
from factorport.ops.quant import decode, encode, group_params, quantize_rtn

LINEARS = [f"model.layers.{i}.{rel}" for i in range(2) for rel in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def _factorize(model, stats, method="whitened", targets=("linears",), **ranks):
    config = FactorizeConfig(targets=tuple(targets), method=method, ranks=RankPolicy(**ranks))
    return apply(model, [("factorize", config)], stats, progress=False)


def _quantize(model, stats=None, **kwargs):
    return apply(model, [("quantize", QuantizeConfig(**kwargs))], stats, progress=False)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# ------------------------------------------------------------------ calibration


def test_calibrate_collects_gram_per_input_group(llama, byte_tokenizer, calib_text):
    captured = {}

    def grab(name):
        def hook(module, args):
            captured.setdefault(name, []).append(args[0].detach().clone())
        return hook

    watch = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    handles = [llama.get_submodule(n).register_forward_pre_hook(grab(n)) for n in watch]
    config = CalibrationConfig(source=str(calib_text), samples=3, seq_len=16)
    try:
        stats = calibrate(llama, byte_tokenizer, config, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert stats.tokens == 3 * 16
    # one matrix per input group, keyed by its first linear
    expected_keys = {f"model.layers.{i}.{rel}" for i in range(2)
                     for rel in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")} | {"lm_head"}
    assert set(stats.grams) == expected_keys
    assert stats.key_of["model.layers.1.self_attn.v_proj"] == "model.layers.1.self_attn.q_proj"
    assert stats.key_of["model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.gate_proj"
    assert stats.key_of["lm_head"] == "lm_head"
    assert stats.xtx("model.layers.0.self_attn.k_proj") is stats.grams["model.layers.0.self_attn.q_proj"]
    assert all(stats.has(n) for n in LINEARS + ["lm_head"])
    for name in watch:
        xs = torch.cat(captured[name])  # the sequences, however the forwards batched them
        assert xs.shape[:2] == (3, 16)
        ref = torch.zeros(xs.shape[-1], xs.shape[-1], dtype=torch.float64)
        sinks = torch.zeros_like(ref)
        for h in xs:
            x = h.double()
            sink = h[:1].double()
            ref += x.T @ x
            sinks += sink.T @ sink
        g = stats.grams[name]
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-4)
        # the first token of every sequence, weighted 4 times on request
        torch.testing.assert_close(stats.xtx(name, sink_weight=4.0), ref + 3.0 * sinks, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stats.channel_norms(name), ref.diagonal().sqrt(), rtol=1e-4, atol=1e-4)


def test_calibrate_text_too_short(llama, byte_tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(FactorportError, match="fewer than one sequence"):
        calibrate(llama, byte_tokenizer, CalibrationConfig(source=str(path), samples=2, seq_len=64), progress=False)
    with pytest.raises(FactorportError, match="does not exist"):
        calibrate(llama, byte_tokenizer, CalibrationConfig(source=str(tmp_path / "nope.txt")), progress=False)


# ------------------------------------------------------------------ factorize


@pytest.mark.parametrize("method", ["plain", "whitened", "asvd"])
def test_factorize_fixed_rank(llama, stats_for, input_ids, method):
    stats = stats_for(llama)
    reports = _factorize(llama, stats, method=method, rank=8)
    assert [r.name for r in reports] == LINEARS
    for name in LINEARS:
        m = llama.get_submodule(name)
        assert isinstance(m, CompressedLinear) and m.base is None and m.rank == 8
        assert m.U.shape == (m.out_features, 8) and m.V.V.shape == (8, m.in_features)
    assert isinstance(llama.lm_head, nn.Linear)  # 'linears' does not include lm_head
    for r in reports:
        m = llama.get_submodule(r.name)
        assert r.params_after == 8 * (m.out_features + m.in_features)
        assert r.params_before == m.out_features * m.in_features
        assert 0 < r.calib_error < 1
    assert torch.isfinite(_logits(llama, input_ids)).all()


def test_whitened_error_is_discarded_spectrum(llama, stats_for):
    """For whitened SVD the reported calibration error equals the discarded σ² of W·S."""
    stats = stats_for(llama)
    name = "model.layers.0.mlp.down_proj"
    w = llama.get_submodule(name).weight.detach().double()
    xtx = stats.xtx(name)
    (report,) = _factorize(llama, stats, targets=[name], rank=10)
    # σ(W·S) with S·Sᵀ = XᵀX: the singular values of W·chol(XᵀX)
    s = torch.linalg.svdvals(w @ torch.linalg.cholesky(xtx))
    expected = float((s[10:] ** 2).sum() / (s**2).sum())
    assert report.calib_error == pytest.approx(expected, rel=1e-3)
    assert report.calib_error == pytest.approx(output_error(w, llama.get_submodule(name).to_dense(), xtx), rel=1e-6)


def test_whitening_factors_a_singular_gram_matrix():
    """Fewer calibration tokens than inputs and a dead channel make XᵀX
    singular, and a damping far below float64's precision cannot make it
    factorizable: the damping grows until it can, and S·Sᵀ still is XᵀX."""
    x = torch.randn(8, 32, dtype=torch.float64)
    x[:, 5] = 0
    xtx = x.T @ x
    whitening = input_transform("whitened", xtx, 0.0, 1e-20)
    scale = whitening.scale
    assert torch.equal(scale, scale.tril())
    torch.testing.assert_close(scale @ scale.T, xtx, atol=1e-6 * float(xtx.diagonal().mean()), rtol=0)
    w = torch.randn(3, 32, dtype=torch.float64)
    torch.testing.assert_close(whitening.undo(whitening.apply(w)), w)


@pytest.mark.parametrize("rank", [2, 8, 20])
def test_whitened_beats_plain_at_same_rank(make_model, stats_for, rank):
    base = make_model("llama")
    stats = stats_for(base)
    errors = {}
    for method in ("plain", "asvd", "whitened"):
        model = copy.deepcopy(base)
        errors[method] = {r.name: r.calib_error for r in _factorize(model, stats, method=method, rank=rank)}
    for name in LINEARS:
        assert errors["whitened"][name] <= errors["plain"][name] * (1 + 1e-6)
        assert errors["whitened"][name] <= errors["asvd"][name] * (1 + 1e-6)
    # on correlated activations the gap is large, not a rounding accident
    total = {m: sum(e.values()) for m, e in errors.items()}
    assert total["whitened"] < 0.8 * total["plain"]
    assert total["asvd"] < total["plain"]


def test_plain_factorization_minimizes_weight_error(llama):
    name = "model.layers.0.self_attn.o_proj"
    w = llama.get_submodule(name).weight.detach().clone()
    _factorize(llama, None, method="plain", targets=[name], rank=12)
    approx = llama.get_submodule(name).to_dense()
    s = torch.linalg.svdvals(w.double())
    err = float(((w.double() - approx.double()) ** 2).sum())
    assert err == pytest.approx(float((s[12:] ** 2).sum()), rel=1e-4)
    # U and V share σ evenly: ||U|| == ||V|| column/row-wise
    m = llama.get_submodule(name)
    torch.testing.assert_close(m.U.norm(dim=0), m.V.V.norm(dim=1), rtol=1e-4, atol=1e-6)


def test_full_rank_factorization_reproduces_model(make_model, input_ids):
    model = make_model("mistral")
    ref = _logits(model, input_ids)
    _full_rank(model, None, "model.layers.*")
    for name in LINEARS:
        m = model.get_submodule(name)
        assert m.rank == min(m.in_features, m.out_features)
    torch.testing.assert_close(_logits(model, input_ids), ref, rtol=1e-4, atol=1e-4)


def _full_rank(model, stats, prefix):
    """Factorize at full rank (k/v are 32x64, the rest have 64 as their small side)."""
    kv = [f"{prefix}.self_attn.k_proj", f"{prefix}.self_attn.v_proj"]
    rest = [f"{prefix}.self_attn.q_proj", f"{prefix}.self_attn.o_proj", f"{prefix}.mlp.*"]
    method = "plain" if stats is None else "whitened"
    _factorize(model, stats, method=method, targets=kv, rank=32)
    _factorize(model, stats, method=method, targets=rest, rank=64)


def test_ratio_policy(llama, stats_for):
    reports = _factorize(llama, stats_for(llama), ratio=0.5)
    for r in reports:
        m = llama.get_submodule(r.name)
        unit = m.in_features + m.out_features
        assert m.rank == int(0.5 * m.in_features * m.out_features / unit)
        assert r.params_after <= 0.5 * r.params_before


def test_ratio_policy_multiple(llama, stats_for):
    _factorize(llama, stats_for(llama), ratio=0.5, multiple=8)
    ranks = {n: llama.get_submodule(n).rank for n in LINEARS}
    assert all(r % 8 == 0 and r > 0 for r in ranks.values())
    assert ranks["model.layers.0.self_attn.q_proj"] == 16  # 0.5*4096/128 = 16
    assert ranks["model.layers.0.self_attn.k_proj"] == 8  # 0.5*2048/96 = 10.7 -> 8


@pytest.mark.parametrize("energy", [0.5, 0.9])
def test_energy_policy_smallest_rank_holding_energy(llama, energy):
    weights = {n: llama.get_submodule(n).weight.detach().double().clone() for n in LINEARS}
    _factorize(llama, None, method="plain", energy=energy)
    for name, w in weights.items():
        s2 = torch.linalg.svdvals(w) ** 2
        frac = torch.cumsum(s2, 0) / s2.sum()
        r = int(torch.searchsorted(frac, torch.tensor(energy, dtype=frac.dtype) - 1e-12)) + 1
        assert frac[r - 1] >= energy - 1e-6
        assert r == 1 or frac[r - 2] < energy
        module = llama.get_submodule(name)
        if isinstance(module, CompressedLinear):
            assert module.rank == r
        else:  # kept dense: that rank would not have saved anything
            assert r * sum(w.shape) >= w.numel()


def test_energy_policy_keeps_unprofitable_matrix_dense(llama):
    _factorize(llama, None, method="plain", energy=0.99)
    for name in LINEARS:
        m = llama.get_submodule(name)
        if isinstance(m, CompressedLinear):
            assert m.num_params() < m.in_features * m.out_features, name


def _params(model, names):
    return sum(module_params(model.get_submodule(n)) for n in names)


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.9])
@pytest.mark.parametrize("method", ["plain", "whitened"])
def test_budget_params_ratio_respected(make_model, stats_for, ratio, method):
    model = make_model("llama")
    before = _params(model, LINEARS)
    assert before == 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192)
    _factorize(model, stats_for(model) if method == "whitened" else None, method=method, budget={"params_ratio": ratio})
    after = _params(model, LINEARS)
    assert after <= ratio * before
    assert after >= (ratio - 0.05) * before  # the budget is actually spent
    for name in LINEARS:
        m = model.get_submodule(name)
        if isinstance(m, CompressedLinear):  # a factorization never costs more than dense
            assert m.num_params() <= m.in_features * m.out_features


def test_budget_leaves_unprofitable_matrix_dense(make_model):
    """Every matrix but one is exactly rank 2; the full-rank one gets the budget,
    reaches break-even and stays a dense nn.Linear."""
    model = make_model("llama")
    keep = "model.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in LINEARS:
            lin = model.get_submodule(name)
            if name != keep:
                a = torch.randn(lin.out_features, 2, generator=g)
                b = torch.randn(2, lin.in_features, generator=g)
                lin.weight.copy_(0.05 * a @ b)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in LINEARS}
    before = _params(model, LINEARS)
    ratio = 8500 / before
    reports = _factorize(model, None, method="plain", budget={"params_ratio": ratio})
    assert isinstance(model.get_submodule(keep), nn.Linear)
    kept = [r for r in reports if r.name == keep]
    if kept:  # reported as kept dense, at no change
        assert kept[0].operator.startswith("dense")
        assert kept[0].params_after == kept[0].params_before == 64 * 64
    for name in LINEARS:
        if name != keep:
            m = model.get_submodule(name)
            assert isinstance(m, CompressedLinear) and m.rank >= 2
            # rank 2 matrices are reproduced
            torch.testing.assert_close(m.to_dense(), weights[name], rtol=1e-4, atol=1e-5)
    assert _params(model, LINEARS) <= ratio * before


def test_budget_whole_model_params(make_model):
    model = make_model("llama")
    total_before = model_params(model)
    linear_params = _params(model, LINEARS)
    budget = total_before - 0.4 * linear_params
    _factorize(model, None, method="plain", budget={"params": budget})
    assert model_params(model) <= budget
    assert model_params(model) >= budget - 0.05 * linear_params


def test_budget_allocate_prefers_concentrated_spectrum():
    flat = Candidate("flat", 64, 64, torch.ones(64), 64 * 64 * 4, 4)
    steep = Candidate("steep", 64, 64, 0.5 ** torch.arange(64).float(), 64 * 64 * 4, 4)
    ranks = allocate([flat, steep], RankPolicy(budget={"params_ratio": 0.65}))
    # steep's error vanishes after a few ranks: the rest goes to flat, which
    # reaches break-even (rank 32 of a 64x64) and so stays dense
    assert ranks["flat"] is None
    assert ranks["steep"] is not None and 4 <= ranks["steep"] <= 10
    # with less budget flat cannot reach break-even: factorized, steep still cheap
    ranks = allocate([flat, steep], RankPolicy(budget={"params_ratio": 0.4}))
    assert ranks["flat"] is not None and ranks["flat"] > ranks["steep"]


def test_budget_too_small_raises(llama):
    with pytest.raises(FactorportError, match="budget"):
        _factorize(llama, None, method="plain", budget={"params_ratio": 0.001})


def test_rank_larger_than_matrix_raises(llama):
    # k_proj is 32x64: rank 33 does not fit it
    with pytest.raises(FactorportError, match=r"rank 33.*k_proj") as info:
        _factorize(llama, None, method="plain", rank=33)
    assert "step 1 (factorize)" in str(info.value)
    assert all(isinstance(llama.get_submodule(n), nn.Linear) for n in LINEARS)  # nothing touched
    with pytest.raises(FactorportError, match="rank 33"):
        check(llama, [("factorize", FactorizeConfig(method="plain", ranks=RankPolicy(rank=33)))])


def test_whitened_without_stats_raises(llama):
    with pytest.raises(FactorportError, match="calibration"):
        _factorize(llama, None, method="whitened", rank=4)


def test_targets_match_nothing(llama):
    with pytest.raises(FactorportError, match="match no linear"):
        _factorize(llama, None, method="plain", targets=["model.nothing.*"], rank=4)


def test_target_patterns(llama):
    reports = _factorize(llama, None, method="plain", targets=["model.layers.1.mlp.*"], rank=4)
    assert [r.name for r in reports] == [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert isinstance(llama.model.layers[0].mlp.gate_proj, nn.Linear)


# ------------------------------------------------------------------ quantize


@pytest.mark.parametrize("bits, group, sym", [(4, 32, True), (4, 64, False), (8, 64, True)])
def test_rtn_quantize_model(llama, input_ids, bits, group, sym):
    weights = {n: llama.get_submodule(n).weight.detach().clone() for n in LINEARS}
    ref = _logits(llama, input_ids)
    reports = _quantize(llama, method="rtn", bits=bits, group_size=group, symmetric=sym)
    assert [r.name for r in reports] == LINEARS
    assert all(r.calib_error is None for r in reports)
    for name, w in weights.items():
        m = llama.get_submodule(name)
        assert isinstance(m, CompressedLinear) and isinstance(m.base, QuantizedBase)
        codes, scale, minimum = quantize_rtn(w, QuantSpec(bits, group, sym))
        assert torch.equal(m.base.codes, codes) and torch.equal(m.base.scale, scale)
    out = _logits(llama, input_ids)
    assert not torch.equal(out, ref)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < (0.2 if bits == 4 else 0.02)


def test_group_size_not_dividing_raises_before_touching(llama):
    # hidden size 64: groups of 128 do not fit q_proj
    with pytest.raises(FactorportError, match="group size 128") as info:
        _quantize(llama, method="rtn", group_size=128)
    assert "q_proj" in str(info.value)
    assert all(isinstance(llama.get_submodule(n), nn.Linear) for n in LINEARS)


def test_gptq_without_stats_raises(llama):
    with pytest.raises(FactorportError, match="calibration"):
        _quantize(llama, method="gptq")


def test_gptq_beats_rtn_on_calibration_error(make_model, stats_for):
    base = make_model("llama")
    stats = stats_for(base)
    errors = {}
    for method in ("rtn", "gptq"):
        model = copy.deepcopy(base)
        errors[method] = {r.name: r.calib_error for r in _quantize(model, stats, method=method, group_size=32)}
    for name in LINEARS:
        assert errors["gptq"][name] < errors["rtn"][name], name
    assert sum(errors["gptq"].values()) < 0.5 * sum(errors["rtn"].values())


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 64, False), QuantSpec(8, 32, True)])
def test_gptq_single_layer(spec):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 128, generator=g)
    x = correlated_activations(512, 128, seed=5)
    xtx = x.T @ x
    base = gptq(w, InverseHessian.of(xtx.clone(), 0.01), spec, block_size=64)
    rtn = QuantizedBase.from_weight(w, spec)
    e_gptq = output_error(w, base.to_dense(), xtx)
    e_rtn = output_error(w, rtn.to_dense(), xtx)
    assert e_gptq < 0.7 * e_rtn
    # real outputs on the activations agree with the Gram-based error
    y = x.float() @ w.T
    assert float(((x.float() @ base.to_dense().T - y) ** 2).sum() / (y**2).sum()) == pytest.approx(e_gptq, rel=1e-2)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(8, 32, True)])
def test_clip_search_never_rounds_worse(spec):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 1, 32, generator=g)
    importance = torch.rand(32, generator=g) + 0.5

    def weighted_error(scale, minimum):
        q = decode(encode(w, spec, scale, minimum), spec, scale, minimum)
        return ((q - w) ** 2 * importance).sum(dim=-1)

    plain = weighted_error(*group_params(w, spec))
    clipped = weighted_error(*clipped_group_params(w, spec, importance))
    assert bool((clipped <= plain).all())  # the full range is one of the candidates
    if spec.bits == 4:  # 16 levels: a shrunken range pays on Gaussian weights (int8's 255 do not need it)
        assert float(clipped.sum()) < 0.95 * float(plain.sum())


def test_gptq_clip_search_lowers_output_error():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(8))
    x = correlated_activations(512, 128, seed=9)
    xtx = x.T @ x
    spec = QuantSpec(4, 64, True)
    plain = output_error(w, gptq(w, InverseHessian.of(xtx.clone(), 0.01), spec, 128).to_dense(), xtx)
    clipped = output_error(w, gptq(w, InverseHessian.of(xtx.clone(), 0.01), spec, 128, clip_search=True).to_dense(), xtx)
    assert clipped < plain


def test_gptq_with_identity_hessian_is_rtn():
    """With uncorrelated inputs there is no error to push: GPTQ's codes are RTN's."""
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(6))
    spec = QuantSpec(4, 32, False)
    base = gptq(w, InverseHessian.of(torch.eye(128), 0.01), spec, block_size=128)
    codes, scale, minimum = quantize_rtn(w, spec)
    assert torch.equal(base.codes, codes)
    assert torch.equal(base.scale, scale) and torch.equal(base.minimum, minimum)


def test_gptq_dead_channels():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(7))
    x = correlated_activations(256, 64, seed=8)
    x[:, 5] = 0
    base = gptq(w, InverseHessian.of(x.T @ x, 0.01), QuantSpec(4, 32, True), block_size=128)
    dense = base.to_dense()
    assert torch.isfinite(dense).all()
    assert (dense[:, 5] == 0).all()  # an input that is always zero gets weight zero


def test_quantize_keeps_lowrank_term(llama, input_ids):
    name = "model.layers.0.mlp.up_proj"
    lin = llama.get_submodule(name)
    u, v = torch.randn(lin.out_features, 3) * 0.01, torch.randn(3, lin.in_features) * 0.01
    proj = Projection(v)
    llama.set_submodule(name, CompressedLinear(lin.in_features, lin.out_features, DenseBase(lin.weight.detach()), u, proj))
    _quantize(llama, targets=[name], method="rtn", bits=8, group_size=32)
    m = llama.get_submodule(name)
    assert isinstance(m.base, QuantizedBase)
    assert m.U is u and m.V is proj
    expected = QuantizedBase.from_weight(lin.weight.detach(), QuantSpec(8, 32, True)).to_dense() + u @ v
    torch.testing.assert_close(m.to_dense(), expected)


def test_quantize_skips_factorized_linear(llama, capsys):
    _factorize(llama, None, method="plain", targets=["model.layers.0.mlp.up_proj"], rank=4)
    before = llama.model.layers[0].mlp.up_proj
    reports = _quantize(llama, method="rtn", group_size=32)
    assert "model.layers.0.mlp.up_proj" not in {r.name for r in reports}
    assert llama.model.layers[0].mlp.up_proj is before
    assert "skips model.layers.0.mlp.up_proj" in capsys.readouterr().out


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_tied_lm_head(llama, input_ids, bits):
    assert llama.lm_head.weight is llama.model.embed_tokens.weight
    table = llama.lm_head.weight.detach().clone()
    reference = copy.deepcopy(llama)
    _quantize(llama, targets=["lm_head"], method="rtn", bits=bits, group_size=32)
    head = llama.lm_head
    emb = llama.get_input_embeddings()
    assert isinstance(head, CompressedLinear) and isinstance(head.base, QuantizedBase)
    assert isinstance(emb, TiedEmbedding)
    assert emb.padding_idx == reference.model.embed_tokens.padding_idx
    assert torch.equal(emb(input_ids), head.to_dense()[input_ids])
    # stored once: no separate embedding table remains
    keys = set(llama.state_dict())
    assert "model.embed_tokens.weight" not in keys and "lm_head.base.codes" in keys
    # same as a dense model whose (tied) table is the dequantized one
    with torch.no_grad():
        reference.lm_head.weight.copy_(head.to_dense())
    torch.testing.assert_close(_logits(llama, input_ids), _logits(reference, input_ids), rtol=1e-4, atol=1e-4)
    deq = head.to_dense()
    assert not torch.equal(deq, table)


def test_quantize_untied_lm_head_keeps_embedding(mistral):
    _quantize(mistral, targets=["lm_head"], method="rtn", group_size=32)
    assert isinstance(mistral.lm_head, CompressedLinear)
    assert isinstance(mistral.get_input_embeddings(), nn.Embedding)


# ------------------------------------------------------------------ biases (qwen2)


def test_qwen2_dense_base_reproduces_outputs(qwen2, input_ids):
    ref = _logits(qwen2, input_ids)
    for name in LINEARS:
        lin = qwen2.get_submodule(name)
        qwen2.set_submodule(name, CompressedLinear.from_linear(lin, DenseBase(lin.weight.detach())))
    assert qwen2.model.layers[0].self_attn.q_proj.bias is not None
    assert qwen2.model.layers[0].mlp.up_proj.bias is None
    assert (_logits(qwen2, input_ids) - ref).abs().max() <= network_tolerance(qwen2.config, input_ids.shape[-1]) * ref.abs().max()


def test_qwen2_biases_survive_conversion(qwen2, stats_for, input_ids):
    biases = {n: qwen2.get_submodule(n).bias.detach().clone() for n in LINEARS if qwen2.get_submodule(n).bias is not None}
    assert len(biases) == 6  # q/k/v of two layers
    ref = _logits(qwen2, input_ids)
    stats = stats_for(qwen2)
    kv = ["model.layers.*.self_attn.[kv]_proj"]
    _factorize(qwen2, stats, targets=kv, rank=32)
    _factorize(qwen2, stats, targets=["model.layers.*.self_attn.q_proj"], rank=64)
    torch.testing.assert_close(_logits(qwen2, input_ids), ref, rtol=1e-4, atol=1e-4)
    _quantize(qwen2, stats, method="gptq", targets=["model.layers.*.mlp.*", "model.layers.*.self_attn.o_proj"], bits=8, group_size=32)
    for name, b in biases.items():
        m = qwen2.get_submodule(name)
        assert isinstance(m, CompressedLinear) and torch.equal(m.bias, b)
    out = _logits(qwen2, input_ids)
    assert float((out - ref).norm() / ref.norm()) < 0.02
    # without the biases the outputs would be far off
    for name in biases:
        qwen2.get_submodule(name).bias = None
    assert float((_logits(qwen2, input_ids) - ref).norm() / ref.norm()) > 0.05
