"""The safetensors directory: `model.safetensors` (every tensor once, the
layout JSON in the header under `factorport`), or above `MAX_SHARD_BYTES`
shards `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`
(Hugging Face's convention; the layout JSON in the index's metadata), plus
config, generation config and tokenizer files, so the directory looks like a
Hugging Face model. `load` gives back a transformers model computing the
same logits bit for bit.

Writing streams: a layer-by-layer conversion writes each finished decoder
layer as a *piece* (a safetensors file holding that layer's tensors, its
layout fragment and its reports) into the staging directory, and `assemble`
turns the pieces into the final file (copied byte range by byte range) or
shards. `write_file` writes one tensor at a time from its own memory, never a
second copy of the model.

Reading is checked before anything is built (docs/FORMAT.md, "What a reader
checks"): the safetensors header is parsed here, bounded by the file size;
config.json must describe the tensors the file holds; the layout JSON must
account for every tensor with its exact shape and dtype. The model skeleton
is built on the meta device, so it allocates nothing: the only memory a load
takes is the file's own tensors.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..architectures import ARCHITECTURES
from ..errors import FactorportError
from .layout import describe, layout, rebuild, verify_tensors, widen_tables

SUBDIR = "safetensors"  # inside a `factorport convert` output
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
# above this the directory is sharded, one decoder layer per shard (so a
# reader, like the converter, can hold one layer at a time)
MAX_SHARD_BYTES = 2 << 30
PIECES = "pieces"  # in a staging directory: one file per finished layer
PIECE_KEY = "factorport_piece"
CONFIG = "config.json"
METADATA_KEY = "factorport"
# bytes per element of every safetensors dtype (sub-byte float types are not read)
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
HEADER_LIMIT = 100 << 20  # the safetensors library refuses larger headers too
JSON_FILE_LIMIT = 64 << 20  # config / tokenizer JSON files: far above any real one
# config.json integers that size the skeleton (required, then optional)
SIZE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
OPTIONAL_SIZE_KEYS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
# config.json numbers the forward pass uses: (exclusive) bounds of a sane value
FLOAT_KEYS = {"rms_norm_eps": (0, 1), "rope_theta": (0, 1e12)}
TOKENIZER_JSON = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file's header: dtype (safetensors code) and shape."""

    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # start of its bytes in the data section

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def state_tensors(model) -> dict[str, torch.Tensor]:
    """Every stored tensor once: shared storage (tied weights) is kept under its first name."""
    return _unique({k: t for k, t in model.state_dict(keep_vars=False).items() if t is not None})


