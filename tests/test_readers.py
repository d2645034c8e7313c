"""factorport's own readers refuse corrupted or tampered files with one
FactorportError line (never a traceback, a huge allocation or silently wrong
weights): the safetensors directory, model.factorport.gguf, `inspect` and the
manifest. Each test mutates a real saved file the way a fuzz campaign did."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import _build, make_stats
from factorport.converters import apply
from factorport.errors import FactorportError
from factorport.formats import manifest, safetensors_dir
from factorport.formats.gguf.native import load_native, write_native
from factorport.formats.summary import inspect_artifact
from factorport.recipe import parse_recipe

# int4 bases with a GlowQ correction (one shared V per input group and layer,
# float16 factors), an int8 tied lm_head: U8 / I8 codes, F16 scales and
# factors, F32 norms all exist
RECIPE = """name: readers
steps:
  - quantize: {targets: [linears], bits: 4, group_size: 32, symmetric: true}
  - correct: {targets: [linears], shared: true, ranks: {rank: 4}}
  - quantize: {targets: [lm_head], bits: 8, group_size: 32, symmetric: true}
"""
SPARSE = "name: sparse\nsteps:\n  - sparsify: {targets: ['*.mlp.*'], method: magnitude, density: 0.5, block_rows: 1, block_cols: 16, bits: 4}\n"
Q0 = "model.layers.0.self_attn.q_proj"
GROUP0, GROUP1 = "model.layers.0.self_attn.shared_q_k_v", "model.layers.1.self_attn.shared_q_k_v"
UP0 = "model.layers.0.mlp.up_proj"
IDS = torch.tensor([[1, 17, 42, 99, 3, 64, 127, 0, 5, 88, 23, 71]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


@pytest.fixture(scope="module")
def converted():
    model = _build("llama")
    apply(model, parse_recipe(RECIPE).steps, make_stats(model), progress=False)
    return model


@pytest.fixture(scope="module")
def saved(converted, tmp_path_factory):
    """A complete output: safetensors/, gguf/model.factorport.gguf, report/, manifest.json."""
    root = tmp_path_factory.mktemp("readers") / "out"
    (root / "safetensors").mkdir(parents=True)
    safetensors_dir.save(converted, None, root / "safetensors")
    (root / "gguf").mkdir()
    write_native(root / "gguf" / "model.factorport.gguf", converted, None)
    (root / "report").mkdir()
    (root / "report" / "convert.json").write_text("{}\n")
    manifest.write_manifest(root, {"source": {"name": "tiny", "kind": "random", "path": "-"}})
    return root


@pytest.fixture
def out(saved, tmp_path):
    """A fresh copy of the saved output, to mutate."""
    return shutil.copytree(saved, tmp_path / "out")


@pytest.fixture
def sparse_dir(tmp_path):
    model = _build("qwen2")
    apply(model, parse_recipe(SPARSE).steps, None, progress=False)
    directory = tmp_path / "sparse"
    directory.mkdir()
    safetensors_dir.save(model, None, directory)
    return directory


# ------------------------------------------------------------------ helpers


def _weights(out):
    return out / "safetensors" / safetensors_dir.WEIGHTS


def _read_raw(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write_raw(path, header, body):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


def _edit_header(path, change):
    header, body = _read_raw(path)
    change(header)
    _write_raw(path, header, body)


def _edit_layout(path, change):
    def edit(header):
        meta = json.loads(header["__metadata__"]["factorport"])
        change(meta)
        header["__metadata__"]["factorport"] = json.dumps(meta)

    _edit_header(path, edit)


def _edit_config(out, change):
    path = out / "safetensors" / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _refused(directory, pattern):
    with pytest.raises(FactorportError, match=pattern) as info:
        safetensors_dir.load(directory)
    assert "\n" not in str(info.value) and "re-export it" in str(info.value)
    return str(info.value)


# ------------------------------------------------------------------ valid files


def test_valid_files_reload_bit_exact_and_inspect(converted, out):
    ref = _logits(converted)
    loaded, _ = safetensors_dir.load(out / "safetensors")
    assert torch.equal(_logits(loaded), ref)
    native, _ = load_native(out / "gguf" / "model.factorport.gguf")
    assert torch.equal(_logits(native), ref)
    # the skeleton was built on the meta device: nothing is left there
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert inspect_artifact(out)["totals"]["compressed_linears"] == 15
    assert manifest.verify_manifest(out) == []


# ------------------------------------------------------------------ safetensors header


def test_offset_pointing_at_another_tensor(out):
    path = _weights(out)
    header, _ = _read_raw(path)
    # point layer 1's q_proj.U at layer 0's (same shape and dtype): the file would load with wrong weights
    later, earlier = "model.layers.1.self_attn.q_proj.U", f"{Q0}.U"
    assert header[earlier]["data_offsets"][0] < header[later]["data_offsets"][0]
    _edit_header(path, lambda h: h[later].update(data_offsets=h[earlier]["data_offsets"]))
    _refused(out / "safetensors", r"is truncated or corrupted \(tensor '.*' overlaps the tensor before it\)")


def test_offsets_swapped_between_same_sized_tensors(out):
    """Swapped spans still tile the file; the writer's name order gives them away."""
    a, b = f"{Q0}.U", "model.layers.1.self_attn.q_proj.U"

    def swap(header):
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]

    _edit_header(_weights(out), swap)
    _refused(out / "safetensors", rf"tensor '{b}' is stored before '{Q0}.base.scale', not in the order factorport writes")


