"""Seeded mutators: `mutate(kind, data, seed)` -> (mutated bytes, description).

The same (kind, data, seed) always gives the same mutant. Each mutant is
one mutation (sometimes two, stacked), described precisely enough to
reproduce it by hand:

* generic (every kind): bit flips, byte runs set to 0x00/0xff, an extreme
  integer written over 4 or 8 bytes, truncation, insertion and deletion;
* gguf: header counts, KV array counts, string lengths, numeric KV values,
  value types, per-tensor n_dims / dims / types / offsets set to extreme
  values (found by parsing the file's own structure);
* safetensors: the 8-byte header length, the JSON header's offsets,
  shapes and dtypes set out of range or swapped between tensors, a tensor
  re-shaped or re-typed in a well-formed file (offsets re-laid), and the
  factorport layout JSON it carries mutated as JSON;
* json: values replaced by other types, huge or negative numbers, keys
  removed or renamed, dicts turned into lists and back;
* onnx: node attributes (num_heads, K, N, bits, ...), initializer dims and
  data types, external-data locations / offsets / lengths, node wiring,
  opset versions.

A structure-aware mutator that cannot parse its input (an earlier mutant,
a foreign file) falls back to a generic one.
"""

from __future__ import annotations

import json
import random
import struct
from typing import Callable

EXTREMES_64 = (0, 1, 2**31 - 1, 2**32, 2**63, 2**64 - 32)
EXTREMES_32 = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 - 32)
SIGNED_EXTREMES = (0, 1, -1, 2**31 - 1, -(2**31), 2**32, 2**62, 2**63 - 1, -(2**63))
KINDS = ("bytes", "gguf", "safetensors", "json", "onnx")

Mutator = Callable[[random.Random, bytes], tuple[bytes, str]]


class Unparseable(Exception):
    """The structure-aware mutator could not read its input."""


# --- generic byte mutators -------------------------------------------------


def _position(rng: random.Random, size: int) -> int:
    """A position in [0, size), often near the start where headers live."""
    if size <= 1:
        return 0
    if rng.random() < 0.5:
        return rng.randrange(min(size, 256))
    return rng.randrange(size)