def _unique(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[int, str] = {}
    tensors = {}
    for name, t in named.items():
        key = (t.data_ptr(), t.numel(), t.dtype) if t.numel() else (id(t), 0, t.dtype)
        if key in seen:
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    return tensors


def save(model, tokenizer, directory: Path) -> dict:
    """Write the directory (which must exist and be empty) from a model in
    memory, as one file; returns the layout metadata."""
    meta = describe(model)
    write_file(directory / WEIGHTS, state_tensors(model), {"format": "pt", METADATA_KEY: json.dumps(meta)})
    save_side_files(model.config, getattr(model, "generation_config", None), tokenizer, directory)
    return meta


def save_side_files(config, generation_config, tokenizer, directory: Path) -> None:
    config.save_pretrained(directory)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


_CODES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


def _write_streamed(path: Path, entries: dict[str, TensorEntry], metadata: dict[str, str], write_bytes) -> None:
    """A safetensors file with `entries`' header, `write_bytes(fh, name)`
    writing each tensor's bytes in name order (which `_check_write_order`
    accepts). Written to a temporary name and renamed, so a crash never
    leaves a half-written file."""
    names = sorted(entries)
    header, offset = {"__metadata__": metadata}, 0
    for name in names:
        e = entries[name]
        header[name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the spec pads the header with spaces to 8 bytes
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for name in names:
            write_bytes(fh, name)
    os.replace(tmp, path)


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file, streamed tensor by tensor from the tensors' own
    memory (safetensors' `save_file` first builds the whole file in memory:
    a second copy of an 8B model's embedding)."""

    def write_bytes(fh, name: str) -> None:
        t = tensors[name].detach().cpu().contiguous()
        if t.numel():
            fh.write(memoryview(t.view(-1).view(torch.uint8).numpy()))

    entries = {name: TensorEntry(_CODES[t.dtype], tuple(t.shape)) for name, t in tensors.items()}
    _write_streamed(path, entries, metadata, write_bytes)


def merge_files(paths: list[Path], path: Path, metadata: dict[str, str], chunk: int = 16 << 20) -> None:
    """One safetensors file holding every tensor of `paths` (headers checked),
    copied from them byte range by byte range: a chunk in memory, never a tensor."""
    sources: dict[str, tuple[Path, int, TensorEntry]] = {}
    for source in paths:
        entries, _ = read_header(source)
        data_start = source.stat().st_size - sum(e.nbytes for e in entries.values())  # the tensors tile the data section
        sources.update({name: (source, data_start + e.offset, e) for name, e in entries.items()})

    def copy_bytes(fh, name: str) -> None:
        source, begin, entry = sources[name]
        with open(source, "rb") as src:
            src.seek(begin)
            left = entry.nbytes
            while left:
                block = src.read(min(left, chunk))
                if not block:
                    raise _corrupted(source, f"tensor {name!r} ends before its data_offsets say")
                fh.write(block)
                left -= len(block)

    _write_streamed(path, {name: entry for name, (_, _, entry) in sources.items()}, metadata, copy_bytes)


# ------------------------------------------------------------------ pieces


def stored_tensors(module, prefix: str = "") -> dict[str, torch.Tensor]:
    """`state_tensors` of a module's non-meta tensors, names under `prefix`."""
    lead = f"{prefix}." if prefix else ""
    real = {k: v for k, v in module.state_dict(keep_vars=False).items() if v is not None and not v.is_meta}
    return {lead + k: v for k, v in _unique(real).items()}


def write_piece(
    staging: Path, name: str, tensors: dict[str, torch.Tensor], fragment: tuple[dict, dict], reports: list[dict],
    seconds: float, calibration_seconds: float,
) -> None:
    """One finished part of a layer-by-layer conversion, in `staging/pieces`."""
    (staging / PIECES).mkdir(exist_ok=True)
    info = {"linears": fragment[0], "shared": fragment[1], "reports": reports, "seconds": round(seconds, 3),
            "calibration_seconds": round(calibration_seconds, 3)}
    write_file(staging / PIECES / f"{name}.safetensors", tensors, {"format": "pt", PIECE_KEY: json.dumps(info)})


def piece_files(staging: Path) -> list[Path]:
    return sorted((staging / PIECES).glob("*.safetensors")) if (staging / PIECES).is_dir() else []


def piece_info(path: Path) -> dict:
    _, header = read_header(path)
    info = parse_json(header.get(PIECE_KEY, ""), path, "the piece record", "convert again without --resume")
    if not isinstance(info, dict) or set(info) != {"linears", "shared", "reports", "seconds", "calibration_seconds"}:
        raise FactorportError(f"{path}: not a piece of a factorport conversion; convert again without --resume")
    return info


def assemble(
    staging: Path, directory: Path, model_type: str, tied: bool, table_dtype: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict:
    """The final safetensors files of `directory` from the pieces in
    `staging`: one `model.safetensors` when the pieces hold at most
    `max_shard_bytes`, else one shard per piece and the index. Returns the layout."""
    pieces = piece_files(staging)
    infos = [piece_info(p) for p in pieces]
    meta = layout(model_type, tied, [(i["linears"], i["shared"]) for i in infos], table_dtype)
    total = sum(p.stat().st_size for p in pieces)
    if total <= max_shard_bytes:
        merge_files(pieces, directory / WEIGHTS, {"format": "pt", METADATA_KEY: json.dumps(meta)})
        shutil.rmtree(staging / PIECES)
        return meta
    weight_map, size = {}, 0
    for i, path in enumerate(pieces):
        shard = f"model-{i + 1:05d}-of-{len(pieces):05d}.safetensors"
        entries, _ = read_header(path)
        weight_map.update({name: shard for name in entries})
        size += sum(e.nbytes for e in entries.values())
        os.replace(path, directory / shard)
    index = {"metadata": {"total_size": size, METADATA_KEY: meta}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (staging / PIECES).rmdir()
    return meta


def save_state(path: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Resumption state (activations, no pickle), written atomically."""
    write_file(path, tensors, {"format": "pt", PIECE_KEY: json.dumps(info)})


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    _, header = read_header(path)
    info = parse_json(header.get(PIECE_KEY, ""), path, "the resume state", "convert again without --resume")
    return read_file_tensors(path), info


# ------------------------------------------------------------------ the header


def _corrupted(path: Path, what: str) -> FactorportError:
    return FactorportError(f"{path} is truncated or corrupted ({what}); re-export it")


def _unique_keys(pairs):
    """json object_pairs_hook: a repeated key would let two readers see different files."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"key {key!r} appears twice")
        obj[key] = value
    return obj


def parse_json(data: bytes | str, path: Path | str, what: str, fix: str):
    """JSON from UTF-8 bytes (or text); a one-line error naming `path` otherwise."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise FactorportError(f"{path}: {what} is not UTF-8 text; {fix}") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError, so is a repeated key
        raise FactorportError(f"{path}: {what} is not valid JSON ({str(exc).splitlines()[0][:80]}); {fix}") from None


def _entry(name: str, raw, path: Path) -> tuple[TensorEntry, int, int]:
    """(entry, begin, end) of one header record, checked on its own."""
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise _corrupted(path, f"tensor {name!r} is not a {{dtype, shape, data_offsets}} record")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise _corrupted(path, f"tensor {name!r} has unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _corrupted(path, f"tensor {name!r} has a shape that is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets) and offsets[0] <= offsets[1]):
        raise _corrupted(path, f"tensor {name!r} has data_offsets that are not [begin, end]")
    entry = TensorEntry(dtype, tuple(shape), offsets[0])
    if entry.nbytes != offsets[1] - offsets[0]:
        raise _corrupted(path, f"tensor {name!r} is {list(shape)} {dtype} = {entry.nbytes} bytes, its offsets span {offsets[1] - offsets[0]}")
    return entry, offsets[0], offsets[1]


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """({tensor: entry}, __metadata__) of a safetensors file, checked as the
    spec requires before any reader maps it: a sane header length, a JSON
    object, known dtypes, shape x dtype size = byte span, and offsets that
    tile the data section exactly (in order, no overlap, no gap, no tail)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise _corrupted(path, "shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8 or length > HEADER_LIMIT:
            raise _corrupted(path, f"header length {length} does not fit in the {size}-byte file")
        header = fh.read(length)
    parsed = parse_json(header, path, "the header", "re-export it")
    if not isinstance(parsed, dict):
        raise _corrupted(path, "the header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupted(path, "__metadata__ is not a map of strings")
    tensors, spans = {}, []
    for name, raw in parsed.items():
        tensors[name], begin, end = _entry(name, raw, path)
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise _corrupted(path, f"tensor {name!r} {what}")
        position = end
    if position != size - 8 - length:
        raise _corrupted(path, f"the tensors hold {position} bytes, the data section is {size - 8 - length}")
    return tensors, metadata


def _check_write_order(tensors: dict[str, TensorEntry], path: Path) -> None:
    """factorport's writer stores tensors in name order (safetensors'
    `save_file`, which wrote version 1, stores those of one dtype in name
    order: both pass); two same-sized tensors whose offsets were swapped tile
    the file as well, but would load each other's bytes."""
    last: dict[str, str] = {}
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].offset, item[0])):
        if last.get(entry.dtype, "") > name:
            raise _corrupted(path, f"tensor {last[entry.dtype]!r} is stored before {name!r}, not in the order factorport writes")
        last[entry.dtype] = name


def read_metadata(directory: Path) -> dict:
    """The layout JSON from the safetensors header (no tensor is read)."""
    return _read_layout(Path(directory))[1]


def weight_files(directory: Path) -> list[Path]:
    """The files holding a directory's tensors: model.safetensors, or its shards."""
    directory = Path(directory)
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    if (directory / INDEX).is_file():
        return sorted({directory / f for f in _read_index(directory)[0].values()})
    raise FactorportError(f"{directory} has no {WEIGHTS} or {INDEX}; point at a factorport safetensors directory")


def _read_index(directory: Path) -> tuple[dict[str, str], dict]:
    """(weight_map, index metadata) of a sharded directory, checked: shard
    names of the form model-0000N-of-0000M.safetensors, all M of them present."""
    path = directory / INDEX
    index = read_json_file(path)
    weight_map, metadata = index.get("weight_map"), index.get("metadata")
    if not isinstance(weight_map, dict) or not weight_map or not isinstance(metadata, dict):
        raise FactorportError(f"{path}: expected a weight_map of tensor -> shard and a metadata object; re-export it")
    shards = set(weight_map.values())
    counts = set()
    for shard in shards:
        match = SHARD.fullmatch(shard) if isinstance(shard, str) else None
        if match is None:
            raise FactorportError(f"{path}: {str(shard)[:60]!r} is not a shard name model-0000N-of-0000M.safetensors; re-export it")
        counts.add(int(match.group(2)))
    expected = {f"model-{i:05d}-of-{c:05d}.safetensors" for c in counts for i in range(1, c + 1)}
    if len(counts) != 1 or shards != expected:
        raise FactorportError(f"{path}: the weight_map names {len(shards)} shards that are not model-00001..-of-{max(counts):05d}; re-export it")
    for shard in sorted(shards):
        if not (directory / shard).is_file():
            raise FactorportError(f"{directory / shard} is missing; the artifact is incomplete, re-export it")
    return weight_map, metadata


def _read_layout(directory: Path) -> tuple[dict[str, TensorEntry], dict]:
    if (directory / WEIGHTS).is_file() or not (directory / INDEX).is_file():
        return _read_single_layout(directory)
    weight_map, metadata = _read_index(directory)
    tensors: dict[str, TensorEntry] = {}
    for shard in sorted(set(weight_map.values())):
        path = directory / shard
        held, _ = read_header(path)
        _check_write_order(held, path)
        for name, entry in held.items():
            if weight_map.get(name) != shard:
                raise FactorportError(f"{path} holds {name!r}, which {INDEX} does not map to it; re-export it")
            tensors[name] = entry
    if len(tensors) != len(weight_map):
        missing = next(n for n in weight_map if n not in tensors)
        raise FactorportError(f"{directory / INDEX} maps {missing!r} to {weight_map[missing]}, which does not hold it; re-export it")
    meta = metadata.get(METADATA_KEY)
    if not isinstance(meta, dict):
        raise FactorportError(f"{directory / INDEX} carries no factorport layout; it is a plain model, load it with transformers")
    return tensors, meta


def _read_single_layout(directory: Path) -> tuple[dict[str, TensorEntry], dict]:
    path = directory / WEIGHTS
    if not path.is_file():
        raise FactorportError(f"{directory} has no {WEIGHTS}; point at a factorport safetensors directory")
    tensors, header = read_header(path)
    if METADATA_KEY not in header:
        raise FactorportError(f"{path} carries no factorport layout; it is a plain model, load it with transformers")
    _check_write_order(tensors, path)
    meta = parse_json(header[METADATA_KEY], path, "the factorport layout in the header", "re-export it")
    if not isinstance(meta, dict):
        raise FactorportError(f"{path}: the factorport layout in the header is not a JSON object; re-export it")
    return tensors, meta


def find_artifact(path: str | Path) -> Path | None:
    """The safetensors directory of a factorport output (or `path` itself), or None."""
    path = Path(path)
    for candidate in (path / SUBDIR, path):
        stored = (candidate / WEIGHTS).is_file() or (candidate / INDEX).is_file()
        if stored and (candidate / CONFIG).is_file():
            try:
                read_metadata(candidate)
            except FactorportError as exc:
                if "plain model" in str(exc):
                    continue
                raise
            return candidate
    return None


def read_file_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file (its header checked first)."""
    read_header(path)  # safetensors maps the file by its header: check the header first
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FactorportError(f"{path} is truncated or corrupted ({exc}); re-export it") from exc


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in weight_files(Path(directory)):
        tensors.update(read_file_tensors(path))
    return tensors


# ------------------------------------------------------------------ config.json


def read_json_file(path: Path, fix: str = "re-export it", where: str | None = None) -> dict:
    """A small JSON object file (config, tokenizer config), read bounded;
    errors name `where` (e.g. the GGUF it was unpacked from), else `path`."""
    where = where or str(path)
    size = path.stat().st_size
    if size > JSON_FILE_LIMIT:
        raise FactorportError(f"{where} is {size} bytes, more than any {path.name} factorport writes; {fix}")
    parsed = parse_json(path.read_bytes(), where, "the file", fix)
    if not isinstance(parsed, dict):
        raise FactorportError(f"{where} is not a JSON object; {fix}")
    return parsed


def _positive_int(config: dict, key: str, limit: int, source: str) -> int:
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
        raise FactorportError(f"{source}: {key} = {str(value)[:40]} is not a positive integer the weights can hold; re-export it")
    return value


def _layer_indices(names, layers: str) -> set[int]:
    pattern = re.compile(rf"{re.escape(layers)}\.(\d+)\.")
    return {int(m.group(1)) for m in map(pattern.match, names) if m}


def _is_range(indices: set[int], count: int) -> bool:
    """`indices` is exactly {0, ..., count - 1}."""
    return len(indices) == count and (not indices or (min(indices) == 0 and max(indices) == count - 1))


def _embedding_shape(meta: dict, tensors: dict[str, TensorEntry], arch) -> tuple[int, ...] | None:
    """(vocab, hidden) as the file holds it: the embedding table, else the (tied) output projection."""
    for name in (f"{arch.embed}.weight", f"{arch.lm_head}.weight"):
        if name in tensors:
            return tensors[name].shape
    head = meta.get("linears", {}).get(arch.lm_head) if isinstance(meta.get("linears"), dict) else None
    if isinstance(head, dict):
        return (head.get("out_features"), head.get("in_features"))
    return None


def check_config(config: dict, meta: dict, tensors: dict[str, TensorEntry], source: str) -> None:
    """config.json against the file, before a skeleton is built from it: a
    supported model_type, positive integer sizes no larger than the file's
    element count, as many layers as the file holds and an embedding table of
    (vocab_size, hidden_size). The exact shape of every other tensor is
    compared with the (meta-device) skeleton in `layout.verify_tensors`."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        raise FactorportError(f"{source}: model_type {str(model_type)[:40]!r} is not one of {', '.join(ARCHITECTURES)}; re-export it")
    if meta.get("model_type", model_type) != model_type:
        raise FactorportError(f"{source}: model_type {model_type!r} differs from the layout's {str(meta.get('model_type'))[:40]!r}; re-export it")
    arch = ARCHITECTURES[model_type]
    limit = max(1, sum(math.prod(t.shape) for t in tensors.values()))
    for key in SIZE_KEYS:
        if key not in config:
            raise FactorportError(f"{source}: {key} is missing; re-export it")
        _positive_int(config, key, limit, source)
    for key in OPTIONAL_SIZE_KEYS:
        if config.get(key) is not None:
            _positive_int(config, key, limit, source)
    for key, (low, high) in FLOAT_KEYS.items():
        value = config.get(key)  # absent: transformers' default; present, it must be a number (null broke the forward)
        if key in config and not (isinstance(value, (int, float)) and not isinstance(value, bool) and low < value < high):
            raise FactorportError(f"{source}: {key} = {str(value)[:40]} is not a number between {low} and {high}; re-export it")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv_heads:
        raise FactorportError(f"{source}: num_key_value_heads = {kv_heads} does not divide num_attention_heads = {heads}; re-export it")
    layers, count = _layer_indices(tensors, arch.layers), config["num_hidden_layers"]
    if not _is_range(layers, count):  # not set(range(count)): count is not trusted yet
        held = f"layers 0..{len(layers) - 1}" if _is_range(layers, len(layers)) else f"{len(layers)} layer indices up to {max(layers, default=-1)}"
        raise FactorportError(f"{source}: num_hidden_layers = {config['num_hidden_layers']} but the weights hold {held}; re-export it")
    embedding = _embedding_shape(meta, tensors, arch)
    expected = (config["vocab_size"], config["hidden_size"])
    if embedding is None or tuple(embedding) != expected:
        raise FactorportError(f"{source}: (vocab_size, hidden_size) = {expected} but the embedding table is {embedding}; re-export it")


# ------------------------------------------------------------------ the skeleton


def no_init_weights():
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # pragma: no cover - older/newer transformers
        from transformers.initialization import no_init_weights
    return no_init_weights()


def _skeleton(directory: Path, meta: dict, tensors: dict[str, TensorEntry], source: str, config_source: str | None = None):
    """A transformers model of the directory's config on the meta device
    (no memory), after config.json and the layout were checked against the
    file's tensors. `load_state_dict(assign=True)` then fills it with the
    file's tensors and `materialize` computes what is not stored."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_source = config_source or str(directory / CONFIG)
    check_config(read_json_file(directory / CONFIG, where=config_source), meta, tensors, config_source)
    try:
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # what transformers raises on a config it cannot build (AssertionError: nn.Embedding's padding_idx check)
    except (ValueError, TypeError, KeyError, AttributeError, OSError, AssertionError, OverflowError) as exc:
        raise FactorportError(f"{config_source} is not a valid config ({str(exc).splitlines()[0][:80]}); re-export it") from None
    verify_tensors(meta, {k: (t.dtype, t.shape) for k, t in tensors.items()}, model, source)
    return model


def compute_buffers(model, source: str) -> None:
    """Compute the buffers a checkpoint does not store (rotary inv_freq,
    Gemma's embedding scale), on the CPU: the model is built again from its
    config with its parameters on the meta device (accelerate keeps buffers
    real there). A module holding only such buffers (a rotary) is replaced
    whole, so that attributes computed beside them come along; elsewhere
    only the buffers are taken."""
    owners = {name.rpartition(".")[0] for name, b in model.named_buffers() if b.is_meta}
    if not owners:
        return
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(), no_init_weights():
            fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a config this transformers builds otherwise
        raise FactorportError(f"{source}: cannot compute the buffers of this config ({str(exc)[:80]}); re-export it") from None
    for name in sorted(owners):
        module, built = model.get_submodule(name), fresh.get_submodule(name)
        if not list(module.parameters(recurse=False)):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, built)
            continue
        for leaf, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                module._buffers[leaf] = built.get_buffer(leaf)


def materialize(model, source: str) -> None:
    """`compute_buffers`, then refuse a model that still has a meta tensor
    (it would fail at the first forward)."""
    compute_buffers(model, source)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise FactorportError(f"{source}: tensor '{left[0]}' is missing from the file; re-export it")


def _tokenizer(directory: Path, source: str | None = None):
    from ..loading import saved_tokenizer

    if not (directory / "tokenizer_config.json").exists():
        return None
    for name in TOKENIZER_JSON:
        if (directory / name).exists():
            read_json_file(directory / name, where=f"{source}: {name}" if source else None)
    try:
        return saved_tokenizer(directory)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises bare Exception on a bad file
        raise FactorportError(f"{source or directory}: the tokenizer files do not load ({str(exc).splitlines()[0][:80]}); re-export it") from None


def load(directory: str | Path):
    """(model, tokenizer) from a factorport safetensors directory."""
    directory = Path(directory)
    source = str(directory / WEIGHTS)
    header, meta = _read_layout(directory)
    model = _skeleton(directory, meta, header, source)
    tensors = read_tensors(directory)
    attach(model, meta, tensors, source)
    return model.eval(), _tokenizer(directory)


def attach(model, meta: dict, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Put the file's (already checked) tensors into a meta-device skeleton."""
    rebuild(model, meta, tensors, source)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not _is_tied_alias(model, k)]
    if missing or result.unexpected_keys:  # verify_tensors rules this out; kept as the last guard
        bad = (missing or result.unexpected_keys)[0]
        what = "missing" if missing else "unexpected"
        raise FactorportError(f"{source}: tensor '{bad}' is {what}; the file does not match its layout, re-export it")
    widen_tables(model, meta)
    if not meta.get("tied_embeddings") and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    materialize(model, source)


def verify(directory: str | Path) -> tuple[dict[str, TensorEntry], dict]:
    """Every check `load` makes before reading tensor data (header, config,
    layout); ({tensor: entry}, layout). Used by `factorport inspect`."""
    directory = Path(directory)
    header, meta = _read_layout(directory)
    _skeleton(directory, meta, header, str(directory / WEIGHTS))
    return header, meta


def _is_tied_alias(model, key: str) -> bool:
    """lm_head.weight is not stored when it is the embedding table."""
    return getattr(model.config, "tie_word_embeddings", False) and key.endswith("lm_head.weight")
