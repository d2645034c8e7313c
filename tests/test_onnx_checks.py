"""OUTPUT/onnx is checked completely before onnxruntime sees it: each test
mutates a real export (the ModelProto edited with the onnx API, bytes cut or
flipped, config.json edited) and asserts the one-line refusal; mutants that
crashed onnxruntime natively are opened in a child process, so a crash fails
the test instead of killing pytest. A valid export, with or without external
data, opened from any directory, still gives the same logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from conftest import _build, make_stats
from onnx import TensorProto, helper
from tolerances import network_tolerance

from factorport.converters import apply
from factorport.errors import FactorportError
from factorport.formats.onnx import export
from factorport.formats.onnx.runtime import DecoderSession
from factorport.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "samples" / "recipes"
FIX = "re-export it with 'factorport export OUTPUT --format onnx'"
IDS = [5, 17, 3, 99, 42, 7, 64, 1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A glowq-w4 tiny llama (every contrib operator factorport writes) and its export."""
    model = _build("llama")
    apply(model, load_recipe(str(RECIPES / "glowq-w4.yaml")).steps, make_stats(model), progress=False)
    out = tmp_path_factory.mktemp("export") / "onnx"
    out.mkdir()
    export(model.eval(), None, out, progress=False)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([IDS]), use_cache=False).logits[0].float()
    return model, out, logits


@pytest.fixture
def copy(reference, tmp_path):
    """A fresh copy of the export to mutate."""
    out = tmp_path / "onnx"
    shutil.copytree(reference[1], out)
    return out


def edited(directory: Path, edit) -> Path:
    """Apply `edit(model)` to directory/model.onnx and save it back (external data untouched)."""
    path = directory / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    edit(model)
    onnx.save(model, str(path))
    return directory


def node(model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op)


def set_attribute(target: onnx.NodeProto, name: str, value) -> None:
    kept = [a for a in target.attribute if a.name != name]
    del target.attribute[:]
    target.attribute.extend(kept + [helper.make_attribute(name, value)])


def refusal(directory: Path) -> str:
    with pytest.raises(FactorportError) as caught:
        DecoderSession.open(directory)
    message = str(caught.value)
    assert "\n" not in message
    return message


def with_external_data(directory: Path) -> list[onnx.TensorProto]:
    """Move every initializer to directory/model.onnx_data (Optimum's layout beyond 2 GB)."""
    path = directory / "model.onnx"
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    return [t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL]


def external_entry(tensor: onnx.TensorProto, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    tensor.external_data.add(key=key, value=value)


# --- valid exports ------------------------------------------------------------


def test_valid_export_opens_and_matches_torch(reference):
    model, out, expected = reference
    got = DecoderSession.open(out).logits(torch.tensor(IDS))
    assert (got - expected).abs().max() <= network_tolerance(model.config, len(IDS)) * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_external_data_resolves_against_the_model_directory_not_the_cwd(reference, copy, tmp_path, monkeypatch):
    inline = DecoderSession.open(reference[1]).logits(torch.tensor(IDS))
    assert len(with_external_data(copy)) > 10
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # the bug: onnx's checker given the ModelProto looks for model.onnx_data in the cwd
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(onnx.load(str(copy / "model.onnx"), load_external_data=False))
    assert torch.equal(DecoderSession.open(copy).logits(torch.tensor(IDS)), inline)
    assert torch.equal(DecoderSession.open(os.path.relpath(copy)).logits(torch.tensor(IDS)), inline)


def test_positions_past_the_rotary_table_are_refused(reference):
    session = DecoderSession.open(reference[1])
    limit = reference[0].config.max_position_embeddings
    with pytest.raises(FactorportError, match=f"{limit + 1} positions exceed the model's {limit}"):
        session.logits(torch.zeros(limit + 1, dtype=torch.long))


# --- files that do not parse -------------------------------------------------


def test_missing_model_file(copy):
    (copy / "model.onnx").unlink()
    assert refusal(copy) == f"{copy} has no model.onnx; export one with 'factorport export OUTPUT --format onnx'"


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty", "garbage"])
def test_unparsable_model_file(copy, damage):
    path = copy / "model.onnx"
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped":
        data[0] ^= 0xFF  # the first field's tag: no longer a valid wire type
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"\xff" * 64)
    path.write_bytes(bytes(data))
    message = refusal(copy)
    if damage == "empty":
        assert message == f"{path} is truncated (no graph); {FIX}"
    else:
        assert message == f"{path} is truncated or not an ONNX model (DecodeError); {FIX}"