@pytest.mark.parametrize(
    "length, expected",
    [(1 << 62, r"header length 4611686018427387904 does not fit in the \d+-byte file"), (0, r"the header is not valid JSON")],
)
def test_header_length_insane(out, length, expected):
    path = _weights(out)
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", length) + data[8:])
    _refused(out / "safetensors", expected)


def test_header_not_utf8(out):
    path = _weights(out)
    data = path.read_bytes()
    at = data.index(b'"pt"')
    path.write_bytes(data[: at + 1] + b"\xff\xfe" + data[at + 3 :])
    _refused(out / "safetensors", r"the header is not UTF-8 text")


def test_layout_json_broken(out):
    _edit_header(_weights(out), lambda h: h["__metadata__"].update(factorport="{not json"))
    _refused(out / "safetensors", r"the factorport layout in the header is not valid JSON")


def test_tensor_span_does_not_match_shape(out):
    _edit_header(_weights(out), lambda h: h[f"{Q0}.U"].update(shape=[64, 8]))
    _refused(out / "safetensors", rf"tensor '{Q0}.U' is \[64, 8\] F16 = 1024 bytes, its offsets span 512")


@pytest.mark.parametrize("dtype", ["F4", ["F16"]])
def test_unknown_dtype(out, dtype):
    _edit_header(_weights(out), lambda h: h[f"{Q0}.U"].update(dtype=dtype))
    _refused(out / "safetensors", rf"tensor '{Q0}.U' has unknown dtype {re.escape(repr(str(dtype)))}")


# ------------------------------------------------------------------ layout against the tensor table


@pytest.mark.parametrize(
    "tensor, dtype, expected",
    [
        ("model.norm.weight", "U32", r"tensor 'model.norm.weight' is U32, the model's other tensors are F32"),
        (f"{Q0}.base.scale", "I16", rf"tensor '{Q0}.base.scale' is I16, the layout says F16"),
        (f"{GROUP0}.V", "I16", rf"tensor '{GROUP0}.V' is I16, the layout says F16"),
        (f"{Q0}.U", "BF16", rf"tensor '{Q0}.U' is BF16, the layout says F16"),
        ("lm_head.base.codes", "U8", r"tensor 'lm_head.base.codes' is U8, the layout says I8"),
        (f"{Q0}.base.codes", "I8", rf"tensor '{Q0}.base.codes' is I8, the layout says U8"),
    ],
)
def test_equal_width_dtype_swap(out, tensor, dtype, expected):
    _edit_header(_weights(out), lambda h: h[tensor].update(dtype=dtype))
    _refused(out / "safetensors", expected)


def test_shared_reference_to_another_group(out):
    _edit_layout(_weights(out), lambda m: m["linears"][Q0]["lowrank"].update(shared=GROUP1))
    _refused(out / "safetensors", rf"{Q0} refers to shared group {GROUP1}, which does not list it as a member")


def test_group_member_whose_v_is_another(out):
    def change(meta):
        meta["shared"][GROUP1]["members"].append(Q0)

    _edit_layout(_weights(out), change)
    _refused(out / "safetensors", rf"shared group {GROUP1} lists {Q0}, whose V is not the group's")


