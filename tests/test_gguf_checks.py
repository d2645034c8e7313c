"""The checks every GGUF file passes before gguf's reader or llama.cpp sees
it: each finding of the fuzz campaign as a regression test that edits the
bytes of a freshly exported file and expects one exact FactorportError line
naming the file and the tensor or key. A valid file still loads and runs,
with the same logits as llama.cpp without the checks. Where llama.cpp itself
must load a mutant, it does so in a child process, so that a crash fails
the test instead of killing pytest."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from factorport.converters import apply
from factorport.errors import FactorportError
from factorport.formats.gguf import ADAPTER_FILE, MODEL_FILE, export
from factorport.formats.gguf.checks import check_adapter, check_model, open_gguf
from factorport.recipe import parse_recipe
from factorport.validators.backends.llamacpp_backend import LlamaCppBackend

RECIPE = """
name: t
steps:
  - quantize: {targets: [linears], bits: 4, group_size: 32, symmetric: false}
  - correct: {targets: [linears], shared: false, ranks: {rank: 4}}
"""
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------ a test-side map of a GGUF file
# Written independently of factorport's parser: where each field lies, so that
# a test can overwrite exactly one of them.


@dataclass
class Field:
    type_at: int  # offset of the value type
    value_at: int  # offset of the value (of an array: its element type)
    type: int


@dataclass
class Info:
    name_at: int  # offset of the name length
    dims_at: int
    type_at: int
    offset_at: int


@dataclass
class FileMap:
    fields: dict[str, Field] = field(default_factory=dict)
    tensors: dict[str, Info] = field(default_factory=dict)


def _skip_value(data: bytes, pos: int, value_type: int) -> int:
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    if value_type == 8:
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]
    if value_type == 9:
        item, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if item == 8:
            for _ in range(count):
                pos = _skip_value(data, pos, 8)
            return pos
        return pos + count * fixed[item]
    return pos + fixed[value_type]


def file_map(path: Path) -> FileMap:
    data = path.read_bytes()
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos, result = 24, FileMap()
    for _ in range(n_kv):
        length = struct.unpack_from("<Q", data, pos)[0]
        key = data[pos + 8 : pos + 8 + length].decode()
        pos += 8 + length
        value_type = struct.unpack_from("<I", data, pos)[0]
        result.fields[key] = Field(pos, pos + 4, value_type)
        pos = _skip_value(data, pos + 4, value_type)
    for _ in range(n_tensors):
        name_at = pos
        length = struct.unpack_from("<Q", data, pos)[0]
        name = data[pos + 8 : pos + 8 + length].decode()
        pos += 8 + length
        n_dims = struct.unpack_from("<I", data, pos)[0]
        dims_at = pos + 4
        pos = dims_at + 8 * n_dims
        result.tensors[name] = Info(name_at, dims_at, pos, pos + 4)
        pos += 4 + 8
    return result


def poke(path: Path, at: int, fmt: str, *values) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at, *values)
    path.write_bytes(bytes(data))


def rename(path: Path, old: str, new: str, tensor: bool = True) -> None:
    """Replace a tensor name (or a key) by another of the same length."""
    assert len(old) == len(new)
    where = file_map(path)
    at = where.tensors[old].name_at if tensor else where.fields[old].type_at - 8 - len(old)
    poke(path, at + 8, f"{len(new)}s", new.encode())


# ------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny tied llama with its LoRA adapter, exported once; tests copy it."""
    import conftest

    model = conftest._build("llama")
    apply(model, parse_recipe(RECIPE).steps, conftest.make_stats(model), progress=False)
    out = tmp_path_factory.mktemp("artifact")
    export(model, None, out, progress=False)
    return out


@pytest.fixture
def out(artifact, tmp_path):
    for name in (MODEL_FILE, ADAPTER_FILE):
        (tmp_path / name).write_bytes((artifact / name).read_bytes())
    return tmp_path


def refused(check, path: Path, *needles: str) -> str:
    """The one-line FactorportError `check()` raises: starts with the file, holds every needle."""
    with pytest.raises(FactorportError) as info:
        check()
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}"), message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def model_refused(out: Path, *needles: str) -> str:
    return refused(lambda: check_model(out / MODEL_FILE), out / MODEL_FILE, *needles)


