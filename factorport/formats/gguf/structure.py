"""A bounded structural pass over a GGUF file, run before any other reader.

gguf's GGUFReader trusts the counts in a file: an array count of 2^40 makes
it allocate gigabytes, and its numpy uint64 offset arithmetic wraps. This
pass reads the header, the key/values and the tensor infos with every count
and length bounded by the bytes left in the file, computes every range with
Python ints, and checks the tensor layout the way llama.cpp's gguf loader
does (ggml/src/gguf.cpp): known types, 1-4 positive dims, a row length that
the block size divides, offsets aligned to general.alignment, packed in the
listed order without overlap, all inside the file. Only a file that passed
is handed to GGUFReader (or llama.cpp).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from ...errors import FactorportError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # llama.cpp refuses 1 and anything above 3
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 with the terminating NUL
INT64_MAX = 2**63 - 1
REEXPORT = "re-export it with 'factorport export OUTPUT --format gguf --force'"

# GGUF value types (gguf.h): id -> (name, bytes of one scalar; 0: string / array)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
VALUE_TYPES = {
    UINT8: ("UINT8", "<u1"), INT8: ("INT8", "<i1"), UINT16: ("UINT16", "<u2"), INT16: ("INT16", "<i2"),
    UINT32: ("UINT32", "<u4"), INT32: ("INT32", "<i4"), FLOAT32: ("FLOAT32", "<f4"), BOOL: ("BOOL", "<i1"),
    STRING: ("STRING", None), ARRAY: ("ARRAY", None), UINT64: ("UINT64", "<u8"), INT64: ("INT64", "<i8"),
    FLOAT64: ("FLOAT64", "<f8"),
}
# smallest encoding of one tensor info: name length, n_dims, one dim, type, offset
MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8
MIN_KEY_VALUE = 8 + 1 + 4 + 1  # key length, one key byte, type, one value byte


def shown(text: str, limit: int = 80) -> str:
    """A key or tensor name as it may appear in a one-line message: control
    characters escaped, long names cut."""
    text = text if text.isprintable() else ascii(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def type_name(value_type: int) -> str:
    return VALUE_TYPES[value_type][0]


@dataclass(frozen=True)
class KeyValue:
    type: int  # a GGUF value type
    value: object  # int / float / bool / str; for an array a list (strings) or a numpy array
    item_type: int | None = None  # element type of an array

    def describe(self) -> str:
        if self.type == ARRAY:
            return f"ARRAY[{type_name(self.item_type)}]"
        return type_name(self.type)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the row length
    ggml_type: int
    offset: int  # from the start of the data section
    n_bytes: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (rows, cols)."""
        return tuple(reversed(self.dims))


@dataclass
class Layout:
    path: Path
    version: int
    file_size: int
    alignment: int
    data_start: int
    kv: dict[str, KeyValue] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)


@lru_cache(maxsize=1)
def _ggml_sizes() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, block size, bytes per block), from the gguf package's table."""
    import gguf

    return {int(t): (t.name, block, size) for t, (block, size) in gguf.GGML_QUANT_SIZES.items() if block > 0 and size > 0}


def ggml_type_name(ggml_type: int) -> str:
    entry = _ggml_sizes().get(ggml_type)
    return entry[0] if entry else f"#{ggml_type}"


