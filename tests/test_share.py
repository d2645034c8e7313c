"""`share`: one V per input group, stored once, computed once per forward."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from factorport.converters import ShareConfig, apply
from factorport.converters.ranks import RankPolicy
from factorport.converters.lowrank import shared_name
from factorport.formats import safetensors_dir
from factorport.ops import CompressedLinear, Projection

QKV = tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")


def _share(model, stats, **ranks):
    return apply(model, [("share", ShareConfig(ranks=RankPolicy(**ranks)))], stats, progress=False)


def test_qkv_share_one_projection(llama, stats_for):
    stats = stats_for(llama)
    _share(llama, stats, rank=16)
    members = [llama.get_submodule(n) for n in QKV]
    assert all(isinstance(m, CompressedLinear) and m.base is None for m in members)
    assert members[0].V is members[1].V is members[2].V
    assert members[0].shared_name == shared_name(QKV) == "model.layers.0.self_attn.shared_q_k_v"
    assert isinstance(llama.get_submodule(shared_name(QKV)), Projection)
    # o_proj and down_proj read inputs of their own: private V
    assert llama.get_submodule("model.layers.0.self_attn.o_proj").shared_name is None


def test_shared_v_computed_once_per_forward(llama, stats_for, input_ids):
    stats = stats_for(llama)
    _share(llama, stats, rank=16)
    projection = llama.get_submodule(shared_name(QKV))
    gate_up = llama.get_submodule("model.layers.0.mlp.shared_gate_up")
    with torch.no_grad():
        llama(input_ids)
        llama(input_ids)
    assert projection.calls == 2  # three members, two forwards
    assert gate_up.calls == 2


def test_full_rank_share_is_exact(llama, stats_for, input_ids):
    stats = stats_for(llama)
    with torch.no_grad():
        reference = llama(input_ids).logits
    weights = {n: llama.get_submodule(n).weight.detach().clone() for n in QKV}
    _share(llama, stats, rank=64)  # hidden size 64: every stacked group keeps full rank
    for name in QKV:
        torch.testing.assert_close(llama.get_submodule(name).to_dense(), weights[name].float(), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(llama(input_ids).logits, reference, rtol=1e-3, atol=1e-4)


def test_shared_v_stored_once_and_round_trips(llama, stats_for, input_ids, tmp_path):
    stats = stats_for(llama)
    reports = _share(llama, stats, rank=8)
    # the shared V is reported once, as its own row
    assert sum(r.name == shared_name(QKV) for r in reports) == 1
    with torch.no_grad():
        before = llama(input_ids).logits
    safetensors_dir.save(llama, None, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
    assert sum(k.endswith(".V") and "self_attn" in k and "layers.0." in k for k in keys) == 2  # shared qkv + private o
    assert f"{shared_name(QKV)}.V" in keys
    loaded, _ = safetensors_dir.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, before)


def test_rank_checked_against_the_stacked_group(llama, stats_for):
    from factorport.errors import FactorportError

    # k_proj alone is 32x64, but the q/k/v stack is 128x64: rank 64 fits the group
    _share(llama, stats_for(llama), rank=64)
    with pytest.raises(FactorportError, match="rank 65 .* at most 64"):
        _share(_fresh(llama), None, rank=65)


def _fresh(model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(model.config)


def test_share_needs_calibration(llama):
    from factorport.errors import FactorportError

    with pytest.raises(FactorportError, match="calibration"):
        apply(llama, [("share", ShareConfig(ranks=RankPolicy(rank=8)))], None, progress=False)


def test_across_layers_shares_storage_not_compute(llama, stats_for, input_ids, tmp_path):
    stats = stats_for(llama)
    reports = apply(llama, [("share", ShareConfig(targets=("*.mlp.up_proj",), across_layers=2, ranks=RankPolicy(rank=16)))], stats, progress=False)
    ups = [llama.get_submodule(f"model.layers.{i}.mlp.up_proj") for i in range(2)]
    assert ups[0].V is ups[1].V and ups[0].shared_name == "model.layers.0.mlp.shared_up_x2"
    assert any("storage only" in r.operator for r in reports)
    with torch.no_grad():
        before = llama(input_ids).logits
    assert ups[0].V.calls == 2  # different inputs: computed once per layer
    safetensors_dir.save(llama, None, tmp_path)
    loaded, _ = safetensors_dir.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, before)
