"""Every tensor stored in an exported graph, checked without reading external data.

A tensor (initializer, or a node's tensor attribute such as Constant's value)
must say its size one way: the bytes it stores, in raw_data, in the typed
field of its data type, or in an external-data file, must be exactly
product(dims) x the element size. Anything else is a tampered or truncated
file, and onnxruntime would read past the data or reinterpret it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from ...errors import FactorportError

T = onnx.TensorProto
# Element bytes of every data type a tensor of factorport's graphs may have.
ITEM_SIZE = {
    T.FLOAT: 4, T.UINT8: 1, T.INT8: 1, T.UINT16: 2, T.INT16: 2, T.INT32: 4, T.INT64: 8,
    T.BOOL: 1, T.FLOAT16: 2, T.DOUBLE: 8, T.UINT32: 4, T.UINT64: 8, T.BFLOAT16: 2,
}
# The typed repeated field that holds each data type when raw_data is not used.
TYPED_FIELD = {
    T.FLOAT: "float_data", T.DOUBLE: "double_data", T.INT64: "int64_data",
    T.UINT32: "uint64_data", T.UINT64: "uint64_data",
    **{t: "int32_data" for t in (T.UINT8, T.INT8, T.UINT16, T.INT16, T.INT32, T.BOOL, T.FLOAT16, T.BFLOAT16)},
}
ALL_TYPED = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
EXTERNAL_KEYS = {"location", "offset", "length", "checksum"}


@dataclass(frozen=True)
class ExternalTensor:
    name: str
    location: str
    offset: int
    length: int


def stored_tensors(model: onnx.ModelProto):
    """(where, tensor) for every initializer and every tensor attribute of a node."""
    for tensor in model.graph.initializer:
        yield "initializer", tensor
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield f"attribute {attribute.name!r} of node {node.name!r}", attribute.t
            elif attribute.type == onnx.AttributeProto.TENSORS:
                for tensor in attribute.tensors:
                    yield f"attribute {attribute.name!r} of node {node.name!r}", tensor


def element_count(tensor: onnx.TensorProto, what: str) -> int:
    if any(d < 0 for d in tensor.dims):
        raise FactorportError(f"{what} has a negative dimension {list(tensor.dims)}")
    return math.prod(tensor.dims)


def expected_bytes(tensor: onnx.TensorProto, what: str) -> int:
    if tensor.data_type not in ITEM_SIZE:
        raise FactorportError(f"{what} has data type {tensor.data_type}, which factorport never writes")
    return element_count(tensor, what) * ITEM_SIZE[tensor.data_type]


def external_entry(tensor: onnx.TensorProto, what: str) -> ExternalTensor:
    """The external-data record of `tensor`, with offset and length as Python ints."""
    info = {}
    for entry in tensor.external_data:
        if entry.key not in EXTERNAL_KEYS or entry.key in info:
            raise FactorportError(f"{what} has an unexpected or repeated external-data key {entry.key!r}")
        info[entry.key] = entry.value
    numbers = {}
    for key in ("offset", "length"):
        value = info.get(key, "0" if key == "offset" else None)
        if value is None or not value.isascii() or not value.isdigit():
            raise FactorportError(f"{what} has external-data {key} {value!r}, not a non-negative integer")
        numbers[key] = int(value)
    return ExternalTensor(tensor.name, info.get("location", ""), numbers["offset"], numbers["length"])


def check_tensor(tensor: onnx.TensorProto, what: str) -> ExternalTensor | None:
    """Raise unless the tensor stores exactly its size; its external record if any."""
    size = expected_bytes(tensor, what)
    typed = [f for f in ALL_TYPED if len(getattr(tensor, f))]
    if tensor.HasField("segment"):
        raise FactorportError(f"{what} is a segment of a tensor, which factorport never writes")
    if tensor.data_location == T.EXTERNAL:
        if typed or tensor.HasField("raw_data"):
            raise FactorportError(f"{what} is external but also stores data in the file")
        external = external_entry(tensor, what)
        if external.length != size:
            raise FactorportError(f"{what} has {external.length} external bytes for dims {list(tensor.dims)} ({size} expected)")
        return external
    if tensor.external_data:
        raise FactorportError(f"{what} has external-data entries but is not stored externally")
    if tensor.HasField("raw_data"):
        if typed or len(tensor.raw_data) != size:
            raise FactorportError(f"{what} stores {len(tensor.raw_data)} bytes for dims {list(tensor.dims)} ({size} expected)")
        return None
    field = TYPED_FIELD[tensor.data_type]
    count = len(getattr(tensor, field))
    if typed not in ([], [field]) or count != size // ITEM_SIZE[tensor.data_type]:
        raise FactorportError(f"{what} stores {count} values for dims {list(tensor.dims)} ({size // ITEM_SIZE[tensor.data_type]} expected)")
    return None


def check_stored_tensors(model: onnx.ModelProto) -> list[ExternalTensor]:
    """Check every stored tensor; the external ones' records."""
    if len(model.graph.sparse_initializer):
        raise FactorportError("the graph has sparse initializers, which factorport never writes")
    names, externals = set(), []
    for where, tensor in stored_tensors(model):
        what = f"tensor {tensor.name!r} ({where})"
        if where == "initializer":
            if not tensor.name or tensor.name in names:
                raise FactorportError(f"{what}: initializer names must be present and unique")
            names.add(tensor.name)
        external = check_tensor(tensor, what)
        if external is not None:
            externals.append(external)
    return externals


def constant_values(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Tensors whose values are in the file: initializers and Constant nodes' `value`."""
    values = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                    values[node.output[0]] = attribute.t
    return values
