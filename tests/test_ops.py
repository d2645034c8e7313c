"""ops: every base kind computes what its dense weight says; shared
projections compute V·x once; tied embeddings read the compressed table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tolerances import assert_product_close

from factorport.ops import (
    BlockSparseBase,
    CompressedLinear,
    DenseBase,
    Projection,
    QuantizedBase,
    QuantSpec,
    TiedEmbedding,
)

OUT, IN = 48, 128


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _dense_base():
    return DenseBase(_rand(OUT, IN, seed=1))


def _quant_base(bits, group, symmetric, out=OUT, inp=IN):
    return QuantizedBase.from_weight(_rand(out, inp, seed=bits * 1000 + group), QuantSpec(bits, group, symmetric))


def _block_sparse(values_kind="dense", block=(8, 32), kept=2, out=OUT, inp=IN):
    br, bc = block
    g = torch.Generator().manual_seed(7)
    blocks_in = inp // bc
    indices = torch.stack([torch.randperm(blocks_in, generator=g)[:kept].sort().values for _ in range(out // br)])
    compact = _rand(out, kept * bc, seed=8)
    if values_kind == "dense":
        values = DenseBase(compact)
    else:
        values = QuantizedBase.from_weight(compact, QuantSpec(4, 32, values_kind == "sym"))
    return BlockSparseBase(indices, values, block, inp), indices, values


def _bases():
    yield "dense", _dense_base()
    for bits in (4, 8):
        for group in (32, 64, 128):
            for sym in (True, False):
                yield f"q{bits}g{group}{'s' if sym else 'a'}", _quant_base(bits, group, sym)
    yield "sparse-dense", _block_sparse("dense")[0]
    yield "sparse-q4s", _block_sparse("sym")[0]
    yield "sparse-q4a", _block_sparse("asym")[0]


BASES = list(_bases())
BASE_IDS = [b[0] for b in BASES]


def _lowrank(rank=6, seed=11):
    return _rand(OUT, rank, seed=seed) * 0.3, Projection(_rand(rank, IN, seed=seed + 1) * 0.3)


@pytest.mark.parametrize("with_lowrank", [False, True], ids=["nolr", "lr"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name, base", BASES, ids=BASE_IDS)
def test_forward_equals_dense_weight(name, base, with_bias, with_lowrank):
    u, proj = _lowrank() if with_lowrank else (None, None)
    bias = _rand(OUT, seed=5) if with_bias else None
    lin = CompressedLinear(IN, OUT, base, u, proj, bias=bias)
    x = _rand(3, 5, IN, seed=9)
    y = lin(x)
    assert y.shape == (3, 5, OUT)
    ref = x @ lin.to_dense().T + (0 if bias is None else bias)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    if with_lowrank:  # the low-rank term is really included
        base_only = x @ base.to_dense().T + (0 if bias is None else bias)
        assert (y - base_only).abs().max() > 1e-2


def test_lowrank_only_forward():
    u, proj = _lowrank()
    lin = CompressedLinear(IN, OUT, None, u, proj)
    x = _rand(4, IN, seed=3)
    assert_product_close(lin(x), x @ (u @ proj.V).T, x, proj.V.T, u.T)
    torch.testing.assert_close(lin.to_dense(), u @ proj.V)
    assert lin.rank == 6


def test_needs_base_or_lowrank():
    with pytest.raises(ValueError):
        CompressedLinear(IN, OUT, None)
    with pytest.raises(ValueError):
        CompressedLinear(IN, OUT, _dense_base(), u=_rand(OUT, 2))  # U without V


QUANT_BASES = [(n, b) for n, b in BASES if isinstance(b, QuantizedBase)]


@pytest.mark.parametrize("name, base", QUANT_BASES, ids=[n for n, _ in QUANT_BASES])
def test_quantized_dense_weight_close_to_source(name, base):
    """to_dense of a quantized base is the weight it was built from, up to rounding."""
    src = _rand(OUT, IN, seed=base.qspec.bits * 1000 + base.qspec.group_size)
    rel = float((base.to_dense() - src).norm() / src.norm())
    assert 0 < rel < (0.15 if base.qspec.bits == 4 else 0.01)


@pytest.mark.parametrize("name, base", BASES, ids=BASE_IDS)
def test_rows_equal_dense_rows(name, base):
    u, proj = _lowrank()
    lin = CompressedLinear(IN, OUT, base, u, proj)
    ids = torch.tensor([[0, 5, 47], [3, 3, 20]])
    rows = lin.rows(ids)
    assert rows.shape == (2, 3, IN)
    assert_product_close(rows, lin.to_dense()[ids], u[ids], proj.V, extra=base.to_dense()[ids])
    torch.testing.assert_close(base.rows(ids), base.to_dense()[ids], rtol=0, atol=0)


def test_block_sparse_dense_layout():
    base, indices, values = _block_sparse("dense")
    br, bc = base.block_shape
    dense = base.to_dense()
    compact = values.to_dense()
    kept_cols = set()
    for r in range(indices.shape[0]):
        rows = slice(r * br, (r + 1) * br)
        mask = torch.zeros(IN, dtype=torch.bool)
        for j, b in enumerate(indices[r].tolist()):
            mask[b * bc : (b + 1) * bc] = True
            # kept block j of block-row r sits at compact columns j*bc..(j+1)*bc
            assert torch.equal(dense[rows, b * bc : (b + 1) * bc], compact[rows, j * bc : (j + 1) * bc])
            kept_cols.add(b)
        assert (dense[rows][:, ~mask] == 0).all()
    assert base.density == pytest.approx(indices.shape[1] * bc / IN)
    assert base.num_params() == OUT * indices.shape[1] * bc
    assert base.spec()["blocks_per_row"] == indices.shape[1]


def test_num_params():
    u, proj = _lowrank(rank=4)
    bias = torch.zeros(OUT)
    private = CompressedLinear(IN, OUT, _dense_base(), u, proj, bias=bias)
    assert private.num_params() == OUT * IN + OUT * 4 + 4 * IN + OUT
    shared = CompressedLinear(IN, OUT, None, u, proj, shared_name="g")
    assert shared.num_params() == OUT * 4  # the shared V is counted where it is registered
    q = CompressedLinear(IN, OUT, _quant_base(4, 32, True), None, None)
    assert q.num_params() == OUT * IN


# ------------------------------------------------------------------ shared projections


class _QKV(nn.Module):
    def __init__(self, members):
        super().__init__()
        self.q, self.k, self.v = members

    def forward(self, x):
        return self.q(x), self.k(x), self.v(x)


def _group(shared: bool, rank=5):
    outs = (32, 16, 16)
    us = [_rand(o, rank, seed=20 + i) for i, o in enumerate(outs)]
    if shared:
        proj = Projection(_rand(rank, IN, seed=30))
        members = [CompressedLinear(IN, o, None, u, proj, shared_name="attn.qkv_shared") for o, u in zip(outs, us)]
        return members, [proj]
    projs = [Projection(_rand(rank, IN, seed=30 + i)) for i in range(3)]
    members = [CompressedLinear(IN, o, None, u, p) for o, u, p in zip(outs, us, projs)]
    return members, projs


def test_shared_projection_one_matmul_per_forward():
    members, (proj,) = _group(shared=True)
    block = _QKV(members)
    x = _rand(2, 7, IN, seed=1)
    outs = block(x)
    assert proj.calls == 1
    for m, y in zip(members, outs):
        assert_product_close(y, x @ m.to_dense().T, x, proj.V.T, m.U.T)
    block(x.clone())  # a new input tensor: one more matmul, not three
    assert proj.calls == 2
    with torch.inference_mode():
        xi = x.clone()
        block(xi)
    assert proj.calls == 3


def test_shared_projection_recomputes_after_in_place_change():
    members, (proj,) = _group(shared=True)
    x = _rand(3, IN, seed=2)
    members[0](x)
    x.mul_(2.0)
    y = members[1](x)
    assert proj.calls == 2
    assert_product_close(y, x @ members[1].to_dense().T, x, proj.V.T, members[1].U.T)


def test_private_projections_one_matmul_each():
    members, projs = _group(shared=False)
    _QKV(members)(_rand(2, 7, IN, seed=1))
    assert [p.calls for p in projs] == [1, 1, 1]


def test_shared_projection_is_stored_once():
    members, (proj,) = _group(shared=True)
    block = _QKV(members)
    # the members do not own it: it is no child of theirs and not in their state
    for m in members:
        assert "projection" not in dict(m.named_children())
        assert not any(k.endswith("V") for k in m.state_dict())
        assert m.V is proj
        assert m.num_params() == m.out_features * 5
    block.qkv_shared = proj
    keys = [k for k in block.state_dict() if k.endswith(".V")]
    assert keys == ["qkv_shared.V"]


def test_set_lowrank_switches_to_shared():
    u, proj = _lowrank(rank=3)
    lin = CompressedLinear(IN, OUT, _dense_base(), u, proj)
    assert "projection.V" in lin.state_dict()
    shared = Projection(_rand(3, IN, seed=40))
    lin.set_lowrank(u, shared, "g")
    assert "projection.V" not in lin.state_dict()
    assert lin.V is shared and lin.shared_name == "g"
    x = _rand(2, IN, seed=4)
    assert_product_close(lin(x), x @ (lin.base.weight + u @ shared.V).T, x, shared.V.T, u.T, extra=x.abs() @ lin.base.weight.abs().T)


# ------------------------------------------------------------------ tied embedding


@pytest.mark.parametrize("kind", ["quantized", "lowrank", "quantized+lowrank"])
def test_tied_embedding_reads_compressed_head(kind):
    vocab, dim = 40, 64
    base = QuantizedBase.from_weight(_rand(vocab, dim, seed=50), QuantSpec(4, 32, True)) if "quantized" in kind else None
    u, proj = (None, None)
    if "lowrank" in kind:
        u, proj = _rand(vocab, 4, seed=51), Projection(_rand(4, dim, seed=52))
    head = CompressedLinear(dim, vocab, base, u, proj)
    emb = TiedEmbedding(head, padding_idx=0)
    assert (emb.num_embeddings, emb.embedding_dim, emb.padding_idx) == (vocab, dim, 0)
    ids = torch.tensor([[1, 7, 39], [0, 0, 12]])
    out = emb(ids)
    assert out.shape == (2, 3, dim)
    if u is None:
        assert torch.equal(out, head.to_dense()[ids])
    else:
        assert_product_close(out, head.to_dense()[ids], u[ids], proj.V, extra=0 if base is None else base.to_dense()[ids])
    torch.testing.assert_close(emb.weight, head.to_dense())
    # the table is not a child of the embedding (stored once, with the head)
    assert list(emb.state_dict()) == []