def test_missing_or_broken_config(copy):
    (copy / "config.json").write_text('{"hidden_size": 64,')
    assert refusal(copy) == f"{copy / 'config.json'} is not valid JSON (JSONDecodeError); {FIX}"
    (copy / "config.json").unlink()
    assert refusal(copy) == f"{copy} has no config.json; {FIX}"


def test_broken_tokenizer_file(copy):
    (copy / "tokenizer_config.json").write_bytes(b"\xff\xfe not json")
    assert refusal(copy) == f"{copy / 'tokenizer_config.json'} is not valid JSON (UnicodeDecodeError); {FIX}"


# --- contrib operators: attributes against config.json and the tensors ---------


def test_group_query_attention_huge_num_heads(copy):
    # onnxruntime divided by num_heads truncated to int (0): SIGFPE
    edited(copy, lambda m: set_attribute(node(m, "GroupQueryAttention"), "num_heads", 1 << 62))
    name = node(onnx.load(str(copy / "model.onnx"), load_external_data=False), "GroupQueryAttention").name
    assert refusal(copy) == (
        f"{copy / 'model.onnx'}: GroupQueryAttention node {name!r}: num_heads is {1 << 62}, not a positive integer; {FIX}"
    )


def test_group_query_attention_heads_must_agree_with_config(copy):
    config = json.loads((copy / "config.json").read_text())
    config.update(num_attention_heads=8, num_key_value_heads=4, head_dim=8)  # consistent with itself, not the graph
    (copy / "config.json").write_text(json.dumps(config))
    assert refusal(copy) == (
        f"{copy / 'model.onnx'}: graph input 'past_key_values.0.key' has shape [None, 2, None, 16], "
        f"not [batch, 4, past, 8] as config.json says; {FIX}"
    )


def test_group_query_attention_width_not_divided_by_heads(copy):
    # num_heads that config.json also says (both edited) but the q projection is 64 wide
    config = json.loads((copy / "config.json").read_text())
    config.update(num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    (copy / "config.json").write_text(json.dumps(config))

    def edit(model):
        for n in model.graph.node:
            if n.op_type in ("GroupQueryAttention", "RotaryEmbedding"):
                set_attribute(n, "num_heads", 2)
    edited(copy, edit)
    message = refusal(copy)
    assert message.startswith(f"{copy / 'model.onnx'}: RotaryEmbedding node ")
    assert message.endswith(f": its input is 64 wide, not num_heads 2 x head_dim 16; {FIX}")


def test_group_query_attention_scale(copy):
    edited(copy, lambda m: set_attribute(node(m, "GroupQueryAttention"), "scale", 0.5))
    assert refusal(copy).endswith(f": scale is 0.5, not 1/sqrt(head_dim) = 0.25; {FIX}")


def test_rotary_interleaved(copy):
    edited(copy, lambda m: set_attribute(node(m, "RotaryEmbedding"), "interleaved", 1))
    assert refusal(copy).endswith(": interleaved is set; factorport writes rotary in halves (interleaved 0); " + FIX)


def test_matmulnbits_attributes_must_match_its_initializers(copy):
    def edit(model):
        target = node(model, "MatMulNBits")
        set_attribute(target, "N", 2 * next(a.i for a in target.attribute if a.name == "N"))
    edited(copy, edit)
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    target = node(model, "MatMulNBits")
    blob = next(t for t in model.graph.initializer if t.name == target.input[1])
    n = next(a.i for a in target.attribute if a.name == "N")
    assert refusal(copy) == (
        f"{copy / 'model.onnx'}: MatMulNBits node {target.name!r}: its weight {blob.name!r} has shape {list(blob.dims)}, "
        f"attributes say {[n, blob.dims[1], blob.dims[2]]}; {FIX}"
    )


@pytest.mark.parametrize("name,value,expected", [
    ("bits", 2, "bits is 2; factorport writes 4 or 8"),
    ("block_size", 0, "block_size is 0, not a positive integer"),
    ("block_size", 48, "block_size is 48; it must be a power of two, at least 16"),
    ("accuracy_level", 9, "accuracy_level is 9, not 0..4"),
    ("g_idx", 1, "has attribute 'g_idx', which factorport never writes"),
])
def test_matmulnbits_bad_attribute(copy, name, value, expected):
    edited(copy, lambda m: set_attribute(node(m, "MatMulNBits"), name, value))
    assert refusal(copy).endswith(f"{expected}; {FIX}")


def test_gatherblockquantized_block_size(copy):
    edited(copy, lambda m: set_attribute(node(m, "GatherBlockQuantized"), "block_size", 16))
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    target = node(model, "GatherBlockQuantized")
    scales = next(t for t in model.graph.initializer if t.name == target.input[2])
    assert refusal(copy).endswith(f"its scales {scales.name!r} has shape {list(scales.dims)}, attributes say [128, 4]; {FIX}")


def test_a_shared_table_must_reshape_to_the_table(tmp_path):
    """The tied int4 table read through Reshape of the lm_head's codes: a
    Reshape to another shape would make GatherBlockQuantized read past it."""
    model = _build("llama")
    apply(model, load_recipe(str(RECIPES / "w4-gptq-tied4.yaml")).steps, make_stats(model), progress=False)
    out = tmp_path / "onnx"
    out.mkdir()
    export(model.eval(), None, out, progress=False)
    DecoderSession.open(out)  # as written: accepted
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    gather = node(graph, "GatherBlockQuantized")
    shape_name = next(n for n in graph.graph.node if n.output[0] == gather.input[0]).input[1]

    def wider(m):
        target = next(t for t in m.graph.initializer if t.name == shape_name)
        values = onnx.numpy_helper.to_array(target).copy()
        values[1] *= 2
        target.CopyFrom(onnx.numpy_helper.from_array(values, shape_name))

    edited(out, wider)
    assert "is not a Reshape to" in refusal(out)


# --- operators and domains ---------------------------------------------------


def test_unknown_operator(copy):
    edited(copy, lambda m: setattr(node(m, "Sigmoid"), "op_type", "Elu"))
    model = onnx.load(str(copy / "model.onnx"), load_external_data=False)
    assert refusal(copy) == f"{copy / 'model.onnx'}: node {node(model, 'Elu').name!r} is operator ai.onnx.Elu, which factorport never writes; {FIX}"


def test_unknown_domain(copy):
    edited(copy, lambda m: m.opset_import.append(helper.make_opsetid("com.example", 1)))
    assert refusal(copy) == f"{copy / 'model.onnx'}: the model imports operator domain 'com.example', which factorport never writes; {FIX}"


# --- stored tensors ----------------------------------------------------------


def test_initializer_dims_must_match_its_bytes(copy):
    changed = []

    def edit(model):
        tensor = next(t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) == 2)
        tensor.dims[0] += 1
        changed.append((tensor.name, list(tensor.dims), len(tensor.raw_data)))
    edited(copy, edit)
    name, dims, stored = changed[0]
    assert refusal(copy) == (
        f"{copy / 'model.onnx'}: tensor {name!r} (initializer) stores {stored} bytes for dims {dims} "
        f"({dims[0] * dims[1] * 4} expected); {FIX}"
    )