class _Cursor:
    """Reads little-endian values from a memory map, never past its end."""

    def __init__(self, buf, path: Path) -> None:
        self.buf, self.path, self.pos, self.end = buf, path, 0, len(buf)

    def fail(self, what: str):
        raise FactorportError(f"{self.path}: {what}; {REEXPORT}")

    def left(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            self.fail(f"{what} needs {n} bytes at offset {self.pos} but the file ends {self.left()} bytes later (truncated or corrupted)")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def raw_string(self, what: str) -> bytes:
        length = self.unpack("<Q", f"the length of {what}")
        self.need(length, f"{what} ({length} bytes)")
        data = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        return data

    def text(self, what: str) -> str:
        data = self.raw_string(what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def numbers(self, dtype: str, count: int, what: str) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        self.need(size, what)
        array = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()  # copy: the map is closed after
        self.pos += size
        return array


def parse(path: Path) -> Layout:
    """The checked layout of the GGUF file at `path` (FactorportError if malformed)."""
    path = Path(path)
    if not path.is_file():
        raise FactorportError(f"{path} does not exist; export the model with '--format gguf'")
    size = path.stat().st_size
    if size < 24:
        raise FactorportError(f"{path} is truncated ({size} bytes, shorter than a GGUF header); {REEXPORT}")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cursor = _Cursor(buf, path)
        layout, n_tensors, n_kv = _header(cursor, size)
        return _body(cursor, layout, n_tensors, n_kv)


def _header(c: _Cursor, size: int) -> tuple[Layout, int, int]:
    if bytes(c.buf[:4]) != MAGIC:
        c.fail(f"is not a GGUF file (magic {bytes(c.buf[:4])!r}, expected b'GGUF')")
    c.pos = 4
    version = c.unpack("<I", "the version")
    if version not in VERSIONS:
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        c.fail(f"GGUF version {version}{hint} is not supported; llama.cpp reads versions 2 and 3")
    n_tensors = c.unpack("<Q", "the tensor count")
    n_kv = c.unpack("<Q", "the key/value count")
    # bound both counts by what the rest of the file could hold
    if n_kv * MIN_KEY_VALUE > c.left():
        c.fail(f"the header claims {n_kv} key/values, more than the {c.left()} bytes left can hold")
    if n_tensors * MIN_TENSOR_INFO > c.left():
        c.fail(f"the header claims {n_tensors} tensors, more than the {c.left()} bytes left can hold")
    layout = Layout(path=c.path, version=version, file_size=size, alignment=DEFAULT_ALIGNMENT, data_start=0)
    return layout, n_tensors, n_kv


def _body(c: _Cursor, layout: Layout, n_tensors: int, n_kv: int) -> Layout:
    for i in range(n_kv):
        key = c.text(f"key {i}")
        if not key:
            c.fail(f"key {i} is empty")
        if key in layout.kv:
            c.fail(f"key {shown(key)} appears twice")
        layout.kv[key] = _value(c, key)
    layout.alignment = _alignment(c, layout)
    infos = [_tensor_info(c, i) for i in range(n_tensors)]
    names = set()
    for t in infos:
        if t.name in names:
            c.fail(f"tensor {shown(t.name)} appears twice")
        names.add(t.name)
    layout.data_start = _padded(c.pos, layout.alignment)
    if layout.data_start > layout.file_size:
        c.fail(f"the data section would start at {layout.data_start}, past the end of the file ({layout.file_size} bytes; truncated)")
    layout.tensors = infos
    _check_ranges(c, layout)
    return layout


def _value(c: _Cursor, raw_key: str) -> KeyValue:
    key = shown(raw_key)
    value_type = c.unpack("<I", f"the type of key {key}")
    if value_type not in VALUE_TYPES:
        c.fail(f"key {key} has unknown value type {value_type}")
    if value_type != ARRAY:
        return KeyValue(value_type, _scalar(c, value_type, key))
    item_type = c.unpack("<I", f"the element type of key {key}")
    if item_type not in VALUE_TYPES or item_type == ARRAY:
        c.fail(f"key {key} is an array of {'arrays' if item_type == ARRAY else f'unknown type {item_type}'}, which llama.cpp refuses")
    count = c.unpack("<Q", f"the element count of key {key}")
    item_bytes = 8 if item_type == STRING else np.dtype(VALUE_TYPES[item_type][1]).itemsize
    if count * item_bytes > c.left():
        c.fail(f"key {key} claims {count} elements, more than the {c.left()} bytes left can hold")
    if item_type == STRING:
        items = [c.text(f"element {j} of key {key}") for j in range(count)]
    else:
        items = c.numbers(VALUE_TYPES[item_type][1], count, f"the elements of key {key}")
    return KeyValue(ARRAY, items, item_type)


def _scalar(c: _Cursor, value_type: int, key: str):
    if value_type == STRING:
        return c.text(f"the value of key {key}")
    value = c.numbers(VALUE_TYPES[value_type][1], 1, f"the value of key {key}")[0]
    if value_type == BOOL:
        return bool(value)
    return float(value) if value_type in (FLOAT32, FLOAT64) else int(value)


def _alignment(c: _Cursor, layout: Layout) -> int:
    kv = layout.kv.get("general.alignment")
    if kv is None:
        return DEFAULT_ALIGNMENT
    if kv.type != UINT32:
        c.fail(f"key general.alignment is {kv.describe()}, llama.cpp needs UINT32")
    if kv.value == 0 or kv.value & (kv.value - 1):
        c.fail(f"key general.alignment is {kv.value}, not a power of two")
    return kv.value


def _tensor_info(c: _Cursor, i: int) -> TensorInfo:
    raw_name = c.text(f"the name of tensor {i}")
    if not raw_name or len(raw_name.encode("utf-8")) > MAX_NAME_BYTES:
        c.fail(f"tensor {i} has a name of {len(raw_name.encode('utf-8'))} bytes ({shown(raw_name)}); llama.cpp needs 1 to {MAX_NAME_BYTES}")
    name = shown(raw_name)  # for the messages below
    n_dims = c.unpack("<I", f"the dimension count of tensor {name}")
    if not 1 <= n_dims <= MAX_DIMS:
        c.fail(f"tensor {name} has {n_dims} dimensions; ggml allows 1 to {MAX_DIMS}")
    dims = tuple(c.unpack("<q", f"dimension {j} of tensor {name}") for j in range(n_dims))
    if any(d <= 0 for d in dims):
        c.fail(f"tensor {name} has dimensions {list(dims)}; every dimension must be positive")
    elements = 1
    for d in dims:
        elements *= d  # Python ints: no wrap-around
    if elements > INT64_MAX:
        c.fail(f"tensor {name} has dimensions {list(dims)}, {elements} elements overflow int64")
    ggml_type = c.unpack("<I", f"the type of tensor {name}")
    sizes = _ggml_sizes()
    if ggml_type not in sizes:
        c.fail(f"tensor {name} has unknown ggml type {ggml_type}")
    type_name_, block, block_bytes = sizes[ggml_type]
    if dims[0] % block:
        c.fail(f"tensor {name} of type {type_name_} has rows of {dims[0]} values, not a multiple of its block size {block}")
    offset = c.unpack("<Q", f"the data offset of tensor {name}")
    return TensorInfo(raw_name, dims, ggml_type, offset, elements // block * block_bytes)


def _padded(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _check_ranges(c: _Cursor, layout: Layout) -> None:
    """Each tensor's bytes lie inside the file, aligned, not overlapping
    another, at the offset llama.cpp expects: the tensors packed in the order
    they are listed, each padded to the alignment."""
    data_size = layout.file_size - layout.data_start
    expected = 0
    by_offset = sorted(layout.tensors, key=lambda t: t.offset)
    for t in layout.tensors:
        if t.offset % layout.alignment:
            c.fail(f"tensor {shown(t.name)} has data offset {t.offset}, not a multiple of general.alignment {layout.alignment}")
        if t.offset + t.n_bytes > data_size:
            c.fail(f"tensor {shown(t.name)} ({t.n_bytes} bytes at data offset {t.offset}) ends past the end of the file (truncated or corrupted)")
    for before, after in zip(by_offset, by_offset[1:]):
        if after.offset < before.offset + before.n_bytes:
            c.fail(f"tensor {shown(after.name)} (data offset {after.offset}) overlaps tensor {shown(before.name)} ({before.n_bytes} bytes at {before.offset})")
    for t in layout.tensors:
        if t.offset != expected:
            c.fail(f"tensor {shown(t.name)} has data offset {t.offset}; llama.cpp expects {expected} (tensors packed in the order listed)")
        expected += _padded(t.n_bytes, layout.alignment)
