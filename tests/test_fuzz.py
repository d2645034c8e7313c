"""The fuzzer (factorport.fuzz): the harness classifies a child's end
correctly (a segfault is a crash, a sleep a hang, an 8 GB allocation a
memory failure, a KeyError a traceback), a crashing reader is counted as
one, mutators are deterministic for a seed, and a bounded campaign over
every reader of a tiny artifact finds no crash, hang, memory failure,
escaping exception or malformed error."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factorport.errors import FactorportError
from factorport.fuzz import campaign, mutators
from factorport.fuzz.harness import ChildOutcome, run_in_child
from factorport.fuzz.readers import READERS, Reader, Target

ROOT = Path(__file__).resolve().parents[1]
# the bounded run: per reader, split over 2 children at a time
CAMPAIGN_MUTANTS = 150
CAMPAIGN_TIMEOUT_S = 20


# --- the harness ---------------------------------------------------------------


def test_a_segfault_is_a_crash():
    outcome = run_in_child(lambda: ctypes.string_at(0), timeout=20)
    assert outcome.kind == "crash" and outcome.detail == "SIGSEGV"


def test_an_abort_is_a_crash_and_its_stderr_is_kept():
    def abort():
        os.write(2, b"native library: assertion failed\n")
        os.abort()

    outcome = run_in_child(abort, timeout=20)
    assert outcome.kind == "crash" and outcome.detail == "SIGABRT"
    assert "assertion failed" in outcome.stderr


def test_an_exit_without_an_answer_is_a_crash():
    outcome = run_in_child(lambda: os._exit(3), timeout=20)
    assert outcome.kind == "crash" and "exit status 3" in outcome.detail


def test_a_sleep_past_the_deadline_is_a_hang_and_is_killed():
    started = time.monotonic()
    outcome = run_in_child(lambda: time.sleep(60), timeout=1)
    assert outcome.kind == "hang"
    assert time.monotonic() - started < 30  # killed at the deadline, not waited for


def test_allocating_8_gb_under_the_4_gb_limit_is_memory():
    outcome = run_in_child(lambda: len(bytearray(8 << 30)), timeout=20, memory_limit=4 << 30)
    assert outcome.kind == "memory", outcome


def test_torch_allocator_failure_is_memory():
    def allocate():
        import torch

        return torch.empty(8 << 30, dtype=torch.uint8).numel()

    outcome = run_in_child(allocate, timeout=20, memory_limit=4 << 30)
    assert outcome.kind == "memory", outcome


def test_an_escaping_key_error_is_a_traceback_with_its_type_and_line():
    def lookup():
        return {}["missing"]

    outcome = run_in_child(lookup, timeout=20)
    assert outcome.kind == "traceback"
    assert outcome.detail.startswith("KeyError: 'missing'") and "test_fuzz.py:" in outcome.detail


def test_a_factorport_error_and_a_result_come_back():
    def refuse():
        raise FactorportError("x/model.gguf is truncated; re-export it")

    refused = run_in_child(refuse, timeout=20)
    assert (refused.kind, refused.detail) == ("error", "x/model.gguf is truncated; re-export it")
    big = run_in_child(lambda: {"digest": "a" * 200_000}, timeout=20)  # more than a pipe holds
    assert big.kind == "ok" and big.value == {"digest": "a" * 200_000}


@pytest.mark.parametrize(
    "message,column",
    [
        ("/a/gguf/model.gguf is truncated; re-export it", "clean error"),
        ("the file is bad; re-export it", "bad error"),  # names no file
        ("/a/gguf/model.gguf is bad\nTraceback (most recent call last):", "bad error"),  # not one line
    ],
)
def test_errors_must_be_one_line_naming_the_file(message, column):
    outcome = ChildOutcome("error", message)
    assert campaign.column_of(READERS["gguf-model"], outcome, "ref", "gguf/model.gguf", b"", b"x") == column


def test_changed_results_are_caught_only_when_the_manifest_names_the_file():
    reader = READERS["safetensors"]
    target = "safetensors/model.safetensors"
    caught = ChildOutcome("ok", value={"digest": "other", "manifest": [f"{target}: sha256 differs from the manifest"]})
    missed = ChildOutcome("ok", value={"digest": "other", "manifest": ["onnx/model.onnx: missing"]})
    same = ChildOutcome("ok", value={"digest": "ref"})
    assert campaign.column_of(reader, caught, "ref", target, b"", b"x") == "caught by manifest"
    assert campaign.column_of(reader, missed, "ref", target, b"", b"x") == "uncaught"
    assert campaign.column_of(reader, same, "ref", target, b"", b"x") == "identical"


# --- a crashing reader is counted --------------------------------------------------

ORIGINAL = json.dumps({"a": 1, "b": [1, 2, 3]}).encode()


def _crash_when_changed(root: Path) -> str:
    if (root / "x.json").read_bytes() != ORIGINAL:
        os.kill(os.getpid(), signal.SIGSEGV)
    return "digest"


def test_a_reader_that_crashes_on_every_mutant_fails_the_campaign(tmp_path):
    (tmp_path / "x.json").write_bytes(ORIGINAL)
    reader = Reader("crashes", (Target("x.json", "json"),), _crash_when_changed, ("x.json",), "test reader")
    tally = campaign.fuzz_reader(reader, [tmp_path], mutants=6, seed=1, timeout=20, out_dir=tmp_path / "saved", progress=False)
    assert tally.counts["crash"] == 6 and tally.failures == 6
    saved = sorted((tmp_path / "saved" / "crashes").iterdir())
    assert len(saved) == 6 and json.loads((saved[0] / "info.json").read_text())["outcome"] == "crash"
    assert (tmp_path / "x.json").read_bytes() == ORIGINAL  # restored after each mutant
    assert "crashes | 6 | 0 | 0 | 0 | 0 | 0 | 6 |" in campaign.format_table([tally])


# --- mutators ------------------------------------------------------------------


def _gguf_bytes(tmp_path) -> bytes:
    import gguf
    import numpy as np

    path = tmp_path / "t.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    writer.add_tensor("w", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def _safetensors_bytes(tmp_path) -> bytes:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(3)}, str(path), metadata={"factorport": json.dumps({"linears": {"a": {"rank": 4}}})})
    return path.read_bytes()


def _onnx_bytes() -> bytes:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "W")
    node = helper.make_node("Gemm", ["X", "W"], ["Y"], name="gemm", transA=0, alpha=1.0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.fixture
def samples(tmp_path):
    return {
        "bytes": bytes(range(256)) * 4,
        "gguf": _gguf_bytes(tmp_path),
        "safetensors": _safetensors_bytes(tmp_path),
        "json": json.dumps({"hidden_size": 64, "layers": [1, 2], "nested": {"k": "v"}}).encode(),
        "onnx": _onnx_bytes(),
    }


@pytest.mark.parametrize("kind", mutators.KINDS)
def test_mutators_are_deterministic_for_a_seed_and_vary_across_seeds(samples, kind):
    data = samples[kind]
    first = [mutators.mutate(kind, data, seed) for seed in range(60)]
    assert first == [mutators.mutate(kind, data, seed) for seed in range(60)]
    assert len({m for m, _ in first}) > 40  # different seeds, (mostly) different mutants
    assert sum(m != data for m, _ in first) >= 55


@pytest.mark.parametrize("kind", mutators.KINDS)
def test_mutators_never_raise_on_their_own_output(samples, kind):
    """Stacked mutations feed a mutator a broken file: it must fall back, not raise."""
    data = samples[kind]
    for seed in range(400):
        mutated, _ = mutators.mutate(kind, data, seed)
        mutators.mutate(kind, mutated, seed + 1)


@pytest.mark.parametrize("kind", ["gguf", "safetensors", "json", "onnx"])
def test_structure_aware_mutators_are_used(samples, kind):
    prefix = {"gguf": "gguf ", "safetensors": "safetensors ", "json": "json ", "onnx": "onnx "}[kind]
    descriptions = [mutators.mutate(kind, samples[kind], seed)[1] for seed in range(100)]
    assert sum(d.startswith(prefix) for d in descriptions) > 40


def test_gguf_field_mutation_rewrites_only_that_field(samples):
    import random

    data = samples["gguf"]
    for seed in range(40):
        mutated, description = mutators.gguf_field(random.Random(seed), data)
        differing = [i for i, (a, b) in enumerate(zip(data, mutated)) if a != b]
        assert len(mutated) == len(data) and 0 < len(differing) <= 8, description
        assert differing[-1] - differing[0] < 8


def test_safetensors_mutants_keep_a_parseable_header(samples):
    import random

    for seed in range(30):
        mutated, description = mutators.safetensors_tensor(random.Random(seed), samples["safetensors"])
        length = int.from_bytes(mutated[:8], "little")
        assert length % 8 == 0 and isinstance(json.loads(mutated[8 : 8 + length]), dict), description


# --- the bounded campaign over every reader ---------------------------------------------


def test_bounded_campaign_finds_no_crash_hang_memory_or_traceback(tmp_path):
    """Each reader of a tiny artifact, CAMPAIGN_MUTANTS mutants: every one ends
    in a clean error, an identical result, or a change the manifest catches."""
    report = tmp_path / "fuzz.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--mutants", str(CAMPAIGN_MUTANTS), "--jobs", "2",
               "--timeout", str(CAMPAIGN_TIMEOUT_S), "--json", str(report), "--out", str(tmp_path / "saved"), "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert report.is_file(), result.stderr[-3000:]
    tallies = [campaign.Tally.from_dict(t) for t in json.loads(report.read_text())]
    assert {t.reader for t in tallies} == set(READERS)
    summary = campaign.format_table(tallies) + "\n" + campaign.format_failures(tallies)
    for tally in tallies:
        assert tally.reference_error is None, summary
        assert tally.mutants == CAMPAIGN_MUTANTS
        # the mutants reach the reader: some are refused, some load (else the fuzzer tests nothing)
        assert tally.counts["clean error"] > 0 and tally.counts["identical"] + tally.counts["caught by manifest"] > 0, summary
    assert all(t.failures == 0 for t in tallies), summary
    assert result.returncode == 0, summary