def test_external_location_equal_to_the_model_file(copy):
    tensors = with_external_data(copy)
    first = tensors[0].name

    def edit(model):
        external_entry(next(t for t in model.graph.initializer if t.name == first), "location", "model.onnx")
    edited(copy, edit)
    assert refusal(copy) == (
        f"{copy / 'model.onnx'}: tensor {first!r} has external data at 'model.onnx', outside the directory's data files "
        f"(only plain file names beside model.onnx are read); refusing to read it; {FIX}"
    )


@pytest.mark.parametrize("location", ["sub/model.onnx_data", "../model.onnx_data", "/etc/passwd", "config.json", ""])
def test_external_location_must_be_a_plain_data_file_name(copy, location):
    tensors = with_external_data(copy)
    first = tensors[0].name
    edited(copy, lambda m: external_entry(next(t for t in m.graph.initializer if t.name == first), "location", location))
    assert f"tensor {first!r} has external data at {location!r}, outside the directory's data files" in refusal(copy)


def test_external_location_that_is_not_utf8(copy):
    """Found by the fuzzer: protobuf hands an undecodable location over as bytes."""
    with_external_data(copy)
    path = copy / "model.onnx"
    data = path.read_bytes()
    assert b"model.onnx_data" in data
    path.write_bytes(data.replace(b"model.onnx_data", b"model.onnx\xff\xff\xff\x7fa", 1))
    assert "has external data at b'model.onnx\\xff\\xff\\xff\\x7fa', outside the directory's data files" in refusal(copy)


def test_external_ranges_inside_the_file_and_not_overlapping(copy):
    tensors = with_external_data(copy)
    size = (copy / "model.onnx_data").stat().st_size
    last = max(tensors, key=lambda t: int({e.key: e.value for e in t.external_data}["offset"]))
    first = min(tensors, key=lambda t: int({e.key: e.value for e in t.external_data}["offset"]))
    length = int({e.key: e.value for e in last.external_data}["length"])
    edited(copy, lambda m: external_entry(next(t for t in m.graph.initializer if t.name == last.name), "offset", str(size)))
    assert refusal(copy) == (
        f"{copy / 'model.onnx_data'} is truncated (tensor {last.name!r} ends at byte {size + length} of {size}); {FIX}"
    )
    edited(copy, lambda m: external_entry(next(t for t in m.graph.initializer if t.name == last.name), "offset", "0"))
    # both now start at byte 0; which one the message names first depends on their lengths
    assert refusal(copy) in {
        f"{copy / 'model.onnx_data'}: tensors {a!r} and {b!r} overlap (byte 0); {FIX}"
        for a, b in ((first.name, last.name), (last.name, first.name))
    }


