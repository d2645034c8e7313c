"""ops.quant: the group-wise integer grid every quantized base uses."""

from __future__ import annotations

import pytest
import torch

from factorport.ops import quant
from factorport.ops.quant import (
    QuantSpec,
    decode,
    dequantize,
    encode,
    group_params,
    pack,
    quantize_rtn,
    unpack,
)

ALL_SPECS = [QuantSpec(b, g, s) for b in (4, 8) for g in (32, 64, 128) for s in (True, False)]


def _weight(rows=8, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g)


# ------------------------------------------------------------------ packing


def test_int4_pack_two_per_byte_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0, 7, 8]], dtype=torch.int32)
    packed = pack(codes, QuantSpec(4, 32, True))
    assert packed.dtype == torch.uint8
    assert packed.shape == (1, 3)
    # element 2j in the low nibble, 2j+1 in the high nibble
    assert packed.tolist() == [[0x21, 0x0F, 0x87]]
    assert torch.equal(unpack(packed, 4), codes)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_pack_unpack_round_trip(symmetric):
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (5, 64), generator=g, dtype=torch.int32)
    packed = pack(codes, QuantSpec(4, 64, symmetric))
    assert packed.shape == (5, 32)
    assert torch.equal(unpack(packed, 4), codes)


def test_int8_pack_dtypes_and_round_trip():
    g = torch.Generator().manual_seed(2)
    sym = torch.randint(-127, 128, (3, 64), generator=g, dtype=torch.int32)
    packed = pack(sym, QuantSpec(8, 64, True))
    assert packed.dtype == torch.int8
    assert torch.equal(unpack(packed, 8), sym)
    asym = torch.randint(0, 256, (3, 64), generator=g, dtype=torch.int32)
    packed = pack(asym, QuantSpec(8, 64, False))
    assert packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, 8), asym)


# ------------------------------------------------------------------ grids


def test_symmetric_int4_is_the_q4_0_grid():
    spec = QuantSpec(4, 32, True)
    scale = torch.tensor([[0.5]], dtype=torch.float16)
    codes = torch.arange(16, dtype=torch.int32).reshape(1, 1, 16).repeat(1, 1, 2)
    w = decode(codes, spec, scale, None)
    # w = scale * (q - 8): code 0 is -8 steps, code 8 is zero, code 15 is +7 steps
    assert torch.equal(w[0, 0, :16], 0.5 * (torch.arange(16).float() - 8))
    # encoding the grid points gives back their codes
    assert torch.equal(encode(w, spec, scale, None), codes)


def test_symmetric_int4_extreme_maps_to_code_zero():
    """Q4_0: the signed value of largest magnitude gets code 0 (all 16 levels used)."""
    spec = QuantSpec(4, 32, True)
    for sign in (1.0, -1.0):
        w = torch.linspace(-1, 1, 32) * 0.5
        w[5] = 3.0 * sign  # the extreme
        g = w.reshape(1, 1, 32)
        scale, minimum = group_params(g, spec)
        assert minimum is None
        assert scale.dtype == torch.float16
        assert float(scale) == pytest.approx(3.0 * sign / -8.0, rel=1e-3)
        codes = encode(g, spec, scale, minimum)
        assert int(codes[0, 0, 5]) == 0
        assert codes.min() >= 0 and codes.max() <= 15
        assert float(decode(codes, spec, scale, minimum)[0, 0, 5]) == pytest.approx(3.0 * sign, rel=1e-3)


def test_asymmetric_int4_is_the_q4_1_grid():
    spec = QuantSpec(4, 32, False)
    scale = torch.tensor([[0.25]], dtype=torch.float16)
    minimum = torch.tensor([[-1.0]], dtype=torch.float16)
    codes = torch.arange(16, dtype=torch.int32).reshape(1, 1, 16).repeat(1, 1, 2)
    w = decode(codes, spec, scale, minimum)
    assert torch.equal(w[0, 0, :16], 0.25 * torch.arange(16).float() - 1.0)
    assert torch.equal(encode(w, spec, scale, minimum), codes)