def _rank_everywhere(meta):
    """Rank 5 for the group and every member: consistent, but not what U holds."""
    meta["shared"][GROUP0]["rank"] = 5
    for member in meta["shared"][GROUP0]["members"]:
        meta["linears"][member]["lowrank"]["rank"] = 5


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda m: m["linears"][Q0]["lowrank"].update(rank=5), rf"{Q0} \(rank 5, in 64\) does not fit its shared group {GROUP0} \(rank 4, in 64\)"),
        (_rank_everywhere, rf"tensor '{Q0}.U' has shape \(64, 4\), the layout says \(64, 5\)"),
        (lambda m: m["linears"][Q0]["base"].update(bits=3), r"has bits = 3, not one of \(4, 8\)"),
        (lambda m: m["linears"][Q0]["base"].update(group_size=48), r"group_size = 48, which is not one of \(32, 64, 128\) dividing 64"),
        (lambda m: m["linears"][Q0]["base"].update(group_size=64), rf"tensor '{Q0}.base.scale' has shape \(64, 2\), the layout says \(64, 1\)"),
        (lambda m: m["linears"][Q0].update(in_features=32), rf"the layout makes {Q0} 64x32, config.json makes it 64x64"),
        (lambda m: m["shared"][GROUP0].update(in_features=32), rf"{Q0} \(rank 4, in 64\) does not fit its shared group {GROUP0} \(rank 4, in 32\)"),
        (lambda m: m.update(tied_embeddings=False), r"tensor 'model.embed_tokens.weight' is missing from the file"),
        (lambda m: m.update(format_version="1"), r"format_version = 1 is not a version number"),
        (lambda m: m.update(table_dtype="int8"), r"table_dtype = int8 is not one of float16, bfloat16"),
        (lambda m: m.update(format_version=2), r"top level is .*, expected the keys .*'shared'\]"),  # table_dtype is new in 3
        (lambda m: m.pop("table_dtype"), r"top level is .*, expected the keys .*'table_dtype'\]"),
        (lambda m: m["linears"].pop(Q0), rf"shared group {GROUP0} lists {Q0}, whose V is not the group's"),
        (lambda m: m["shared"].update({"model.layers.0.self_attn.q_proj": m["shared"].pop(GROUP0)}), r"refers to shared projection"),
    ],
)
def test_layout_inconsistent_with_tensors(out, change, expected):
    _edit_layout(_weights(out), change)
    _refused(out / "safetensors", expected)


def test_group_cannot_replace_a_module(out):
    """A group name is a new module: renamed onto an existing one (with its
    members re-pointed) it would replace part of the model."""

    def change(meta):
        info = meta["shared"].pop(GROUP0)
        meta["shared"]["model.layers.0.input_layernorm"] = info
        for member in info["members"]:
            meta["linears"][member]["lowrank"]["shared"] = "model.layers.0.input_layernorm"

    _edit_layout(_weights(out), change)
    _refused(out / "safetensors", r"shared group name 'model.layers.0.input_layernorm' is not a free module name")


def test_unreferenced_tensor(out):
    """A tensor no slot reads (here: a member's private V beside its shared one)."""
    path = _weights(out)
    with safe_open(str(path), framework="pt") as fh:
        tensors, metadata = {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()
    tensors[f"{Q0}.projection.V"] = torch.zeros(4, 64, dtype=torch.float16)
    save_file(tensors, str(path), metadata=metadata)
    _refused(out / "safetensors", rf"tensor '{Q0}.projection.V' is unexpected")


# ------------------------------------------------------------------ block-sparse bases


def _edit_indices(directory, change):
    path = directory / safetensors_dir.WEIGHTS
    header, body = _read_raw(path)
    entry = header[f"{UP0}.base.indices"]
    begin, end = entry["data_offsets"]
    indices = np.frombuffer(body[begin:end], dtype=np.int32).reshape(entry["shape"]).copy()
    change(indices)
    _write_raw(path, header, body[:begin] + indices.tobytes() + body[end:])


@pytest.mark.parametrize(
    "block_shape, expected",
    [([0, 16], r"block_rows = 0 is not an integer >= 1"), ([1, 0], r"block_cols = 0 is not an integer >= 1"), ([3, 16], r"block shape 3x16 does not tile the 128x64 weight")],
)
def test_block_shape(sparse_dir, block_shape, expected):
    _edit_layout(sparse_dir / safetensors_dir.WEIGHTS, lambda m: m["linears"][UP0]["base"].update(block_shape=block_shape))
    _refused(sparse_dir, expected)


def test_block_density_must_match_the_count(sparse_dir):
    _edit_layout(sparse_dir / safetensors_dir.WEIGHTS, lambda m: m["linears"][UP0]["base"].update(density=0.75))
    _refused(sparse_dir, r"density = 0.75 is not blocks_per_row x block_cols / in = 0.5")


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda a: a.__setitem__((0, 0), 4), r"points outside the matrix"),
        (lambda a: a.__setitem__((0, 1), a[0, 0]), r"is not strictly ascending in every row"),
        (lambda a: a.__setitem__((0, slice(None)), a[0, ::-1].copy()), r"is not strictly ascending in every row"),
    ],
)
def test_block_indices(sparse_dir, change, expected):
    _edit_indices(sparse_dir, change)
    _refused(sparse_dir, rf"tensor '{UP0}.base.indices' {expected}")


