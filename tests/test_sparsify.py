"""`sparsify`: Wanda block sparsity, N:M, quantized kept blocks (GQSA)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_reload_bit_exact

from factorport.converters import CorrectConfig, SparsifyConfig, apply
from factorport.converters.ranks import RankPolicy
from factorport.converters.sparsify import sparse_base
from factorport.errors import FactorportError
from factorport.ops import BlockSparseBase, QuantizedBase

UP = "model.layers.0.mlp.up_proj"


def _sparsify(model, stats, **kw):
    return apply(model, [("sparsify", SparsifyConfig(**kw))], stats, progress=False)


def test_every_block_row_keeps_the_same_share(llama, stats_for):
    _sparsify(llama, stats_for(llama), block_rows=2, block_cols=16, density=0.5)
    base = llama.get_submodule(UP).base
    assert isinstance(base, BlockSparseBase)
    dense = base.to_dense()
    blocks = dense.reshape(dense.shape[0] // 2, 2, dense.shape[1] // 16, 16).abs().sum(dim=(1, 3)) > 0
    assert (blocks.sum(dim=1) == blocks.shape[1] // 2).all()  # exactly half the blocks in every block-row
    assert base.density == 0.5


def test_kept_blocks_hold_the_original_weights(llama, stats_for):
    weight = llama.get_submodule(UP).weight.detach().clone()
    _sparsify(llama, stats_for(llama), block_cols=16, density=0.25)
    dense = llama.get_submodule(UP).base.to_dense()
    kept = dense != 0
    assert torch.equal(dense[kept], weight[kept])
    assert kept.float().mean() == pytest.approx(0.25, abs=0.01)


def test_wanda_keeps_blocks_with_large_activations():
    weight = torch.ones(4, 64)
    norms = torch.ones(64)
    norms[32:48] = 10.0  # block 2 of 4 (cols 32..47) sees large activations
    base = sparse_base(weight, norms, SparsifyConfig(block_cols=16, density=0.25))
    assert (base.indices == 2).all()
    magnitude = sparse_base(weight * torch.arange(1, 65).float(), None, SparsifyConfig(method="magnitude", block_cols=16, density=0.25))
    assert (magnitude.indices == 3).all()  # the largest weights are in the last block


@pytest.mark.parametrize("bits", [None, 4])
def test_compensation_lowers_calibration_error(llama, stats_for, make_model, bits):
    stats = stats_for(llama)
    twin = make_model("llama")
    twin.load_state_dict(llama.state_dict())
    kw = dict(block_cols=32, density=0.5, bits=bits, group_size=32)
    compensated = _sparsify(llama, stats, compensate=True, **kw)
    copied = _sparsify(twin, stats, **kw)
    assert sum(r.calib_error for r in compensated) < 0.9 * sum(r.calib_error for r in copied)
    # the pattern is the same: the mask comes from the scores, not the sweep
    assert torch.equal(llama.get_submodule(UP).base.indices, twin.get_submodule(UP).base.indices)


def test_two_four_keeps_two_of_every_four(llama, stats_for):
    _sparsify(llama, stats_for(llama), pattern="2:4")
    dense = llama.get_submodule(UP).base.to_dense()
    nonzero = (dense != 0).reshape(dense.shape[0], -1, 4).sum(dim=2)
    assert (nonzero == 2).all()


def test_gqsa_quantized_kept_blocks_round_trip(llama, stats_for, input_ids, tmp_path):
    _sparsify(llama, stats_for(llama), block_cols=32, density=0.5, bits=4, group_size=32)
    base = llama.get_submodule(UP).base
    assert isinstance(base.values, QuantizedBase) and base.values.qspec.bits == 4
    assert_reload_bit_exact(llama, input_ids, tmp_path)


def test_wanda_beats_magnitude_on_calibration_error(llama, stats_for):
    from transformers import AutoModelForCausalLM

    stats = stats_for(llama)
    twin = AutoModelForCausalLM.from_config(llama.config)
    twin.load_state_dict(llama.state_dict())
    wanda = sum(r.calib_error for r in _sparsify(llama, stats, block_cols=16, density=0.5))
    magnitude = sum(r.calib_error for r in _sparsify(twin, stats, method="magnitude", block_cols=16, density=0.5))
    assert wanda < magnitude


def test_sparse_plus_lowrank_correction(llama, stats_for):
    stats = stats_for(llama)
    reports = apply(
        llama,
        [("sparsify", SparsifyConfig(density=0.5, block_cols=16)), ("correct", CorrectConfig(shared=False, ranks=RankPolicy(rank=8)))],
        stats,
        progress=False,
    )
    sparse = {r.name: r.calib_error for r in reports if r.step == "sparsify"}
    corrected = {r.name: r.calib_error for r in reports if r.step == "correct"}
    assert all(corrected[n] < sparse[n] for n in corrected)


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"block_cols": 48}, "does not tile"),
        ({"pattern": "3:2"}, "0 < N < M"),
        ({"pattern": "half"}, "neither 'block' nor 'N:M'"),
        ({"bits": 4, "group_size": 64, "block_cols": 16, "density": 0.25}, "group size 64 does not divide"),
    ],
)
def test_bad_sparsify_configs(llama, stats_for, kw, needle):
    with pytest.raises(FactorportError, match=needle):
        _sparsify(llama, stats_for(llama), **kw)
