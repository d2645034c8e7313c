"""factorport's group-quantized codes as onnxruntime's `com.microsoft.MatMulNBits`.

MatMulNBits computes `A @ dequant(B)^T` with B laid out [N, n_blocks, blob]
(uint8; int4 codes two per byte, element 2j in the low nibble — the order
factorport packs in), one float scale per (row, block), and
`w = (q - zero_point) * scale` with the default zero point 2^(bits-1).
Checked on onnxruntime 1.32 (CPU), in float32:

* symmetric int4 `scale*(q-8)`: the default zero point 8 — bit-exact;
* symmetric int8 `scale*q` (q in -127..127): stored as q+128, default zero
  point 128 — bit-exact;
* asymmetric int4 `scale*q + minimum`: a float zero point `-minimum/scale`
  gives `(q - zp)*scale`, equal to the reference to about one float32 ulp
  (not bit-exact: the division and re-multiplication round);
* asymmetric int8: the CPU kernel refuses float zero points for 8 bits, and
  `-minimum/scale` is not an integer in general, so such a base falls back to
  a dense float32 MatMul over the decoded weight (exact, 4x the bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...ops import QuantizedBase, QuantSpec
from ...ops.quant import unpack

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class NBitsWeight:
    """The initializers and attributes of one MatMulNBits node."""

    blob: torch.Tensor  # uint8 [N, n_blocks, blob_size]
    scales: torch.Tensor  # float32 [N * n_blocks]
    zero_points: torch.Tensor | None  # float32 [N * n_blocks], or uint8 packed int4 [N * ceil(n_blocks/2)]
    in_features: int
    out_features: int
    bits: int
    block_size: int

    @property
    def shape(self) -> "NBitsShape":
        return NBitsShape(self.in_features, self.out_features, self.bits, self.block_size, self.zero_points is not None)

    def dequantize(self) -> torch.Tensor:
        """Float32 weight (N, K) exactly as onnxruntime decodes it."""
        return dequantize(self.blob, self.scales, self.zero_points, self.shape)


@dataclass(frozen=True)
class NBitsShape:
    """The attributes of a MatMulNBits node (what tracing passes as non-tensors)."""

    in_features: int
    out_features: int
    bits: int
    block_size: int
    has_zero_points: bool


def dequantize(blob: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, shape: NBitsShape) -> torch.Tensor:
    """`(q - zero_point) * scale`, float32 (N, K): onnxruntime's decoding."""
    n, k = shape.out_features, shape.in_features
    n_blocks = k // shape.block_size
    flat = blob.reshape(n, -1)
    codes = unpack(flat, 4) if shape.bits == 4 else flat.to(torch.int32)
    codes = codes.reshape(n, n_blocks, shape.block_size).float()
    if not shape.has_zero_points:
        zero = float(1 << (shape.bits - 1))
    elif zero_points.dtype == torch.uint8:  # packed int4 zero points, (N, ceil(n_blocks/2)) bytes
        zero = unpack(zero_points.reshape(n, -1), 4)[:, :n_blocks].float().reshape(n, n_blocks, 1)
    else:
        zero = zero_points.reshape(n, n_blocks, 1)
    return ((codes - zero) * scales.reshape(n, n_blocks, 1)).reshape(n, k)


def supported(spec: QuantSpec) -> bool:
    """Whether onnxruntime's CPU kernel runs this grid (else: dense fallback)."""
    return spec.symmetric or spec.bits == 4


def from_codes(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, spec: QuantSpec, in_features: int) -> NBitsWeight:
    """MatMulNBits initializers from factorport's stored codes (never re-quantized)."""
    if not supported(spec):
        raise ValueError(f"MatMulNBits has no CPU kernel for {spec}")
    rows = codes.shape[0]
    n_blocks = in_features // spec.group_size
    if spec.bits == 8:
        # int8 q in -127..127 -> uint8 q+128 under the default zero point 128
        stored = (codes.to(torch.int16) + 128).to(torch.uint8) if spec.symmetric else codes.to(torch.uint8)
    else:
        stored = codes.to(torch.uint8)
    blob = stored.reshape(rows, n_blocks, -1).contiguous()
    scales = scale.float().reshape(-1).contiguous()
    zero_points = None
    if not spec.symmetric:
        s = scale.float()
        zero_points = torch.where(s == 0, torch.zeros_like(s), -minimum.float() / s).reshape(-1).contiguous()
    return NBitsWeight(blob, scales, zero_points, in_features, rows, spec.bits, spec.group_size)