def bit_flips(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if not data:
        return b"\x00", "empty file -> one zero byte"
    out = bytearray(data)
    flips = [(_position(rng, len(out)), rng.randrange(8)) for _ in range(rng.randint(1, 8))]
    for at, bit in flips:
        out[at] ^= 1 << bit
    return bytes(out), "bit flips at " + ", ".join(f"{at}:{bit}" for at, bit in flips)


def byte_run(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if not data:
        return b"\xff" * 8, "empty file -> 8 bytes 0xff"
    at = _position(rng, len(data))
    length = min(rng.choice((1, 2, 4, 8, 16, 64, 256)), len(data) - at)
    value = rng.choice((0x00, 0xFF))
    return data[:at] + bytes([value]) * length + data[at + length :], f"{length} bytes at {at} set to 0x{value:02x}"


def extreme_word(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    width = rng.choice((4, 8))
    if len(data) < width:
        return byte_run(rng, data)
    at = _position(rng, len(data) - width + 1)
    at -= at % width if rng.random() < 0.7 else 0  # fields are mostly aligned
    value = rng.choice(EXTREMES_64 if width == 8 else EXTREMES_32)
    return data[:at] + value.to_bytes(width, "little") + data[at + width :], f"u{width * 8} at {at} set to {value}"


def truncate(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    size = len(data)
    if size == 0:
        return b"", "empty file stays empty"
    cut = rng.choice((0, 1, 4, 8, 16, 24, size // 2, size - 1, rng.randrange(size)))
    cut = min(cut, size - 1)
    return data[:cut], f"truncated to {cut} of {size} bytes"


def insert_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    at = _position(rng, len(data) + 1)
    length = rng.choice((1, 3, 8, 64))
    filler = rng.choice(("zeros", "0xff", "random"))
    block = {"zeros": b"\x00" * length, "0xff": b"\xff" * length}.get(filler) or bytes(rng.randrange(256) for _ in range(length))
    return data[:at] + block + data[at:], f"{length} {filler} bytes inserted at {at}"


def delete_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if not data:
        return b"\x00", "empty file -> one zero byte"
    at = _position(rng, len(data))
    length = min(rng.choice((1, 3, 8, 64)), len(data) - at)
    return data[:at] + data[at + length :], f"{length} bytes deleted at {at}"


GENERIC: tuple[Mutator, ...] = (bit_flips, byte_run, extreme_word, truncate, insert_bytes, delete_bytes)


# --- GGUF ------------------------------------------------------------------

_GGUF_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _GGUFFields:
    """Byte positions of a GGUF file's structural fields: (offset, width, label) per category."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0
        self.fields: dict[str, list[tuple[int, int, str]]] = {}
        self._parse()

    def _add(self, category: str, width: int, label: str) -> None:
        self.fields.setdefault(category, []).append((self.at, width, label))

    def _take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise Unparseable("short read")
        (value,) = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return value

    def _string(self, category: str, label: str) -> str:
        self._add(category, 8, label)
        length = self._take("<Q")
        if self.at + length > len(self.data):
            raise Unparseable("string past the end")
        text = self.data[self.at : self.at + length].decode("utf-8", errors="replace")
        self.at += length
        return text

    def _value(self, kind: int, key: str) -> None:
        if kind == _GGUF_STRING:
            self._string("string length", f"string value of {key}")
        elif kind == _GGUF_ARRAY:
            self._add("value type", 4, f"array element type of {key}")
            element = self._take("<I")
            self._add("array count", 8, f"array count of {key}")
            count = self._take("<Q")
            if element in _GGUF_SCALAR:
                self.at += count * struct.calcsize(_GGUF_SCALAR[element])
            elif element == _GGUF_STRING:
                for i in range(count):
                    if i < 4:
                        self._string("string length", f"string {i} of {key}")
                    else:
                        length = self._take("<Q")  # read before adding: `at += take()` would lose the 8 bytes
                        self.at += length
            else:
                raise Unparseable("nested array")
        elif kind in _GGUF_SCALAR:
            fmt = _GGUF_SCALAR[kind]
            if fmt[-1] in "BbHhIiQq":
                self._add("numeric value", struct.calcsize(fmt), key)
            self.at += struct.calcsize(fmt)
        else:
            raise Unparseable(f"value type {kind}")
        if self.at > len(self.data):
            raise Unparseable("value past the end")

    def _parse(self) -> None:
        if self.data[:4] != b"GGUF":
            raise Unparseable("no GGUF magic")
        self.at = 4
        self._add("header", 4, "version")
        self._take("<I")
        self._add("header", 8, "tensor count")
        n_tensors = self._take("<Q")
        self._add("header", 8, "KV count")
        n_kv = self._take("<Q")
        if n_tensors > 1 << 16 or n_kv > 1 << 16:
            raise Unparseable("implausible counts")
        for _ in range(n_kv):
            key = self._string("string length", "key length")
            self._add("value type", 4, f"value type of {key}")
            self._value(self._take("<I"), key)
        for _ in range(n_tensors):
            name = self._string("string length", "tensor name length")
            self._add("tensor n_dims", 4, f"n_dims of {name}")
            n_dims = self._take("<I")
            if n_dims > 8:
                raise Unparseable("implausible n_dims")
            for d in range(n_dims):
                self._add("tensor dim", 8, f"dim {d} of {name}")
                self._take("<Q")
            self._add("tensor type", 4, f"type of {name}")
            self._take("<I")
            self._add("tensor offset", 8, f"offset of {name}")
            self._take("<Q")


def _nearby(value: int, width: int) -> list[int]:
    mask = (1 << (8 * width)) - 1
    return [(value + 1) & mask, (value - 1) & mask, (value * 2) & mask, (value + 32) & mask]


def gguf_field(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    fields = _GGUFFields(data).fields
    # tensor fields and counts are what readers index memory with: weigh them up
    weights = {"header": 3, "array count": 3, "tensor dim": 3, "tensor offset": 3, "tensor type": 2, "tensor n_dims": 2,
               "string length": 2, "numeric value": 2, "value type": 1}
    categories = [c for c in weights if c in fields]
    category = rng.choices(categories, [weights[c] for c in categories])[0]
    at, width, label = rng.choice(fields[category])
    original = int.from_bytes(data[at : at + width], "little")
    if category == "tensor type":
        candidates = [*EXTREMES_32, *range(0, 42)]
    elif category == "value type":
        candidates = [*range(0, 14), 2**31 - 1, 2**32 - 1]
    elif category == "tensor n_dims":
        candidates = [0, 1, 3, 4, 5, 2**31 - 1, 2**32 - 1]
    else:
        candidates = [*(EXTREMES_64 if width == 8 else EXTREMES_32), *_nearby(original, width)]
    if width < 8:
        candidates = [c & ((1 << (8 * width)) - 1) for c in candidates]
    candidates = [c for c in candidates if c != original] or [original ^ 1]
    value = rng.choice(candidates)
    mutated = data[:at] + value.to_bytes(width, "little") + data[at + width :]
    return mutated, f"gguf {category}: {label} {original} -> {value}"


# --- JSON --------------------------------------------------------------------

_STRINGS = ("", "x", "../../../etc/hostname", "/dev/zero", "\u0000", "A" * 4096, "float32", "Q4_0", "model.safetensors")


def _paths(node, prefix=()):
    """Every (path, value) below the root, containers included."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = (*prefix, key)
        yield path, value
        yield from _paths(value, path)


def _get(root, path):
    for key in path:
        root = root[key]
    return root


def _replacement(rng: random.Random, value):
    """Another value for `value`: another type, an extreme, or a reshaped container."""
    choices = [None, True, "x", 0, -1, 1.5, float("nan"), float("inf"), 2**31 - 1, 2**32, 2**63, 2**64, 10**30, -(2**63), [], {}, rng.choice(_STRINGS)]
    if isinstance(value, bool):
        choices += [not value, 2]
    elif isinstance(value, int):
        choices += [-value, value + 1, value - 1, value * 1000, 0]
    elif isinstance(value, float):
        choices += [-value, 0.0, value * 1e30, -float("inf")]
    elif isinstance(value, dict):
        choices += [list(value.values()), list(value.keys())]
    elif isinstance(value, list):
        choices += [{str(i): v for i, v in enumerate(value)}, value * 3, value[:1], list(reversed(value)), [value]]
    elif isinstance(value, str):
        choices += [value[::-1], value + "x", value.upper(), value * 100]
    return rng.choice(choices)


def _short(value) -> str:
    text = json.dumps(value, allow_nan=True)
    return text if len(text) <= 60 else text[:57] + "..."


def mutate_json_value(rng: random.Random, root) -> tuple[object, str]:
    """A mutated copy of a parsed JSON document and what was done."""
    root = json.loads(json.dumps(root))  # deep copy
    paths = list(_paths(root))
    if not paths or rng.random() < 0.03:
        new = _replacement(rng, root)
        return new, f"root replaced by {_short(new)}"
    path, value = rng.choice(paths)
    parent, key = _get(root, path[:-1]), path[-1]
    where = "/".join(str(p) for p in path)
    op = rng.choices(("replace", "delete", "rename", "swap"), (6, 2, 1, 1))[0]
    if op == "delete":
        del parent[key]
        return root, f"{where} removed"
    if op == "rename" and isinstance(parent, dict):
        new_key = rng.choice([key + "_", *(s for s in _STRINGS if s not in parent)])
        parent[new_key] = parent.pop(key)
        return root, f"key {where} renamed to {_short(new_key)}"
    if op == "swap" and len(parent) > 1:
        keys = list(parent.keys()) if isinstance(parent, dict) else list(range(len(parent)))
        other = rng.choice([k for k in keys if k != key])
        parent[key], parent[other] = parent[other], parent[key]
        return root, f"{where} swapped with sibling {other}"
    new = _replacement(rng, value)
    parent[key] = new
    return root, f"{where}: {_short(value)} -> {_short(new)}"


def json_value(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    try:
        root = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unparseable("not JSON") from exc
    mutated, description = mutate_json_value(rng, root)
    return json.dumps(mutated, indent=2, allow_nan=True).encode() + b"\n", "json " + description


# --- safetensors -------------------------------------------------------------

_DTYPES = ("F32", "F16", "BF16", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3", "Q4", "", "f32")


def _safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    if len(data) < 8:
        raise Unparseable("short")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise Unparseable("header past the end")
    try:
        header = json.loads(data[8 : 8 + length])
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unparseable("header not JSON") from exc
    if not isinstance(header, dict):
        raise Unparseable("header not an object")
    return header, data[8 + length :]


def _safetensors_bytes(header: dict, body: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":"), allow_nan=True).encode()
    text += b" " * (-len(text) % 8)  # the spec pads the header to 8 bytes with spaces
    return len(text).to_bytes(8, "little") + text + body


def _tensor_entry(rng: random.Random, header: dict) -> tuple[str, dict]:
    names = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if not names:
        raise Unparseable("no tensors")
    name = rng.choice(names)
    return name, header[name]


def safetensors_length(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    original = int.from_bytes(data[:8], "little") if len(data) >= 8 else 0
    value = rng.choice([*EXTREMES_64, original + 1, max(original - 1, 0), original + 8, len(data), len(data) - 8, 2])
    return value.to_bytes(8, "little") + data[8:], f"safetensors header length {original} -> {value}"


def safetensors_tensor(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    header, body = _safetensors_parts(data)
    name, entry = _tensor_entry(rng, header)
    field = rng.choice(("data_offsets", "data_offsets", "shape", "shape", "dtype", "swap", "remove"))
    if field == "swap":
        others = [k for k, v in header.items() if k not in ("__metadata__", name) and isinstance(v, dict)]
        if not others:
            raise Unparseable("one tensor")
        other = rng.choice(others)
        what = rng.choice(("data_offsets", "shape", "dtype", "entry"))
        if what == "entry":
            header[name], header[other] = header[other], header[name]
        else:
            entry[what], header[other][what] = header[other].get(what), entry.get(what)
        return _safetensors_bytes(header, body), f"safetensors {what} of {name} swapped with {other}"
    if field == "remove":
        key = rng.choice(("data_offsets", "shape", "dtype"))
        entry.pop(key, None)
        return _safetensors_bytes(header, body), f"safetensors {key} of {name} removed"
    old = entry.get(field)
    if field == "data_offsets":
        start, end = (old + [0, 0])[:2] if isinstance(old, list) else (0, 0)
        new = rng.choice([[end, start], [start, 2**63], [start, len(body) + 1], [start + 1, end + 1], [0, 0], [-1, end],
                          [start, end + 4], [2**64 - 32, 2**64 - 1], [start], [start, end, end], "0", None])
    elif field == "shape":
        dims = old if isinstance(old, list) else [1]
        new = rng.choice([[], [0], [2**63], [2**31 - 1, 2**31 - 1], [-1] + dims[1:], list(reversed(dims)), dims + [1],
                          dims + [2], dims[:-1], [d * 2 for d in dims], [2**32, 0], [1.5], "x", None])
    else:
        new = rng.choice([d for d in _DTYPES if d != old] + [7, None])
    entry[field] = new
    return _safetensors_bytes(header, body), f"safetensors {field} of {name}: {_short(old)} -> {_short(new)}"


_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_consistent(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """A well-formed file whose tensor has another shape or dtype than the
    original (its bytes cut or zero-padded to fit, every offset re-laid), so
    the safetensors library accepts it and the layout checks must not."""
    header, body = _safetensors_parts(data)
    entries = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    try:
        order = sorted(entries, key=lambda k: entries[k]["data_offsets"][0])
        chunks = {k: body[entries[k]["data_offsets"][0] : entries[k]["data_offsets"][1]] for k in order}
    except (KeyError, TypeError, IndexError) as exc:
        raise Unparseable("tensor entries") from exc
    if not order:
        raise Unparseable("no tensors")
    name = rng.choice(order)
    entry = entries[name]
    old = f"{entry.get('dtype')}{entry.get('shape')}"
    if rng.random() < 0.3:
        entry["dtype"] = rng.choice([d for d in _ITEMSIZE if d != entry.get("dtype")])
    else:
        dims = list(entry.get("shape") or [1])
        i = rng.randrange(len(dims))
        choice = rng.choice(("plus one", "minus one", "double", "zero", "transpose", "flatten", "extra dim"))
        if choice == "plus one":
            dims[i] += 1
        elif choice == "minus one":
            dims[i] = max(dims[i] - 1, 0)
        elif choice == "double":
            dims[i] *= 2
        elif choice == "zero":
            dims[i] = 0
        elif choice == "transpose":
            dims.reverse()
        elif choice == "flatten":
            total = 1
            for d in dims:
                total *= d
            dims = [total]
        else:
            dims.insert(i, 1)
        entry["shape"] = dims
    count = 1
    for d in entry["shape"]:
        count *= d
    size = count * _ITEMSIZE.get(entry["dtype"], 1)
    chunks[name] = (chunks[name] + b"\x00" * size)[:size]
    offset, new_body = 0, []
    for k in order:
        entries[k]["data_offsets"] = [offset, offset + len(chunks[k])]
        offset += len(chunks[k])
        new_body.append(chunks[k])
    return _safetensors_bytes(header, b"".join(new_body)), f"safetensors consistent {name}: {old} -> {entry['dtype']}{entry['shape']}"


def safetensors_layout(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """The factorport layout JSON (a string in __metadata__) mutated as JSON."""
    header, body = _safetensors_parts(data)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or not isinstance(metadata.get("factorport"), str):
        raise Unparseable("no layout")
    if rng.random() < 0.1:
        op = rng.choice(("remove layout", "layout not JSON", "metadata not a dict"))
        if op == "remove layout":
            del metadata["factorport"]
        elif op == "layout not JSON":
            metadata["factorport"] = metadata["factorport"][: len(metadata["factorport"]) // 2]
        else:
            header["__metadata__"] = ["factorport"]
        return _safetensors_bytes(header, body), f"safetensors metadata: {op}"
    try:
        layout = json.loads(metadata["factorport"])
    except ValueError as exc:  # an earlier mutation of a stacked pair broke it
        raise Unparseable("layout not JSON") from exc
    layout, description = mutate_json_value(rng, layout)
    metadata["factorport"] = json.dumps(layout, allow_nan=True)
    return _safetensors_bytes(header, body), f"safetensors layout JSON {description}"


# --- ONNX ----------------------------------------------------------------------

_ATTRIBUTES_OF_INTEREST = ("num_heads", "kv_num_heads", "K", "N", "bits", "block_size", "axis", "accuracy_level",
                           "do_rotary", "interleaved", "rotary_embedding_dim", "quantize_axis", "gather_axis", "local_window_size")


def _onnx_model(data: bytes):
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise Unparseable("not an ONNX protobuf") from exc
    if not len(model.graph.node):
        raise Unparseable("no nodes")
    return model


def onnx_attribute(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    import onnx

    model = _onnx_model(data)
    found = [(n, a) for n in model.graph.node for a in n.attribute if a.type in (onnx.AttributeProto.INT, onnx.AttributeProto.INTS, onnx.AttributeProto.FLOAT)]
    if not found:
        raise Unparseable("no attributes")
    preferred = [(n, a) for n, a in found if a.name in _ATTRIBUTES_OF_INTEREST]
    node, attribute = rng.choice(preferred if preferred and rng.random() < 0.8 else found)
    where = f"{node.op_type} {node.name!r} attribute {attribute.name}"
    if rng.random() < 0.1:
        node.attribute.remove(attribute)
        return model.SerializeToString(), f"onnx {where} removed"
    if attribute.type == onnx.AttributeProto.INT:
        old = attribute.i
        attribute.i = rng.choice([v for v in (*SIGNED_EXTREMES, old + 1, old * 2, old // 2) if v != old and -(2**63) <= v < 2**63])
        return model.SerializeToString(), f"onnx {where}: {old} -> {attribute.i}"
    if attribute.type == onnx.AttributeProto.FLOAT:
        old = attribute.f
        attribute.f = rng.choice((0.0, -1.0, float("nan"), float("inf"), 1e38, -old))
        return model.SerializeToString(), f"onnx {where}: {old} -> {attribute.f}"
    if not len(attribute.ints):
        attribute.ints.append(2**31 - 1)
        return model.SerializeToString(), f"onnx {where}: [] -> [2147483647]"
    i = rng.randrange(len(attribute.ints))
    old = attribute.ints[i]
    attribute.ints[i] = rng.choice([v for v in SIGNED_EXTREMES if v != old and -(2**63) <= v < 2**63])
    return model.SerializeToString(), f"onnx {where}[{i}]: {old} -> {attribute.ints[i]}"


def _external_tensors(model):
    import onnx

    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        tensors.extend(a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR)
    return [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]


def onnx_external(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    model = _onnx_model(data)
    tensors = _external_tensors(model)
    if not tensors:
        raise Unparseable("no external data")
    tensor = rng.choice(tensors)
    entries = {e.key: e for e in tensor.external_data}
    key = rng.choice(("location", "location", "offset", "offset", "length", "length", "remove", "swap"))
    if key == "remove":
        victim = rng.choice(list(entries))
        tensor.external_data.remove(entries[victim])
        return model.SerializeToString(), f"onnx external-data {victim} of {tensor.name} removed"
    if key == "swap":
        other = rng.choice([t for t in tensors if t is not tensor] or [tensor])
        mine, theirs = list(tensor.external_data), list(other.external_data)
        del tensor.external_data[:]
        del other.external_data[:]
        tensor.external_data.extend(theirs)
        other.external_data.extend(mine)
        return model.SerializeToString(), f"onnx external data of {tensor.name} swapped with {other.name}"
    if key == "location":
        new = rng.choice(("../manifest.json", "../../../../etc/hostname", "/etc/hostname", "/dev/zero", "missing.bin", "model.onnx",
                          "", ".", "..", "sub/../model.onnx_data", "../onnx/model.onnx_data", "model.onnx_data\u0000x", "config.json"))
    else:
        old = int(entries[key].value) if key in entries else 0
        new = str(rng.choice([v for v in (*SIGNED_EXTREMES, old + 1, old - 1, old + 4, old * 2, 123136) if v != old]))
    if key in entries:
        old_text, entries[key].value = entries[key].value, new
    else:
        old_text = None
        entry = tensor.external_data.add()
        entry.key, entry.value = key, new
    return model.SerializeToString(), f"onnx external-data {key} of {tensor.name}: {old_text!r} -> {new!r}"


def onnx_tensor(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    model = _onnx_model(data)
    tensors = list(model.graph.initializer)
    if not tensors:
        raise Unparseable("no initializers")
    tensor = rng.choice(tensors)
    if rng.random() < 0.4:
        old = tensor.data_type
        tensor.data_type = rng.choice([v for v in (0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 16, 21, 22, 999) if v != old])
        return model.SerializeToString(), f"onnx data_type of initializer {tensor.name}: {old} -> {tensor.data_type}"
    if not len(tensor.dims):
        tensor.dims.append(2**31 - 1)
        return model.SerializeToString(), f"onnx dims of scalar initializer {tensor.name}: [] -> [2147483647]"
    i = rng.randrange(len(tensor.dims))
    old = tensor.dims[i]
    tensor.dims[i] = rng.choice([v for v in (0, 1, -1, 2**31 - 1, 2**32, 2**62, old + 1, old * 2) if v != old])
    return model.SerializeToString(), f"onnx dim {i} of initializer {tensor.name}: {old} -> {tensor.dims[i]}"


def onnx_graph(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    model = _onnx_model(data)
    op = rng.choice(("rewire", "drop node", "duplicate node", "op type", "opset", "ir version"))
    if op in ("opset", "ir version"):
        values = (0, 1, 999, 2**31 - 1, 2**63 - 1)
        if op == "opset" and len(model.opset_import):
            entry = rng.choice(list(model.opset_import))
            old, entry.version = entry.version, rng.choice(values)
            return model.SerializeToString(), f"onnx opset {entry.domain or 'ai.onnx'}: {old} -> {entry.version}"
        old, model.ir_version = model.ir_version, rng.choice(values)
        return model.SerializeToString(), f"onnx ir_version: {old} -> {model.ir_version}"
    i = rng.randrange(len(model.graph.node))
    node = model.graph.node[i]
    if op == "drop node":
        del model.graph.node[i]
        return model.SerializeToString(), f"onnx node {node.op_type} {node.name!r} removed"
    if op == "duplicate node":
        model.graph.node.insert(i, node)
        return model.SerializeToString(), f"onnx node {node.op_type} {node.name!r} duplicated"
    if op == "op type":
        old = node.op_type
        node.op_type = rng.choice(("MatMulNBits", "GroupQueryAttention", "Gather", "Reshape", "NoSuchOp"))
        return model.SerializeToString(), f"onnx node {node.name!r} op type {old} -> {node.op_type}"
    if not len(node.input):
        raise Unparseable("node without inputs")
    j = rng.randrange(len(node.input))
    old = node.input[j]
    names = [n.output[0] for n in model.graph.node if len(n.output)] + ["no_such_tensor", ""]
    node.input[j] = rng.choice(names)
    return model.SerializeToString(), f"onnx input {j} of {node.op_type} {node.name!r}: {old!r} -> {node.input[j]!r}"


# --- dispatch ------------------------------------------------------------------

STRUCTURED: dict[str, tuple[tuple[Mutator, float], ...]] = {
    "bytes": (),
    "gguf": ((gguf_field, 1.0),),
    "safetensors": ((safetensors_length, 0.15), (safetensors_tensor, 0.4), (safetensors_consistent, 0.35), (safetensors_layout, 0.5)),
    "json": ((json_value, 1.0),),
    "onnx": ((onnx_attribute, 0.4), (onnx_external, 0.3), (onnx_tensor, 0.2), (onnx_graph, 0.2)),
}
STRUCTURED_SHARE = 0.65  # of mutants made by a structure-aware mutator, when the kind has any
STACKED_SHARE = 0.15  # of mutants that get a second mutation on top of the first (deeper states)


def mutate(kind: str, data: bytes, seed: int) -> tuple[bytes, str]:
    """One seeded mutant of `data` (a file of format `kind`) and its description."""
    if kind not in STRUCTURED:
        raise ValueError(f"unknown mutator kind {kind!r}; choose one of {', '.join(STRUCTURED)}")
    rng = random.Random(seed)
    mutated, description = _one_mutation(rng, kind, data)
    if rng.random() < STACKED_SHARE:
        mutated, second = _one_mutation(rng, kind, mutated)
        description = f"{description} + {second}"
    return mutated, description


def _one_mutation(rng: random.Random, kind: str, data: bytes) -> tuple[bytes, str]:
    structured = STRUCTURED[kind]
    if structured and rng.random() < STRUCTURED_SHARE:
        mutator = rng.choices([m for m, _ in structured], [w for _, w in structured])[0]
        try:
            return mutator(rng, data)
        except (Unparseable, ValueError):  # input it cannot read (e.g. after a stacked mutation)
            pass
    mutator = rng.choice(GENERIC)
    mutated, description = mutator(rng, data)
    return mutated, description