def adapter_refused(out: Path, *needles: str) -> str:
    model = check_model(out / MODEL_FILE)
    return refused(lambda: check_adapter(model, out / ADAPTER_FILE), out / ADAPTER_FILE, *needles)


# ------------------------------------------------------------ valid files


def test_valid_files_pass_and_llamacpp_logits_are_unchanged(out):
    """The checks pass on what factorport writes and change nothing: the
    backend's logits equal llama.cpp's on the same files loaded directly."""
    import llama_cpp
    import numpy as np

    check_adapter(check_model(out / MODEL_FILE), out / ADAPTER_FILE)
    ids = list(range(1, 25))
    backend = LlamaCppBackend.open(out, threads=1)
    try:
        checked = backend.logits(torch.tensor(ids))
    finally:
        backend.close()
    direct = llama_cpp.Llama(
        model_path=str(out / MODEL_FILE), lora_path=str(out / ADAPTER_FILE), n_ctx=2048, n_batch=512, n_ubatch=512,
        n_threads=1, n_threads_batch=1, logits_all=True, verbose=False,
    )
    try:
        direct.eval(ids)
        reference = torch.from_numpy(np.array(direct.scores[: len(ids)], dtype=np.float32))
    finally:
        direct.close()
    assert torch.equal(checked, reference)


# ------------------------------------------------------------ adapter.gguf (NULL adapter -> segfault)


def test_lora_b_offset_zero_overlapping_another_tensor(out):
    path = out / ADAPTER_FILE
    poke(path, file_map(path).tensors["blk.0.attn_q.weight.lora_b"].offset_at, "<Q", 0)
    adapter_refused(out, "tensor blk.0.attn_q.weight.lora_b (data offset 0) overlaps tensor blk.0.attn_q.weight.lora_a")


def test_offset_near_2_pow_64_does_not_wrap(out):
    path = out / ADAPTER_FILE
    poke(path, file_map(path).tensors["blk.1.ffn_down.weight.lora_a"].offset_at, "<Q", 2**64 - 32)
    adapter_refused(out, f"tensor blk.1.ffn_down.weight.lora_a (", f"at data offset {2**64 - 32}) ends past the end of the file")
    with pytest.raises(FactorportError, match="ends past the end of the file"):
        open_gguf(path)  # the generic reader entry point too


def test_misaligned_offset(out):
    path = out / ADAPTER_FILE
    info = file_map(path).tensors["blk.0.attn_k.weight.lora_b"]
    offset = struct.unpack_from("<Q", path.read_bytes(), info.offset_at)[0]
    poke(path, info.offset_at, "<Q", offset + 4)
    adapter_refused(out, f"tensor blk.0.attn_k.weight.lora_b has data offset {offset + 4}, not a multiple of general.alignment 32")


def test_missing_adapter_type(out):
    rename(out / ADAPTER_FILE, "adapter.type", "adapter.tyqe", tensor=False)
    adapter_refused(out, "key adapter.type is missing")


def test_adapter_type_of_wrong_value_type(out):
    path = out / ADAPTER_FILE
    # adapter.lora.alpha as UINT32 (same 4 bytes): llama.cpp's gguf_get_val_f32 would assert
    poke(path, file_map(path).fields["adapter.lora.alpha"].type_at, "<I", 4)
    adapter_refused(out, "key adapter.lora.alpha is UINT32, llama.cpp needs FLOAT32")


def test_lora_a_without_lora_b(out):
    rename(out / ADAPTER_FILE, "blk.1.attn_v.weight.lora_b", "blk.1.attn_v.weight.lora_x")
    adapter_refused(out, "tensor blk.1.attn_v.weight.lora_a has no lora_b (blk.1.attn_v.weight.lora_b is missing)")


def test_lora_b_without_lora_a(out):
    rename(out / ADAPTER_FILE, "blk.0.ffn_up.weight.lora_a", "blk.0.ffn_up.weight.lora_x")
    adapter_refused(out, "tensor blk.0.ffn_up.weight.lora_x is not a LoRA tensor")