# ------------------------------------------------------------------ config.json


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda c: c.update(hidden_size=1 << 40), r"hidden_size = 1099511627776 is not a positive integer the weights can hold"),
        (lambda c: c.update(num_hidden_layers=1 << 30), r"num_hidden_layers = 1073741824 is not a positive integer the weights can hold"),
        (lambda c: c.update(head_dim=1 << 40), r"head_dim = 1099511627776 is not a positive integer"),
        (lambda c: c.update(num_hidden_layers=3), r"num_hidden_layers = 3 but the weights hold layers 0..1"),
        (lambda c: c.update(hidden_size=128), r"\(vocab_size, hidden_size\) = \(128, 128\) but the embedding table is \(128, 64\)"),
        (lambda c: c.update(head_dim=32), rf"the layout makes {Q0} 64x64, config.json makes it 128x64"),
        (lambda c: c.update(intermediate_size=4096), r"makes model.layers.0.mlp.gate_proj 128x64, config.json makes it 4096x64"),
        (lambda c: c.update(num_attention_heads=0), r"num_attention_heads = 0 is not a positive integer"),
        (lambda c: c.update(num_key_value_heads=3), r"num_key_value_heads = 3 does not divide num_attention_heads = 4"),
        (lambda c: c.update(model_type="gpt2"), r"model_type 'gpt2' is not one of llama, mistral, qwen2"),
        (lambda c: c.pop("vocab_size"), r"vocab_size is missing"),
        (lambda c: c.update(model_type={}), r"model_type '\{\}' is not one of"),
        (lambda c: c.update(rms_norm_eps=1 << 64), r"rms_norm_eps = 18446744073709551616 is not a number between 0 and 1"),
        (lambda c: c.update(rms_norm_eps=None), r"rms_norm_eps = None is not a number between 0 and 1"),  # found by the fuzzer
        (lambda c: c.update(pad_token_id=1000), r"config.json is not a valid config \(Padding_idx must be within num_embeddings\)"),
    ],
)
def test_config_checked_against_the_tensors(out, change, expected):
    _edit_config(out, change)
    started = time.perf_counter()
    message = _refused(out / "safetensors", expected)
    assert "config.json" in message
    assert time.perf_counter() - started < 30  # no skeleton of the claimed size was built


@pytest.mark.parametrize("text, expected", [("{broken", r"is not valid JSON"), ("[1, 2]", r"is not a JSON object"), ("\xff", r"is not UTF-8 text")])
def test_config_not_a_json_object(out, text, expected):
    (out / "safetensors" / "config.json").write_bytes(text.encode("latin-1"))
    _refused(out / "safetensors", rf"config.json.*{expected}")


def test_tokenizer_config_broken(out):
    (out / "safetensors" / "tokenizer_config.json").write_bytes(b'{"tokenizer_class": \xff}')
    _refused(out / "safetensors", r"tokenizer_config.json: the file is not UTF-8 text")


# ------------------------------------------------------------------ inspect


def test_inspect_refuses_an_unknown_dtype_table_entry(out):
    _edit_header(_weights(out), lambda h: h["model.norm.weight"].update(dtype="U32"))
    with pytest.raises(FactorportError, match=r"tensor 'model.norm.weight' is U32, the model's other tensors are F32; the file is corrupted; re-export it"):
        inspect_artifact(out)


def test_inspect_refuses_a_zero_block_shape(sparse_dir):
    _edit_layout(sparse_dir / safetensors_dir.WEIGHTS, lambda m: m["linears"][UP0]["base"].update(block_shape=[0, 16]))
    with pytest.raises(FactorportError, match=r"block_rows = 0 is not an integer >= 1"):
        inspect_artifact(sparse_dir)


