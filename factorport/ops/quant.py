"""Group-wise integer weight codes: the numeric grid of every quantized base.

A weight matrix (out, in) is cut along its input dimension into groups of
`group_size` columns; each (row, group) has one scale (and, when asymmetric,
one minimum), both kept in float16 because that is what GGUF's Q4_0 / Q4_1 /
Q8_0 blocks and ONNX's MatMulNBits store — so the same codes decode to the same
weights in every format.

    symmetric int4:  w = scale * (q - 8)        q in 0..15   (Q4_0's grid)
    asymmetric int4: w = scale * q + min        q in 0..15   (Q4_1's grid)
    symmetric int8:  w = scale * q              q in -127..127 (Q8_0's grid)
    asymmetric int8: w = scale * q + min        q in 0..255

int4 codes are packed two per byte along the input dimension, element 2j in
the low nibble and 2j+1 in the high nibble (MatMulNBits' order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    """How a matrix is quantized: bit width, group size, symmetry."""

    bits: int = 4
    group_size: int = 64
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"group_size={self.group_size} is not supported; use one of {SUPPORTED_GROUP_SIZES}"
            )

    @property
    def qmax(self) -> int:
        """Largest code value."""
        return (1 << self.bits) - 1

    def check_fits(self, in_features: int, what: str = "matrix") -> None:
        if in_features % self.group_size:
            raise ValueError(
                f"group size {self.group_size} does not divide the input width {in_features} of "
                f"{what}; pick a group size that divides it"
            )


def group_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and minimum) per (row, group) for weights `w` of shape (rows, groups, group_size).

    Returned in float16 (the stored precision); the encoder divides by the
    float16 value so codes and decode agree exactly.
    """
    if spec.symmetric:
        if spec.bits == 4:
            # Q4_0: the signed value of largest magnitude maps to code 0 (i.e. -8),
            # which uses all 16 levels instead of 15.
            idx = w.abs().argmax(dim=-1, keepdim=True)
            extreme = torch.gather(w, -1, idx).squeeze(-1)
            scale = (extreme / -8.0).to(torch.float16)
        else:
            scale = (w.abs().amax(dim=-1) / 127.0).to(torch.float16)
        return scale, None
    lo = w.amin(dim=-1)
    hi = w.amax(dim=-1)
    scale = ((hi - lo) / spec.qmax).to(torch.float16)
    return scale, lo.to(torch.float16)


def encode(
    w: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, minimum: torch.Tensor | None
) -> torch.Tensor:
    """Integer codes (int32, unpacked) for `w` (rows, groups, group_size) on a fixed grid."""
    s = scale.float().unsqueeze(-1)
    inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
    if spec.symmetric:
        if spec.bits == 4:
            return torch.clamp(torch.round(w * inv) + 8, 0, 15).to(torch.int32)
        return torch.clamp(torch.round(w * inv), -127, 127).to(torch.int32)
    m = minimum.float().unsqueeze(-1)
    return torch.clamp(torch.round((w - m) * inv), 0, spec.qmax).to(torch.int32)


def decode(
    codes: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, minimum: torch.Tensor | None
) -> torch.Tensor:
    """Float32 weights from unpacked codes (rows, groups, group_size)."""
    s = scale.float().unsqueeze(-1)
    if spec.symmetric:
        offset = 8 if spec.bits == 4 else 0
        return (codes.float() - offset) * s
    return codes.float() * s + minimum.float().unsqueeze(-1)


def pack(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Storage form of codes (rows, in): uint8 nibble pairs for int4; int8 (symmetric)
    or uint8 (asymmetric) for int8."""
    if spec.bits == 8:
        return codes.to(torch.int8 if spec.symmetric else torch.uint8)
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: int32 codes (rows, in)."""
    if bits == 8:
        return packed.to(torch.int32)
    p = packed.to(torch.int32)
    return torch.stack((p & 0x0F, p >> 4), dim=-1).flatten(-2)


# Rows per step of `quantize_rtn` and `dequantize`: their int32 and float
# temporaries stay ~64 MB each, instead of several copies of a 150k-row
# embedding table. Rows are independent, so the result is the same.
CHUNK_ELEMENTS = 1 << 24


def row_chunks(rows: int, cols: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    # at least one (maybe empty) chunk, so a zero-row weight quantizes too
    return [slice(i, min(i + step, rows)) for i in range(0, max(rows, 1), step)]


def quantize_rtn(w: torch.Tensor, spec: QuantSpec):
    """Round-to-nearest: (packed codes, scale, minimum-or-None) for a 2-D weight."""
    rows, cols = w.shape
    spec.check_fits(cols)
    parts = []
    for chunk in row_chunks(rows, cols):
        g = w[chunk].float().reshape(-1, cols // spec.group_size, spec.group_size)
        scale, minimum = group_params(g, spec)
        parts.append((pack(encode(g, spec, scale, minimum).reshape(-1, cols), spec), scale, minimum))
    codes, scales, minima = zip(*parts)
    return torch.cat(codes), torch.cat(scales), None if minima[0] is None else torch.cat(minima)


def dequantize(
    packed: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, minimum: torch.Tensor | None
) -> torch.Tensor:
    """Float32 weight (rows, in) from stored codes."""
    rows = packed.shape[0]
    cols = packed.shape[1] * (2 if spec.bits == 4 else 1)
    out = torch.empty(rows, cols, dtype=torch.float32, device=packed.device)
    for chunk in row_chunks(rows, cols):
        g = unpack(packed[chunk], spec.bits).reshape(-1, cols // spec.group_size, spec.group_size)
        out[chunk] = decode(g, spec, scale[chunk], None if minimum is None else minimum[chunk]).reshape(-1, cols)
    return out