def test_lora_of_a_weight_the_model_lacks(out):
    for part in ("lora_a", "lora_b"):
        rename(out / ADAPTER_FILE, f"blk.0.attn_q.weight.{part}", f"blk.0.attn_z.weight.{part}")
    adapter_refused(out, "tensor blk.0.attn_z.weight.lora_a: the model has no weight matrix blk.0.attn_z.weight")


def test_lora_tensor_types(out):
    path = out / ADAPTER_FILE
    type_at = file_map(path).tensors["blk.1.attn_output.weight.lora_a"].type_at
    assert struct.unpack_from("<I", path.read_bytes(), type_at)[0] == 1  # F16, as the correct step stores U and V
    poke(path, type_at, "<I", 25)  # I16: same bytes, not a LoRA type
    adapter_refused(out, "tensor blk.1.attn_output.weight.lora_a has type I16; LoRA tensors must be F32 or F16")
    poke(path, type_at, "<I", 4)  # Q4_2, removed from ggml
    adapter_refused(out, "tensor blk.1.attn_output.weight.lora_a has unknown ggml type 4")


def test_lora_shape_that_does_not_fit(out):
    path = out / ADAPTER_FILE
    dims_at = file_map(path).tensors["blk.0.ffn_down.weight.lora_a"].dims_at
    poke(path, dims_at, "<qq", 64, 8)  # (r=8, in=64): same bytes as (4, 128), wrong for ffn_down (in=128)
    adapter_refused(out, "tensor blk.0.ffn_down.weight LoRA shapes A[8, 64] B[64, 4] do not fit the weight (64, 128)")


def test_duplicate_tensor_name(out):
    rename(out / ADAPTER_FILE, "blk.0.attn_k.weight.lora_a", "blk.0.attn_q.weight.lora_a")
    adapter_refused(out, "tensor blk.0.attn_q.weight.lora_a appears twice")


def test_duplicate_key(out):
    rename(out / MODEL_FILE, "general.name", "general.type", tensor=False)
    model_refused(out, "key general.type appears twice")


# ------------------------------------------------------------ model.gguf (GGML_ASSERT -> SIGABRT)


@pytest.mark.parametrize(
    "key,fmt,value,needle",
    [
        ("llama.attention.layer_norm_rms_epsilon", "<f", -0.5, "key llama.attention.layer_norm_rms_epsilon is -0.5; llama.cpp needs a finite positive number"),
        ("llama.attention.layer_norm_rms_epsilon", "<f", float("nan"), "key llama.attention.layer_norm_rms_epsilon is nan"),
        ("llama.block_count", "<I", 0, "key llama.block_count is 0; llama.cpp needs 1 to 512"),
        ("llama.block_count", "<I", 2**31 - 1, f"key llama.block_count is {2**31 - 1}; llama.cpp needs 1 to 512"),
        ("llama.block_count", "<I", 3, "tensor blk.2.attn_norm.weight is missing (llama.block_count is 3)"),
        ("llama.block_count", "<I", 1, "tensor blk.1.attn_k.weight belongs to block 1 but llama.block_count is 1"),
        ("llama.context_length", "<I", 0, "key llama.context_length is 0"),
        ("llama.attention.head_count", "<I", 3, "key llama.attention.head_count_kv is 2, which does not divide head_count 3"),
        ("llama.attention.head_count_kv", "<I", 3, "key llama.attention.head_count_kv is 3, which does not divide head_count 4"),
        ("llama.embedding_length", "<I", 32, "key llama.rope.dimension_count is 16; llama.cpp's llama needs the head size 8"),
        ("llama.feed_forward_length", "<I", 96, "tensor blk.0.ffn_down.weight has shape [64, 128], the metadata implies [64, 96]"),
        ("llama.vocab_size", "<I", 100, "key llama.vocab_size is 100 but tokenizer.ggml.tokens holds 128 tokens"),
        ("llama.rope.dimension_count", "<I", 8, "key llama.rope.dimension_count is 8; llama.cpp's llama needs the head size 16"),
    ],
)
def test_hyper_parameters_llamacpp_asserts_on(out, key, fmt, value, needle):
    path = out / MODEL_FILE
    poke(path, file_map(path).fields[key].value_at, fmt, value)
    model_refused(out, needle)