# ------------------------------------------------------------------ model.factorport.gguf


def _native(out):
    return out / "gguf" / "model.factorport.gguf"


def _gguf_edit(path, change):
    """`change(reader)` on a writable memory map of the file (in place)."""
    reader = gguf.GGUFReader(path, "r+")
    change(reader)
    reader.data.flush()
    del reader


def _tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def _set_string(reader, key, text):
    part = reader.fields[key].parts[4]
    data = np.frombuffer(text.encode(), dtype=np.uint8)
    assert data.size == part.size, "in-place edits keep the length"
    part[:] = data


def _edit_native_json(path, key, change):
    def edit(reader):
        value = json.loads(reader.fields[key].contents())
        change(value)
        _set_string(reader, key, json.dumps(value))

    _gguf_edit(path, edit)


def _native_refused(path, pattern):
    with pytest.raises(FactorportError, match=pattern) as info:
        load_native(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "tensor, ggml_type, expected",
    [
        ("model.norm.weight", gguf.GGMLQuantizationType.I32, r"tensor model.norm.weight is stored as I32, factorport.dtypes says float32"),
        (f"{Q0}.base.scale", gguf.GGMLQuantizationType.I16, rf"tensor {Q0}.base.scale is stored as I16, factorport.dtypes says float16"),
    ],
)
def test_native_equal_width_type_swap(out, tensor, ggml_type, expected):
    _gguf_edit(_native(out), lambda r: _tensor(r, tensor).field.parts[4].__setitem__(0, ggml_type))
    _native_refused(_native(out), expected)


def test_native_dtype_record_swap(out):
    """The recorded dtype changed with the stored type (I16 <-> int16): the layout still says F16."""
    path = _native(out)
    _gguf_edit(path, lambda r: _tensor(r, f"{Q0}.base.scale").field.parts[4].__setitem__(0, gguf.GGMLQuantizationType.I16))
    # in place, so the same length: two more spaces after the colon make up for "int16" being shorter
    _edit_native_json_text(path, "factorport.dtypes", f'"{Q0}.base.scale": "float16"', f'"{Q0}.base.scale":   "int16"')
    _native_refused(path, rf"tensor '{Q0}.base.scale' is I16, the layout says F16")


def _edit_native_json_text(path, key, old, new):
    def edit(reader):
        text = reader.fields[key].contents()
        assert old in text and len(old) == len(new)
        _set_string(reader, key, text.replace(old, new))

    _gguf_edit(path, edit)


def test_native_offset_pointing_at_another_tensor(out):
    later, earlier = "model.layers.1.self_attn.q_proj.U", f"{Q0}.U"

    def point(reader):
        _tensor(reader, later).field.parts[5][0] = _tensor(reader, earlier).field.parts[5][0]

    _gguf_edit(_native(out), point)
    _native_refused(_native(out), r"overlap")


def test_native_shared_reference_to_another_group(out):
    _edit_native_json(_native(out), "factorport.layout", lambda m: m["linears"][Q0]["lowrank"].update(shared=GROUP1))
    _native_refused(_native(out), rf"{Q0} refers to shared group {GROUP1}, which does not list it as a member; re-export it")


def test_native_layout_not_json(out):
    def edit(reader):
        text = reader.fields["factorport.layout"].contents()
        _set_string(reader, "factorport.layout", "x" + text[1:])

    _gguf_edit(_native(out), edit)
    _native_refused(_native(out), r"factorport.layout is not valid JSON")


def test_native_layout_not_utf8(out):
    def edit(reader):
        reader.fields["factorport.layout"].parts[4][1] = 0xFF

    _gguf_edit(_native(out), edit)
    # open_gguf (gguf/checks.py) checks every string before this reader does
    _native_refused(_native(out), r"factorport\.layout is not (valid )?UTF-8")


def test_native_config_checked_against_the_tensors(out):
    _edit_native_json_text(_native(out), "factorport.config", '"num_hidden_layers": 2', '"num_hidden_layers": 9')
    _native_refused(_native(out), r"factorport.config: num_hidden_layers = 9 but the weights hold layers 0..1")


# ------------------------------------------------------------------ manifest


