"""The nodes of an exported graph, checked against what factorport writes and
against config.json, before onnxruntime sees them.

onnxruntime trusts the attributes of its contrib operators: a
GroupQueryAttention whose `num_heads` does not fit an int divides by zero
(SIGFPE), a MatMulNBits whose K/N/bits/block_size disagree with its
initializers reads past them. So every contrib node factorport emits
(GroupQueryAttention, RotaryEmbedding, MatMulNBits, GatherBlockQuantized) is
checked here: attributes are the ones factorport writes, with values that
agree with the model's configuration and with the shapes of the tensors the
node reads. Any other operator or domain is refused: it is not a graph
factorport wrote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx
from onnx import numpy_helper

from ...errors import FactorportError
from .nbits import MS_DOMAIN
from .tensors import constant_values

# Standard operators of the graphs Optimum traces for Llama/Mistral/Qwen2
# (fused and traced attention), with the few a neighbouring torch or
# transformers version may trace instead (Squeeze, Trilu, comparisons, ...).
STANDARD_OPS = frozenset("""
    Add And Cast Concat Constant ConstantOfShape Cos Div Equal Expand Flatten Gather Identity IsNaN
    LessOrEqual MatMul Mul Neg Pow Range ReduceMean ReduceSum Reshape Shape Sigmoid Sin Slice Softmax
    Split Sqrt Sub Transpose Unsqueeze Where
    Squeeze Trilu Less Greater GreaterOrEqual Or Not Min Max Abs Exp Reciprocal Tile ScatterND IsInf
    CastLike Tanh Erf
""".split())
CONTRIB_OPS = frozenset({"GroupQueryAttention", "RotaryEmbedding", "MatMulNBits", "GatherBlockQuantized"})
DOMAINS = {"": STANDARD_OPS, "ai.onnx": STANDARD_OPS, MS_DOMAIN: CONTRIB_OPS}
# The attributes factorport writes on each contrib operator (anything else changes what it computes).
CONTRIB_ATTRIBUTES = {
    "GroupQueryAttention": {"num_heads", "kv_num_heads", "scale"},
    "RotaryEmbedding": {"num_heads", "interleaved"},
    "MatMulNBits": {"K", "N", "bits", "block_size", "accuracy_level"},
    "GatherBlockQuantized": {"gather_axis", "quantize_axis", "block_size", "bits"},
}
LIMIT = 1 << 31  # any width or count above this is not a real model (and overflows onnxruntime's int)


@dataclass(frozen=True)
class ModelShape:
    """What config.json says the graph computes."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    max_positions: int


def model_shape(config: dict) -> ModelShape:
    """The integer facts of config.json, each checked positive and sane."""

    def number(key: str, optional: bool = False) -> int | None:
        value = config.get(key)
        if value is None and optional:
            return None
        if type(value) is not int or not 0 < value < LIMIT:
            raise FactorportError(f"config.json: {key} is {value!r}, not a positive integer")
        return value

    heads = number("num_attention_heads")
    hidden = number("hidden_size")
    kv_heads = number("num_key_value_heads", optional=True) or heads
    head_dim = number("head_dim", optional=True) or hidden // heads
    if heads % kv_heads or not head_dim:
        raise FactorportError(f"config.json: {heads} attention heads do not form groups of {kv_heads} key/value heads")
    return ModelShape(hidden, heads, kv_heads, head_dim, number("num_hidden_layers"), number("vocab_size"),
                      number("max_position_embeddings"))


def check_operators(model: onnx.ModelProto) -> None:
    """Only the domains and operators factorport exports; no functions or subgraphs."""
    if len(model.functions):
        raise FactorportError("the model defines local functions, which factorport never writes")
    for opset in model.opset_import:
        if opset.domain not in DOMAINS:
            raise FactorportError(f"the model imports operator domain {opset.domain!r}, which factorport never writes")
    for node in model.graph.node:
        if node.op_type not in DOMAINS.get(node.domain, ()):
            raise FactorportError(f"node {node.name!r} is operator {node.domain or 'ai.onnx'}.{node.op_type}, which factorport never writes")
        for attribute in node.attribute:
            if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise FactorportError(f"node {node.name!r} has a subgraph, which factorport never writes")