def test_hyper_parameter_of_wrong_type(out):
    path = out / MODEL_FILE
    poke(path, file_map(path).fields["llama.block_count"].type_at, "<I", 5)  # INT32
    model_refused(out, "key llama.block_count is INT32, llama.cpp needs UINT32")


def test_output_norm_of_a_quantized_type(out):
    path = out / MODEL_FILE
    poke(path, file_map(path).tensors["output_norm.weight"].type_at, "<I", 8)  # Q8_0 (the last tensor: ranges still fit)
    model_refused(out, "tensor output_norm.weight has type Q8_0; a norm must be F32")


def test_norm_and_weight_types(out):
    path = out / MODEL_FILE
    where = file_map(path)
    poke(path, where.tensors["blk.0.attn_norm.weight"].type_at, "<I", 26)  # I32, same bytes as F32
    model_refused(out, "tensor blk.0.attn_norm.weight has type I32; a norm must be F32")
    poke(path, where.tensors["blk.0.attn_norm.weight"].type_at, "<I", 0)
    poke(path, where.tensors["token_embd.weight"].type_at, "<I", 30)  # F16 -> BF16: same bytes, a weight type
    check_model(path)
    poke(path, where.tensors["token_embd.weight"].type_at, "<I", 25)  # I16: same bytes, not a weight type
    model_refused(out, "tensor token_embd.weight has type I16; a weight must be a ggml weight type")


def test_unknown_hyper_parameter_key(out):
    rename(out / MODEL_FILE, "llama.vocab_size", "llama.expert_cnt", tensor=False)
    model_refused(out, "key llama.expert_cnt is not a hyper-parameter factorport writes")


def test_duplicate_token_text(out):
    path = out / MODEL_FILE
    at = file_map(path).fields["tokenizer.ggml.tokens"].value_at + 12  # element type, count, then token 0
    data = path.read_bytes()
    first_len = struct.unpack_from("<Q", data, at)[0]
    second_at = at + 8 + first_len
    assert struct.unpack_from("<Q", data, second_at)[0] == first_len
    poke(path, second_at + 8, f"{first_len}s", data[at + 8 : at + 8 + first_len])
    model_refused(out, "key tokenizer.ggml.tokens: token 1 repeats token 0")


# ------------------------------------------------------------ bounded structure (gguf's reader would allocate)


def test_huge_array_count_is_refused_before_gguf_reader(out):
    path = out / MODEL_FILE
    where = file_map(path).fields["tokenizer.ggml.merges"]
    poke(path, where.value_at + 4, "<Q", 2**40)
    refused(lambda: open_gguf(path), path, "key tokenizer.ggml.merges claims 1099511627776 elements, more than the")


def test_nested_array_is_refused(out):
    path = out / MODEL_FILE
    poke(path, file_map(path).fields["tokenizer.ggml.merges"].value_at, "<I", 9)  # element type ARRAY
    refused(lambda: open_gguf(path), path, "key tokenizer.ggml.merges is an array of arrays")


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda p, m: poke(p, 0, "4s", b"GGUG"), "is not a GGUF file"),
        (lambda p, m: poke(p, 4, "<I", 4), "GGUF version 4 is not supported"),
        (lambda p, m: poke(p, 8, "<Q", 2**62), "the header claims 4611686018427387904 tensors"),
        (lambda p, m: poke(p, 16, "<Q", 2**62), "the header claims 4611686018427387904 key/values"),
        (lambda p, m: poke(p, m.fields["general.name"].type_at, "<I", 13), "key general.name has unknown value type 13"),
        (lambda p, m: poke(p, m.fields["general.name"].value_at, "<Q", 2**63), "the value of key general.name (9223372036854775808 bytes)"),
        (lambda p, m: poke(p, m.tensors["blk.0.ffn_up.weight"].dims_at - 4, "<I", 5), "tensor blk.0.ffn_up.weight has 5 dimensions"),
        (lambda p, m: poke(p, m.tensors["blk.0.ffn_up.weight"].dims_at, "<q", 0), "tensor blk.0.ffn_up.weight has dimensions [0, 128]"),
        (lambda p, m: poke(p, m.tensors["blk.0.ffn_up.weight"].dims_at + 8, "<q", 2**40), "tensor blk.0.ffn_up.weight (43980465111040 bytes at data offset"),
        (lambda p, m: poke(p, m.tensors["blk.0.ffn_up.weight"].dims_at, "<q", 48), "tensor blk.0.ffn_up.weight of type Q4_1 has rows of 48 values, not a multiple of its block size 32"),
        (lambda p, m: poke(p, m.tensors["blk.0.ffn_up.weight"].name_at, "<Q", 2**40), "the name of tensor"),
    ],
)
def test_structural_faults(out, edit, needle):
    path = out / MODEL_FILE
    edit(path, file_map(path))
    refused(lambda: open_gguf(path), path, needle)