def _edit_manifest(out, change):
    path = out / manifest.MANIFEST
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_manifest_records_sizes_and_reads_old_manifests(out):
    written = json.loads((out / manifest.MANIFEST).read_text())
    assert written["sizes"]["safetensors/model.safetensors"] == _weights(out).stat().st_size
    assert set(written["sizes"]) == set(written["files"])
    _edit_manifest(out, lambda m: m.pop("sizes"))  # as written before sizes were recorded
    assert manifest.verify_manifest(out) == []
    (out / "report" / "convert.json").write_text("{ }\n")
    assert manifest.verify_manifest(out) == ["report/convert.json: sha256 differs from the manifest"]


@pytest.mark.parametrize(
    "files, expected",
    [
        ([], "manifest.json: 'files' is not a non-empty map of file -> sha256; the manifest is damaged, re-convert the artifact"),
        ({}, "manifest.json: 'files' is not a non-empty map of file -> sha256; the manifest is damaged, re-convert the artifact"),
        ({"safetensors/model.safetensors": 1}, "manifest.json: 'files' is not a non-empty map of file -> sha256; the manifest is damaged, re-convert the artifact"),
    ],
)
def test_manifest_files_malformed(out, files, expected):
    _edit_manifest(out, lambda m: m.update(files=files))
    assert manifest.verify_manifest(out) == [expected]


def test_manifest_must_cover_every_file(out):
    def drop(m):
        del m["files"]["gguf/model.factorport.gguf"], m["sizes"]["gguf/model.factorport.gguf"]

    _edit_manifest(out, drop)
    (out / "onnx").mkdir()
    (out / "onnx" / "model.onnx").write_bytes(b"added later")
    (out / "report" / "validation.md").write_text("measurements are not hashed\n")
    assert manifest.verify_manifest(out) == [
        "gguf/model.factorport.gguf: not in the manifest (added after it was written); remove it or re-convert the artifact",
        "onnx/model.onnx: not in the manifest (added after it was written); remove it or re-convert the artifact",
    ]


@pytest.mark.parametrize("rel", ["../../etc/passwd", "safetensors/../../x", "/etc/passwd", "./safetensors/config.json", ""])
def test_manifest_paths_stay_inside(out, rel):
    def add(m):
        m["files"][rel] = "0" * 64
        m["sizes"][rel] = 1

    _edit_manifest(out, add)
    assert manifest.verify_manifest(out) == [f"{rel!r}: not a relative path inside the artifact; the manifest was altered, re-convert the artifact"]


def test_manifest_absolute_path_to_a_huge_file_is_not_hashed(out, tmp_path):
    huge = tmp_path / "huge.bin"
    with open(huge, "wb") as fh:
        fh.truncate(1 << 40)  # sparse: hashing it would read 1 TB
    _edit_manifest(out, lambda m: (m["files"].update({str(huge): "0" * 64}), m["sizes"].update({str(huge): 1 << 40})))
    started = time.perf_counter()
    problems = manifest.verify_manifest(out)
    assert time.perf_counter() - started < 10
    assert problems == [f"{str(huge)!r}: not a relative path inside the artifact; the manifest was altered, re-convert the artifact"]


def test_manifest_size_checked_before_hashing(out):
    path = out / "report" / "convert.json"
    recorded = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(1 << 40)
    started = time.perf_counter()
    assert manifest.verify_manifest(out) == [f"report/convert.json: {1 << 40} bytes, the manifest says {recorded}"]
    assert time.perf_counter() - started < 10


def test_manifest_names_a_truncated_file(out):
    path = _weights(out)
    recorded = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-64])
    assert manifest.verify_manifest(out) == [f"safetensors/model.safetensors: truncated, {recorded - 64} bytes, the manifest says {recorded}"]


def test_manifest_link_leaving_the_directory(out, tmp_path):
    outside = tmp_path / "convert.json"
    shutil.copy(out / "report" / "convert.json", outside)
    os.unlink(out / "report" / "convert.json")
    os.symlink(outside, out / "report" / "convert.json")
    assert manifest.verify_manifest(out) == ["report/convert.json: a link leaving the artifact directory; replace it by the file, or re-convert the artifact"]


@pytest.mark.parametrize("text, expected", [(b"[]", "is not a JSON object"), (b"\xff{}", "is not UTF-8 text"), (b"{", "is not valid JSON")])
def test_manifest_unreadable(out, text, expected):
    (out / manifest.MANIFEST).write_bytes(text)
    with pytest.raises(FactorportError, match=rf"manifest.json {expected}( \(.*\))?; re-convert the artifact"):
        manifest.verify_manifest(out)