def stacked(weights: list[NBitsWeight]) -> NBitsWeight:
    """One MatMulNBits over several weights' rows (same input, same grid):
    each output row keeps its own codes, scales and zero points."""
    first = weights[0]
    if any((w.in_features, w.bits, w.block_size) != (first.in_features, first.bits, first.block_size) for w in weights):
        raise ValueError("only weights of one input size and grid stack into one MatMulNBits")
    float_zero = first.zero_points is not None and first.zero_points.dtype != torch.uint8
    if any((w.zero_points is not None) != (first.zero_points is not None) for w in weights) or (first.zero_points is not None and not float_zero):
        raise ValueError("stacking needs all default or all float zero points")
    zero_points = torch.cat([w.zero_points for w in weights]) if float_zero else None
    return NBitsWeight(
        torch.cat([w.blob for w in weights]), torch.cat([w.scales for w in weights]), zero_points,
        first.in_features, sum(w.out_features for w in weights), first.bits, first.block_size,
    )


def from_base(base: QuantizedBase) -> NBitsWeight:
    return from_codes(base.codes, base.scale, base.minimum, base.qspec, base.in_features)


def _typed(out, like, last: int):
    """Give a contrib op's output its type (the exporter cannot infer it)."""
    sizes = like.type().varyingSizes()
    if sizes is not None:
        out.setType(like.type().with_sizes(list(sizes[:-1]) + [last]))
    return out


class MatMulNBitsFunction(torch.autograd.Function):
    """Traces to one MatMulNBits node; in torch computes the same product."""

    @staticmethod
    def forward(ctx, x, blob, scales, zero_points, shape: NBitsShape):
        return x @ dequantize(blob, scales, zero_points, shape).to(x.dtype).T

    @staticmethod
    def symbolic(g, x, blob, scales, zero_points, shape: NBitsShape):
        inputs = [x, blob, scales] + ([zero_points] if shape.has_zero_points else [])
        out = g.op(
            f"{MS_DOMAIN}::MatMulNBits",
            *inputs,
            K_i=shape.in_features,
            N_i=shape.out_features,
            bits_i=shape.bits,
            block_size_i=shape.block_size,
            accuracy_level_i=0,
        )
        return _typed(out, x, shape.out_features)


class NBitsMatMul(torch.nn.Module):
    """`x @ W^T` for a quantized weight, exported as MatMulNBits."""

    def __init__(self, weight: NBitsWeight) -> None:
        super().__init__()
        self.shape = weight.shape
        self.register_buffer("blob", weight.blob)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zero_points", weight.zero_points)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # without zero points, `scales` stands in for the unused argument
        zero_points = self.zero_points if self.zero_points is not None else self.scales
        return MatMulNBitsFunction.apply(x, self.blob, self.scales, zero_points, self.shape)


class GatherBlockQuantizedFunction(torch.autograd.Function):
    """Traces to one GatherBlockQuantized node: rows `ids` of a quantized table,
    decoded on the fly (the tied embedding reads the lm_head's int codes)."""

    @staticmethod
    def forward(ctx, ids, table, scales, shape: NBitsShape):
        return dequantize(table, scales, None, shape)[ids]

    @staticmethod
    def symbolic(g, ids, table, scales, shape: NBitsShape):
        out = g.op(
            f"{MS_DOMAIN}::GatherBlockQuantized",
            table,
            ids,
            scales,
            gather_axis_i=0,
            quantize_axis_i=1,
            block_size_i=shape.block_size,
            bits_i=shape.bits,
        )
        sizes = ids.type().varyingSizes()
        if sizes is not None:
            out.setType(scales.type().with_dtype(torch.float32).with_sizes(list(sizes) + [shape.in_features]))
        return out