def test_element_count_overflow(out):
    path = out / MODEL_FILE
    poke(path, file_map(path).tensors["blk.0.ffn_up.weight"].dims_at, "<qq", 2**32, 2**32)
    refused(lambda: open_gguf(path), path, "tensor blk.0.ffn_up.weight has dimensions [4294967296, 4294967296], 18446744073709551616 elements overflow int64")


def test_truncated_files(out):
    data = (out / MODEL_FILE).read_bytes()
    (out / MODEL_FILE).write_bytes(data[:-1])
    model_refused(out, "ends past the end of the file (truncated")
    (out / MODEL_FILE).write_bytes(data[:20])
    model_refused(out, "is truncated (20 bytes")


# ------------------------------------------------------------ llama.cpp itself, in a child process


def run_child(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter: a native crash shows as a signal here, not a dead pytest."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


CHILD = """
import struct, sys
from pathlib import Path
from factorport.errors import FactorportError
from factorport.validators.backends.llamacpp_backend import LlamaCppBackend
import torch
out = Path(sys.argv[1] if len(sys.argv) > 1 else {out!r})
try:
    backend = LlamaCppBackend.open(out, threads=1)
    backend.logits(torch.arange(1, 9))
    print("LOADED")
except FactorportError as exc:
    print("ERROR", exc)
"""


def _lora_b_offset_zero(out):
    path = out / ADAPTER_FILE
    poke(path, file_map(path).tensors["blk.0.attn_q.weight.lora_b"].offset_at, "<Q", 0)


def _negative_epsilon(out):
    path = out / MODEL_FILE
    poke(path, file_map(path).fields["llama.attention.layer_norm_rms_epsilon"].value_at, "<f", -0.5)


def _quantized_output_norm(out):
    path = out / MODEL_FILE
    poke(path, file_map(path).tensors["output_norm.weight"].type_at, "<I", 8)


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (_lora_b_offset_zero, "overlaps tensor blk.0.attn_q.weight.lora_a"),
        (_negative_epsilon, "layer_norm_rms_epsilon is -0.5"),
        (_quantized_output_norm, "tensor output_norm.weight has type Q8_0"),
    ],
)
def test_mutants_never_reach_llamacpp(out, mutate, needle):
    """Crashing mutants of the fuzz campaign, opened for real in a child: one error line, no signal."""
    mutate(out)
    result = run_child(CHILD.format(out=str(out)))
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "ERROR" in result.stdout and needle in result.stdout, result.stdout


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "phi3", "gemma3_text"])
def test_other_architectures_pass(make_model, stats_for, tmp_path, arch):
    """Untied output (mistral), q/k/v biases (qwen2), q/k norms and a head size
    apart from the width (qwen3), fused q/k/v and gate/up (phi3), norms
    around attention and MLP and sliding layers (gemma3): what factorport
    writes passes."""
    model = make_model(arch)
    apply(model, parse_recipe(RECIPE).steps, stats_for(model), progress=False)
    export(model, None, tmp_path, progress=False)
    reader = check_model(tmp_path / MODEL_FILE)
    particular = {"mistral": "output.weight", "qwen2": "blk.0.attn_q.bias", "qwen3": "blk.0.attn_q_norm.weight", "phi3": "blk.0.attn_qkv.weight", "gemma3_text": "blk.0.post_ffw_norm.weight"}[arch]
    assert particular in {t.name for t in reader.tensors}
    check_adapter(reader, tmp_path / ADAPTER_FILE)