def test_asymmetric_params_span_min_to_max():
    spec = QuantSpec(4, 32, False)
    g = _weight(4, 64).reshape(4, 2, 32)
    scale, minimum = group_params(g, spec)
    assert scale.dtype == torch.float16 and minimum.dtype == torch.float16
    torch.testing.assert_close(minimum.float(), g.amin(-1), rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(scale.float() * 15, g.amax(-1) - g.amin(-1), rtol=2e-3, atol=1e-3)
    codes = encode(g, spec, scale, minimum)
    # the group minimum gets code 0 and the maximum code 15
    assert torch.equal(codes.gather(-1, g.argmin(-1, keepdim=True)).flatten(), torch.zeros(8, dtype=torch.int32))
    assert torch.equal(codes.gather(-1, g.argmax(-1, keepdim=True)).flatten(), torch.full((8,), 15, dtype=torch.int32))


def test_symmetric_int8_grid():
    spec = QuantSpec(8, 32, True)
    g = _weight(4, 64).reshape(4, 2, 32)
    scale, minimum = group_params(g, spec)
    assert minimum is None
    torch.testing.assert_close(scale.float(), g.abs().amax(-1) / 127, rtol=2e-3, atol=0)
    codes = encode(g, spec, scale, minimum)
    assert codes.min() >= -127 and codes.max() <= 127
    # the largest magnitude reaches ±127, no offset is applied
    top = codes.gather(-1, g.abs().argmax(-1, keepdim=True)).abs().flatten()
    assert torch.equal(top, torch.full((8,), 127, dtype=torch.int32))
    w = decode(codes, spec, scale, minimum)
    torch.testing.assert_close(w, codes.float() * scale.float().unsqueeze(-1))


def test_scales_stored_as_float16_and_decode_uses_them():
    spec = QuantSpec(4, 64, False)
    packed, scale, minimum = quantize_rtn(_weight(), spec)
    assert scale.dtype == torch.float16 and minimum.dtype == torch.float16
    codes = unpack(packed, 4).reshape(8, 2, 64)
    expected = codes.float() * scale.float().unsqueeze(-1) + minimum.float().unsqueeze(-1)
    assert torch.equal(dequantize(packed, spec, scale, minimum), expected.reshape(8, 128))


# ------------------------------------------------------------------ rtn


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: f"b{s.bits}g{s.group_size}{'s' if s.symmetric else 'a'}")
def test_quantize_rtn_error_within_half_a_step(spec):
    w = _weight(16, 256, seed=spec.bits + spec.group_size)
    packed, scale, minimum = quantize_rtn(w, spec)
    rows, groups = 16, 256 // spec.group_size
    assert scale.shape == (rows, groups)
    assert packed.shape == (rows, 128 if spec.bits == 4 else 256)
    back = dequantize(packed, spec, scale, minimum)
    err = (back - w).abs().reshape(rows, groups, spec.group_size)
    step = scale.float().abs().unsqueeze(-1)
    bound = 0.5 * step * (1 + 1e-2) + 1e-6
    if spec.bits == 4 and spec.symmetric:
        # Q4_0 reaches -8 steps on the extreme's side but only +7 on the other:
        # values beyond +7 steps (opposite the extreme) clip by up to one step.
        signed = w.reshape(rows, groups, spec.group_size) / scale.float().unsqueeze(-1)
        clipped = signed > 7.5
        bound = torch.where(clipped, step * (1 + 1e-2) + 1e-6, bound)
    assert (err <= bound).all(), float((err - bound).max())
    # and it is not trivially exact either: a real grid was applied
    assert err.max() > 0
    # relative error is what the bit width promises
    rel = float((back - w).norm() / w.norm())
    assert rel < (0.15 if spec.bits == 4 else 0.01)


def test_quantize_rtn_exact_on_grid_points():
    """Weights already on the grid come back bit for bit."""
    spec = QuantSpec(4, 32, False)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (4, 64), generator=g, dtype=torch.int32)
    codes[:, 0] = 0
    codes[:, 32] = 0
    codes[:, 1] = 15
    codes[:, 33] = 15
    w = codes.float() * 0.125 - 1.0
    packed, scale, minimum = quantize_rtn(w, spec)
    assert torch.equal(unpack(packed, 4), codes)
    assert torch.equal(dequantize(packed, spec, scale, minimum), w)


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(8, 64, False)], ids=("b4s", "b8a"))
def test_rtn_in_row_chunks_equals_one_pass(spec, monkeypatch):
    """A large table is quantized and decoded a few rows at a time (memory);
    the codes, scales and weights are those of one pass over all rows."""
    w = _weight(37, 128, seed=5)
    whole = quantize_rtn(w, spec)
    dense = dequantize(*whole[:1], spec, *whole[1:])
    monkeypatch.setattr(quant, "CHUNK_ELEMENTS", 5 * 128)  # 8 chunks, the last of 2 rows
    assert len(quant.row_chunks(37, 128)) == 8
    chunked = quantize_rtn(w, spec)
    for a, b in zip(whole, chunked):
        assert a is None and b is None or torch.equal(a, b)
    assert torch.equal(dequantize(*chunked[:1], spec, *chunked[1:]), dense)


def test_group_size_must_divide_width():
    with pytest.raises(ValueError, match=r"group size 64 does not divide the input width 96"):
        quantize_rtn(_weight(4, 96), QuantSpec(4, 64, True))


@pytest.mark.parametrize("kwargs, field", [({"bits": 3}, "bits=3"), ({"group_size": 48}, "group_size=48"), ({"bits": 2}, "bits=2")])
def test_quantspec_rejects_unsupported(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantSpec(**kwargs)


def test_quantspec_qmax():
    assert QuantSpec(4, 32).qmax == 15
    assert QuantSpec(8, 32).qmax == 255