@pytest.mark.parametrize("value", ["-1", "1e3", "0x10", "١٢"])
def test_external_offset_must_be_a_decimal_integer(copy, value):
    tensors = with_external_data(copy)
    first = tensors[0].name
    edited(copy, lambda m: external_entry(next(t for t in m.graph.initializer if t.name == first), "offset", value))
    assert refusal(copy) == (
        f"{copy / 'model.onnx'}: tensor {first!r} (initializer) has external-data offset {value!r}, not a non-negative integer; {FIX}"
    )


def test_truncated_external_data_file(copy):
    with_external_data(copy)
    data = copy / "model.onnx_data"
    data.write_bytes(data.read_bytes()[:-4])
    assert "is truncated (tensor" in refusal(copy)
    data.unlink()
    assert "external data file model.onnx_data of tensor" in refusal(copy)


# --- graph interface ---------------------------------------------------------


def test_cache_input_with_symbolic_heads(copy):
    def edit(model):
        dim = model.graph.input[3].type.tensor_type.shape.dim[1]
        dim.dim_param = "heads"
    edited(copy, edit)
    assert refusal(copy) == (
        f"{copy / 'model.onnx'}: graph input 'past_key_values.0.key' has shape [None, None, None, 16], "
        f"not [batch, 2, past, 16] as config.json says; {FIX}"
    )


# --- mutants that crashed onnxruntime: opened in a child process ---------------

CHILD = """
import sys
from factorport.errors import FactorportError
from factorport.formats.onnx.runtime import DecoderSession
for directory in sys.argv[1:]:
    try:
        DecoderSession.open(directory).logits([1, 2, 3])
        print("ran", directory)
    except FactorportError as exc:
        print("refused", directory)
"""


def _model_onnx_as_data(directory: Path) -> None:
    first = with_external_data(directory)[0].name
    edited(directory, lambda m: external_entry(next(t for t in m.graph.initializer if t.name == first), "location", "model.onnx"))


def test_crashing_mutants_are_refused_in_a_child_process(reference, tmp_path):
    # unchecked, onnxruntime 1.32 dies of SIGFPE on the first three and runs the
    # last two with garbage (a zero-head rotary; weights read from model.onnx)
    mutations = {
        "gqa-heads-2^62": lambda d: edited(d, lambda m: set_attribute(node(m, "GroupQueryAttention"), "num_heads", 1 << 62)),
        "gqa-heads-2^32": lambda d: edited(d, lambda m: set_attribute(node(m, "GroupQueryAttention"), "num_heads", 1 << 32)),
        "gqa-kv-heads-2^32": lambda d: edited(d, lambda m: set_attribute(node(m, "GroupQueryAttention"), "kv_num_heads", 1 << 32)),
        "rotary-heads-0": lambda d: edited(d, lambda m: set_attribute(node(m, "RotaryEmbedding"), "num_heads", 0)),
        "model-onnx-as-data": _model_onnx_as_data,
    }
    directories = []
    for label, mutate in mutations.items():
        directory = tmp_path / label
        shutil.copytree(reference[1], directory)
        mutate(directory)
        directories.append(str(directory))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    child = subprocess.run([sys.executable, "-c", CHILD, *directories], capture_output=True, text=True, env=env, timeout=300)
    assert child.returncode == 0, f"child died with {child.returncode}: {child.stderr[-500:]}"
    assert child.stdout.split("\n")[:-1] == [f"refused {d}" for d in directories]


# --- tokenizer files ---------------------------------------------------------


def save_tiny_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary, saved as an export saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(127)} | {"<unk>": 127}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(directory)


def test_tokenizer_of_the_wrong_shape_is_one_line(copy):
    from factorport.validators.backends.onnxruntime_backend import OnnxruntimeBackend

    save_tiny_tokenizer(copy)
    assert OnnxruntimeBackend.open(copy).tokenize("w5 w17 w3") == [5, 17, 3]
    (copy / "tokenizer.json").write_text('{"model": {"type": "WordLevel", "vocab": 7}}')  # JSON, not a tokenizer
    with pytest.raises(FactorportError) as caught:
        OnnxruntimeBackend.open(copy)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{copy}: the tokenizer files do not load (") and message.endswith("); re-export it")