def test_a_phi3_name_needs_the_phi3_tokens(make_model, tmp_path):
    """A general.name saying Phi-3 makes llama.cpp look up </s>, <unk>, <s> and
    <|endoftext|> by text, and fail the load if one is absent (an unnamed
    model is not named after its family for that reason)."""
    model = make_model("phi3")
    (tmp_path / "unnamed").mkdir()
    (tmp_path / "named").mkdir()
    export(model, None, tmp_path / "unnamed", progress=False)
    check_model(tmp_path / "unnamed" / MODEL_FILE)
    model.config._name_or_path = "microsoft/Phi-3-mini-4k-instruct"
    with pytest.raises(FactorportError, match=r"Phi-3 tokens \['</s>', '<unk>', '<s>', '<\|endoftext\|>'\]"):
        export(model, None, tmp_path / "named", progress=False)  # no tokenizer: placeholder tokens
        check_model(tmp_path / "named" / MODEL_FILE)


def test_the_embedded_sample_passes():
    """The SmolLM2 GGUF whose tokenizer keys factorport copies passes the model checks."""
    from factorport.loading import embedded_gguf

    check_model(embedded_gguf())


def test_adapter_llamacpp_refuses_is_caught_after_loading(out):
    """If llama.cpp refuses an adapter that passed the checks, llama-cpp-python
    keeps its NULL pointer: the backend must notice and raise, not crash at
    the first evaluation. The pre-check is bypassed to reach that path."""
    path = out / ADAPTER_FILE
    poke(path, file_map(path).tensors["blk.0.attn_q.weight.lora_b"].offset_at, "<Q", 0)
    code = CHILD.format(out=str(out)).replace(
        "from factorport.validators.backends.llamacpp_backend import LlamaCppBackend",
        "import factorport.formats.gguf.checks as checks\n"
        "checks.check_adapter = lambda model, path: None  # let llama.cpp see the bad adapter\n"
        "from factorport.validators.backends.llamacpp_backend import LlamaCppBackend",
    )
    result = run_child(code)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert f"ERROR llama.cpp refused the LoRA adapter {path}" in result.stdout, result.stdout


CORRECTED = """
name: tiny-glowq
calibration: {samples: 4, seq_len: 64}
steps:
  - quantize: {targets: [linears], method: rtn, bits: 4, group_size: 32, symmetric: true}
  - correct: {targets: [linears], shared: true, ranks: {rank: 8}}
"""


def test_zero_offset_lora_b_fails_eval_generate_and_validate_in_one_line(tmp_path):
    """The issue's example, through the command line with the manifest
    refreshed (so the file checks, not the hashes, must catch it): each
    command exits non-zero with one line naming the tensor, and validate
    still writes every report with onnxruntime's results."""
    import factorport
    from factorport.formats.manifest import refresh_manifest
    from tiny_outputs import TEXT, tiny_output

    out = tiny_output(tmp_path, CORRECTED, native=False)
    factorport.export(out, ["onnx", "gguf"], progress=False)
    path = out / "gguf" / ADAPTER_FILE
    poke(path, file_map(path).tensors["blk.0.attn_q.weight.lora_b"].offset_at, "<Q", 0)
    refresh_manifest(out)
    text = ["--text", str(TEXT), "--windows", "1"]
    commands = {
        "eval": ["eval", str(out), "--backend", "llama.cpp", "--no-reference", *text],
        "generate": ["generate", str(out), "--backend", "llama.cpp", "--prompt", "The game", "--new-tokens", "4"],
        "validate": ["validate", str(out), "--backend", "onnxruntime,llama.cpp", "--junit", str(tmp_path / "junit.xml"), *text],
    }
    for name, args in commands.items():
        done = subprocess.run([sys.executable, "-m", "factorport.cli", *args], capture_output=True, text=True, timeout=600)
        assert done.returncode != 0, (name, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, (name, done.stderr)
        named = [line for line in done.stderr.splitlines() if "blk.0.attn_q.weight.lora_b" in line]
        assert len(named) == 1 and named[0].startswith("factorport: "), (name, done.stderr)
    validation = (out / "report" / "validation.json").read_text()
    assert "blk.0.attn_q.weight.lora_b" in validation
    result = json.loads(validation)
    assert result["backends"]["onnxruntime"]["passed"] and not result["backends"]["llama.cpp"]["passed"]
    assert (out / "report" / "validation.md").is_file() and "llama.cpp" in (tmp_path / "junit.xml").read_text()