def attributes(node: onnx.NodeProto) -> dict:
    """The node's attributes by name: only those factorport writes, ints as ints, floats as floats."""
    allowed = CONTRIB_ATTRIBUTES[node.op_type]
    values = {}
    for attribute in node.attribute:
        if attribute.name not in allowed or attribute.name in values:
            raise FactorportError(f"{node.op_type} node {node.name!r} has attribute {attribute.name!r}, which factorport never writes")
        kind = onnx.AttributeProto.FLOAT if attribute.name == "scale" else onnx.AttributeProto.INT
        if attribute.type != kind:
            raise FactorportError(f"{node.op_type} node {node.name!r}: attribute {attribute.name!r} has the wrong type")
        values[attribute.name] = attribute.f if kind == onnx.AttributeProto.FLOAT else attribute.i
    return values


class Graph:
    """Lookups over one graph: producers, stored tensors, the last dimension of a value."""

    def __init__(self, model: onnx.ModelProto, shape: ModelShape) -> None:
        self.model = model
        self.shape = shape
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.constants = constant_values(model)
        self.producer = {out: node for node in model.graph.node for out in node.output if out}
        self.declared = {v.name: v for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
        self._widths: dict[str, int | None] = {}

    def stored(self, name: str) -> onnx.TensorProto | None:
        """The initializer `name` is, through Identity nodes (the exporter writes equal
        buffers once and passes them on with Identity)."""
        for _ in range(64):
            if name in self.initializers:
                return self.initializers[name]
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity" or len(node.input) != 1:
                return None
            name = node.input[0]
        return None

    def small_values(self, name: str) -> list[int] | None:
        """The values of a small integer tensor stored in the file (split sizes, reshape targets)."""
        tensor = self.constants[name] if name in self.constants else self.stored(name)
        if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL or math.prod(tensor.dims) > 64:
            return None
        if tensor.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            return None
        return [int(v) for v in numpy_helper.to_array(tensor).reshape(-1)]

    def last_value(self, name: str) -> int | None:
        """The last element of a 1-D shape tensor, when the file fixes it (Concat of pieces)."""
        for _ in range(64):
            values = self.small_values(name)
            if values is not None:
                return values[-1] if values else None
            node = self.producer.get(name)
            if node is None or node.op_type not in ("Concat", "Unsqueeze", "Cast") or not node.input:
                return None
            name = node.input[-1] if node.op_type == "Concat" else node.input[0]
        return None

    def width(self, name: str, depth: int = 0) -> int | None:
        """The last dimension of value `name`, from the tensors and attributes that produce it."""
        if name not in self._widths:
            self._widths[name] = None if depth > 64 else self._width(name, depth + 1)
        return self._widths[name]

    def _width(self, name: str, depth: int) -> int | None:
        tensor = self.stored(name)
        if tensor is not None:
            return tensor.dims[-1] if tensor.dims else None
        declared = self.declared.get(name)
        if declared is not None and declared.type.tensor_type.shape.dim:
            last = declared.type.tensor_type.shape.dim[-1]
            if last.HasField("dim_value"):
                return last.dim_value
        node = self.producer.get(name)
        if node is None:
            return None
        op, inputs = node.op_type, list(node.input)
        if op == "MatMul" and len(inputs) == 2:
            return self.width(inputs[1], depth)
        if op == "MatMulNBits":
            return attributes(node).get("N")
        if op in ("Add", "Sub", "Mul", "Div"):
            widths = {w for w in (self.width(i, depth) for i in inputs) if w not in (None, 1)}
            if len(widths) > 1:
                raise FactorportError(f"node {node.name!r} adds values of widths {sorted(widths)}")
            return widths.pop() if widths else None
        if op in ("RotaryEmbedding", "Cast", "Identity", "Sigmoid", "Neg") and inputs:
            return self.width(inputs[0], depth)
        if op == "Split":
            return self._split_width(node, name)
        if op == "Reshape" and len(inputs) == 2:
            last = self.last_value(inputs[1])
            return last if last and last > 0 else None
        if op == "ReduceSum" and len(inputs) == 2 and self.small_values(inputs[1]) == [-1]:
            reshape = self.producer.get(inputs[0])  # column tiles: Reshape to (.., out, kept), sum over kept
            if reshape is not None and reshape.op_type == "Reshape" and len(reshape.input) == 2:
                target = self.small_values(reshape.input[1])
                return target[-2] if target and len(target) >= 2 and target[-2] > 0 else None
        return None

    def _split_width(self, node: onnx.NodeProto, name: str) -> int | None:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        sizes = self.small_values(node.input[1]) if len(node.input) > 1 else None
        if axis != -1 or sizes is None or len(sizes) != len(node.output):
            return None
        return sizes[list(node.output).index(name)]


def _refuse(node: onnx.NodeProto, what: str) -> None:
    raise FactorportError(f"{node.op_type} node {node.name!r}: {what}")


def _positive(node: onnx.NodeProto, values: dict, *names: str) -> None:
    for name in names:
        if name not in values or not 0 < values[name] < LIMIT:
            _refuse(node, f"{name} is {values.get(name)!r}, not a positive integer")


def _initializer(graph: Graph, node: onnx.NodeProto, index: int, role: str, dtypes: tuple[int, ...]) -> onnx.TensorProto:
    name = node.input[index] if index < len(node.input) else ""
    tensor = graph.stored(name)
    if tensor is None:
        _refuse(node, f"its {role} {name!r} is not an initializer of the file")
    if tensor.data_type not in dtypes:
        _refuse(node, f"its {role} {name!r} has data type {tensor.data_type}")
    return tensor


def _dims(node: onnx.NodeProto, tensor: onnx.TensorProto, role: str, expected: list[int]) -> None:
    if list(tensor.dims) != expected:
        _refuse(node, f"its {role} {tensor.name!r} has shape {list(tensor.dims)}, attributes say {expected}")


def _block(node: onnx.NodeProto, values: dict) -> None:
    _positive(node, values, "bits", "block_size")
    if values["bits"] not in (4, 8):
        _refuse(node, f"bits is {values['bits']}; factorport writes 4 or 8")
    size = values["block_size"]
    if size < 16 or size & (size - 1):
        _refuse(node, f"block_size is {size}; it must be a power of two, at least 16")


def check_matmulnbits(graph: Graph, node: onnx.NodeProto) -> None:
    values = attributes(node)
    _positive(node, values, "K", "N")
    _block(node, values)
    k, n, bits, size = values["K"], values["N"], values["bits"], values["block_size"]
    if values.get("accuracy_level", 0) not in range(5):
        _refuse(node, f"accuracy_level is {values['accuracy_level']}, not 0..4")
    if len(node.input) not in (3, 4) or len(node.output) != 1:
        _refuse(node, f"it has {len(node.input)} inputs; factorport writes A, B, scales and optional zero points")
    if k % size:
        _refuse(node, f"K {k} is not a multiple of block_size {size}")
    blocks = k // size
    u8, f32 = onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT
    _dims(node, _initializer(graph, node, 1, "weight", (u8,)), "weight", [n, blocks, size * bits // 8])
    _dims(node, _initializer(graph, node, 2, "scales", (f32,)), "scales", [n * blocks])
    if len(node.input) == 4:
        zero = _initializer(graph, node, 3, "zero points", (u8, f32))
        count = n * blocks if zero.data_type == f32 else n * math.ceil(blocks * bits / 8)
        _dims(node, zero, "zero points", [count])
    width = graph.width(node.input[0])
    if width is not None and width != k:
        _refuse(node, f"K is {k} but its input is {width} wide")


def check_gatherblockquantized(graph: Graph, node: onnx.NodeProto) -> None:
    values = attributes(node)
    _block(node, values)
    if values.get("gather_axis") != 0 or values.get("quantize_axis") != 1:
        _refuse(node, "factorport writes gather_axis 0 and quantize_axis 1")
    if len(node.input) != 3 or len(node.output) != 1:
        _refuse(node, f"it has {len(node.input)} inputs; factorport writes table, ids and scales")
    rows, columns = graph.shape.vocab, graph.shape.hidden
    bits, size = values["bits"], values["block_size"]
    if columns % size:
        _refuse(node, f"block_size {size} does not divide the hidden size {columns} of config.json")
    _table_input(graph, node, 0, "table", onnx.TensorProto.UINT8, [rows, columns * bits // 8])
    _table_input(graph, node, 2, "scales", onnx.TensorProto.FLOAT, [rows, columns // size])


def _table_input(graph: Graph, node: onnx.NodeProto, index: int, role: str, dtype: int, expected: list[int]) -> None:
    """A GatherBlockQuantized input: an initializer of shape `expected`, or a
    Reshape to exactly `expected` of one with as many elements (the table
    shared with the lm_head's MatMulNBits, see nbits.share_tied_table)."""
    name = node.input[index] if index < len(node.input) else ""
    reshape = graph.producer.get(name)
    if reshape is None or reshape.op_type != "Reshape":
        _dims(node, _initializer(graph, node, index, role, (dtype,)), role, expected)
        return
    if len(reshape.input) != 2 or graph.small_values(reshape.input[1]) != expected:
        _refuse(node, f"its {role} {name!r} is not a Reshape to {expected}")
    source = _initializer(graph, reshape, 0, "input", (dtype,))
    if math.prod(source.dims) != math.prod(expected):
        _refuse(node, f"its {role} reshapes {source.name!r} of shape {list(source.dims)} to {expected}")


def check_rotary(graph: Graph, node: onnx.NodeProto) -> None:
    values = attributes(node)
    _positive(node, values, "num_heads")
    shape = graph.shape
    if values.get("interleaved", 0) != 0:
        _refuse(node, "interleaved is set; factorport writes rotary in halves (interleaved 0)")
    if values["num_heads"] not in (shape.heads, shape.kv_heads):
        _refuse(node, f"num_heads is {values['num_heads']}; config.json has {shape.heads} heads and {shape.kv_heads} key/value heads")
    if len(node.input) != 4 or len(node.output) != 1:
        _refuse(node, f"it has {len(node.input)} inputs; factorport writes x, position_ids, cos and sin")
    expected = [shape.max_positions, shape.head_dim // 2]
    for index, role in ((2, "cos table"), (3, "sin table")):
        _dims(node, _initializer(graph, node, index, role, (onnx.TensorProto.FLOAT,)), role, expected)
    width = graph.width(node.input[0])
    if width != values["num_heads"] * shape.head_dim:
        _refuse(node, f"its input is {width} wide, not num_heads {values['num_heads']} x head_dim {shape.head_dim}")


def check_group_query_attention(graph: Graph, node: onnx.NodeProto) -> None:
    values = attributes(node)
    _positive(node, values, "num_heads", "kv_num_heads")
    shape = graph.shape
    heads, kv_heads = values["num_heads"], values["kv_num_heads"]
    if (heads, kv_heads) != (shape.heads, shape.kv_heads):
        _refuse(node, f"num_heads {heads} / kv_num_heads {kv_heads} differ from config.json's {shape.heads} / {shape.kv_heads}")
    if len(node.input) != 11 or list(node.input[7:10]) != ["", "", ""] or len(node.output) != 3:
        _refuse(node, "its inputs are not the ones factorport writes (q, k, v, past, seqlens, total, attention bias)")
    for index, role, count in ((0, "query", heads), (1, "key", kv_heads), (2, "value", kv_heads)):
        width = graph.width(node.input[index])
        if width != count * shape.head_dim:
            _refuse(node, f"its {role} is {width} wide, not {count} heads x head_dim {shape.head_dim}")
    scale = values.get("scale")
    expected = shape.head_dim**-0.5
    if scale is None or not abs(scale - expected) <= 1e-6 * expected:
        _refuse(node, f"scale is {scale}, not 1/sqrt(head_dim) = {expected:.6g}")


CONTRIB_CHECKS = {
    "MatMulNBits": check_matmulnbits,
    "GatherBlockQuantized": check_gatherblockquantized,
    "RotaryEmbedding": check_rotary,
    "GroupQueryAttention": check_group_query_attention,
}


def check_contrib_nodes(model: onnx.ModelProto, shape: ModelShape) -> None:
    graph = Graph(model, shape)
    for node in model.graph.node:
        if node.domain == MS_DOMAIN:
            CONTRIB_CHECKS[node.op_type](graph, node)


def _dims_of(value: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]


def check_inputs_and_outputs(model: onnx.ModelProto, shape: ModelShape) -> None:
    """Optimum's decoder interface, with cache shapes from config.json."""
    past = [f"past_key_values.{i}.{kind}" for i in range(shape.layers) for kind in ("key", "value")]
    expected_inputs = {"input_ids", "attention_mask", "position_ids", *past}
    inputs = {value.name: value for value in model.graph.input}
    for name, value in inputs.items():
        if name not in expected_inputs:
            raise FactorportError(f"graph input {name!r} is not one of a decoder's (config.json has {shape.layers} layers)")
    for name in ("input_ids", "attention_mask", *past):
        if name not in inputs:
            raise FactorportError(f"graph input {name!r} is missing (config.json has {shape.layers} layers)")
    for name in past:
        dims = _dims_of(inputs[name])
        if len(dims) != 4 or dims[1] != shape.kv_heads or dims[3] != shape.head_dim:
            raise FactorportError(
                f"graph input {name!r} has shape {dims}, not [batch, {shape.kv_heads}, past, {shape.head_dim}] as config.json says"
            )
    outputs = list(model.graph.output)
    if not outputs or outputs[0].name != "logits":
        raise FactorportError("the first graph output is not 'logits'")
    dims = _dims_of(outputs[0])
    if len(dims) != 3 or dims[2] not in (None, shape.vocab):
        raise FactorportError(f"graph output 'logits' has shape {dims}, not [batch, length, {shape.vocab}]")