class NBitsEmbedding(torch.nn.Module):
    """Token lookup over a quantized table (symmetric codes: default zero point)."""

    def __init__(self, weight: NBitsWeight) -> None:
        super().__init__()
        if weight.zero_points is not None:
            raise ValueError("GatherBlockQuantized is used for symmetric tables only")
        self.shape = weight.shape
        # GatherBlockQuantized wants (rows, packed columns) and (rows, blocks).
        self.register_buffer("table", weight.blob.reshape(weight.out_features, -1))
        self.register_buffer("table_scales", weight.scales.reshape(weight.out_features, -1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return GatherBlockQuantizedFunction.apply(ids, self.table, self.table_scales, self.shape)


def int8_as_two_int4(weight: NBitsWeight) -> tuple[NBitsWeight, NBitsWeight]:
    """Symmetric int8 `s*q` as two int4 MatMulNBits whose sum is the same weight.

    onnxruntime 1.32's 8-bit MatMulNBits has no float32-compute kernel: at
    accuracy_level 0 it decodes the whole matrix on every call (the int8
    lm_head ran 4x slower than fp32). With q + 128 = 16h + l (h, l in 0..15):
    `s*q = (16s)*(h - 8) + s*(l - 0)`; both products are exact in float32
    (fp16 scale times a 4-bit integer), so only the final addition rounds.
    """
    if weight.bits != 8 or weight.zero_points is not None:
        raise ValueError("only symmetric int8 weights split into two int4 halves")
    codes = weight.blob.reshape(weight.out_features, -1).to(torch.int32)  # q + 128
    high, low = codes >> 4, codes & 0x0F

    def packed(c: torch.Tensor) -> torch.Tensor:
        c = c.to(torch.uint8)
        return (c[:, 0::2] | (c[:, 1::2] << 4)).reshape(weight.out_features, -1, weight.block_size // 2).contiguous()

    common = dict(in_features=weight.in_features, out_features=weight.out_features, bits=4, block_size=weight.block_size)
    high_part = NBitsWeight(packed(high), weight.scales * 16, None, **common)
    # uint8 zero points (here 0): float zero points take a slow path in the CPU kernel
    n_blocks = weight.in_features // weight.block_size
    zero = torch.zeros(weight.out_features * ((n_blocks + 1) // 2), dtype=torch.uint8)
    low_part = NBitsWeight(packed(low), weight.scales.clone(), zero, **common)
    return high_part, low_part


class Int8AsInt4Pair(torch.nn.Module):
    """Symmetric int8 weight computed as the sum of two int4 MatMulNBits."""

    def __init__(self, weight: NBitsWeight) -> None:
        super().__init__()
        high, low = int8_as_two_int4(weight)
        self.high = NBitsMatMul(high)
        self.low = NBitsMatMul(low)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.high(x) + self.low(x)


def share_tied_table(model) -> bool:
    """Make a GatherBlockQuantized read the int4 lm_head's own initializers.

    The tracer writes the tied table twice: once [N, n_blocks, blob] with
    scales [N * n_blocks] for MatMulNBits, once [N, K/2] with scales
    [N, n_blocks] for GatherBlockQuantized (neither operator accepts the
    other's shapes, and the tracer folds any Reshape of a constant). Where the
    two hold the same bytes, the gather gets a Reshape of the MatMulNBits
    tensors instead, so the file stores the table once (as the model builder
    does). Returns whether it did; `model` is edited in place."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized" and n.domain == MS_DOMAIN]
    if len(gathers) != 1 or not {gathers[0].input[0], gathers[0].input[2]} <= initializers.keys():
        return False
    gather = gathers[0]
    table, table_scales = (numpy_helper.to_array(initializers[gather.input[i]]) for i in (0, 2))
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) != 3 or not {node.input[1], node.input[2]} <= initializers.keys():
            continue
        blob, scales = initializers[node.input[1]], initializers[node.input[2]]
        if blob.dims[0] != table.shape[0] or np.prod(blob.dims) != table.size or np.prod(scales.dims) != table_scales.size:
            continue
        if not (np.array_equal(numpy_helper.to_array(blob).reshape(table.shape), table)
                and np.array_equal(numpy_helper.to_array(scales).reshape(table_scales.shape), table_scales)):
            continue
        reshapes = []
        for source, shape, index in ((blob.name, table.shape, 0), (scales.name, table_scales.shape, 2)):
            target = f"{gather.name}/shared_{index}"
            graph.initializer.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), f"{target}/shape"))
            reshapes.append(onnx.helper.make_node("Reshape", [source, f"{target}/shape"], [target], name=f"{target}/Reshape"))
            unused = gather.input[index]
            gather.input[index] = target
            if not any(unused in n.input for n in graph.node):
                graph.initializer.remove(initializers[unused])
        position = list(graph.node).index(gather)  # keep the node list in topological order
        for offset, reshape in enumerate(reshapes):
            graph.node.insert(position + offset, reshape)
        return True
    return False
