"""Native runtimes run in a child process: a crash (a real SIGSEGV) or a hang
there is one FactorportError line in the parent, validate reports it as that
backend's failed check beside the others, eval/generate exit non-zero.

The test backends (tests/crashing_backends.py) are registered under the real
backend names for one test each, so the messages are the ones a user sees."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import xml.etree.ElementTree as ET

import pytest
import torch

import crashing_backends
from factorport.cli import main
from factorport.errors import FactorportError
from factorport.validators.backends import BACKENDS, Generation, open_backend
from factorport.validators.backends.isolated import TIMEOUT_ENV, default_timeout
from tiny_outputs import TEXT, tiny_output


def register(monkeypatch, backend: str, cls: str) -> None:
    """Serve `backend` with a test class, for this test only."""
    entry = dataclasses.replace(BACKENDS[backend], cls=f"{crashing_backends.__name__}:{cls}")
    monkeypatch.setitem(BACKENDS, backend, entry)


@pytest.fixture
def gguf_output(tmp_path):
    for name in ("model.gguf", "adapter.gguf"):
        (tmp_path / "gguf").mkdir(exist_ok=True)
        (tmp_path / "gguf" / name).write_bytes(b"stand-in")
    return tmp_path


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return tiny_output(tmp_path_factory.mktemp("isolation"))


def test_a_segfault_while_loading_is_one_line(monkeypatch, gguf_output):
    register(monkeypatch, "llama.cpp", "SegfaultOnOpen")
    with pytest.raises(FactorportError) as caught:
        open_backend("llama.cpp", gguf_output)
    assert str(caught.value) == "llama.cpp: crashed with SIGSEGV while loading gguf/model.gguf + gguf/adapter.gguf"


def test_the_child_answers_every_call(monkeypatch, gguf_output):
    register(monkeypatch, "llama.cpp", "Counting")
    backend = open_backend("llama.cpp", gguf_output)
    try:
        assert backend.load_seconds == 0.25  # measured in the child, not here
        ids = torch.tensor([3, 1, 4, 1, 5])
        expected = ids.float()[:, None] * 1000 + torch.arange(16, dtype=torch.float32)
        assert torch.equal(backend.logits(ids), expected)
        assert backend.tokenize("hi") == [104, 105] and backend.detokenize([104, 105]) == "hi"
        generation = backend.generate([7, 9], 3)
        assert isinstance(generation, Generation) and generation.tokens == [10, 11, 12]
        with pytest.raises(FactorportError, match="^65 tokens do not fit a context of 64"):  # the child's own error, unchanged
            backend.logits(torch.zeros(65, dtype=torch.long))
        assert backend.tokenize("ok") == [111, 107]  # a refused call leaves the child serving
        process = backend.process
    finally:
        backend.close()
    assert process.exitcode == 0  # closed cleanly, not killed


def test_a_segfault_while_scoring_ends_the_backend(monkeypatch, gguf_output):
    register(monkeypatch, "llama.cpp", "SegfaultOnLogits")
    backend = open_backend("llama.cpp", gguf_output)
    assert backend.tokenize("a") == [97]
    with pytest.raises(FactorportError) as caught:
        backend.logits(torch.arange(4))
    assert str(caught.value) == "llama.cpp: crashed with SIGSEGV while scoring a window"
    with pytest.raises(FactorportError, match="process has ended \\(crashed with SIGSEGV\\)"):
        backend.tokenize("a")


def test_a_hang_is_killed_after_the_timeout(monkeypatch, gguf_output):
    register(monkeypatch, "llama.cpp", "HangOnLogits")
    backend = open_backend("llama.cpp", gguf_output, timeout=1)
    pid = backend.process.pid
    started = time.monotonic()
    with pytest.raises(FactorportError) as caught:
        backend.logits(torch.arange(4))
    assert str(caught.value) == "llama.cpp: no answer in 1 s while scoring a window; killed"
    assert time.monotonic() - started < 30
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(pid, 0)


def test_torch_stays_in_process_and_isolation_is_optional(monkeypatch, gguf_output, output):
    from factorport.validators.backends.isolated import IsolatedBackend

    assert not isinstance(open_backend("torch", output), IsolatedBackend)
    register(monkeypatch, "llama.cpp", "Counting")
    direct = open_backend("llama.cpp", gguf_output, isolated=False)
    assert type(direct).__name__ == "Counting"


def test_timeout_from_the_environment(monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "12.5")
    assert default_timeout() == 12.5
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    with pytest.raises(FactorportError, match=f"{TIMEOUT_ENV}='soon'"):
        default_timeout()


def test_validate_reports_a_crashed_backend_beside_the_others(monkeypatch, output, tmp_path, capsys):
    register(monkeypatch, "llama.cpp", "SegfaultOnLogits")
    register(monkeypatch, "onnxruntime", "ReferenceInChild")
    json_path, junit = tmp_path / "v.json", tmp_path / "v.xml"
    status = main(["validate", str(output), "--windows", "2", "--text", str(TEXT), "--json", str(json_path), "--junit", str(junit), "--quiet"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    result = json.loads(json_path.read_text())
    crashed, healthy = result["backends"]["llama.cpp"], result["backends"]["onnxruntime"]
    assert crashed["error"] == "llama.cpp: crashed with SIGSEGV while scoring a window"
    assert crashed["checks"][0]["check"] == "runs" and not crashed["passed"]
    assert healthy["passed"] and healthy["top1_agreement"] == 1.0  # the same torch model, in another process
    assert result["failures"] == [f"llama.cpp: runs = {crashed['error']} (needs loads and scores every window)"]
    markdown = (output / "report" / "validation.md").read_text()
    assert "crashed with SIGSEGV" in markdown and "| onnxruntime | top1_agreement |" in markdown
    suites = ET.fromstring(junit.read_text().split("?>", 1)[1])
    assert suites.find("testsuite[@name='llama.cpp']").get("failures") == "1"
    assert suites.find("testsuite[@name='onnxruntime']").get("failures") == "0"


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("factorport: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_eval_exits_with_the_crash_in_one_line(monkeypatch, output, capsys):
    register(monkeypatch, "llama.cpp", "SegfaultOnOpen")
    assert main(["eval", str(output), "--backend", "llama.cpp", "--windows", "1", "--text", str(TEXT), "--no-reference", "--quiet"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == "factorport: error: llama.cpp: crashed with SIGSEGV while loading gguf/model.gguf + gguf/adapter.gguf"


def test_generate_exits_with_the_hang_in_one_line(monkeypatch, output, capsys):
    register(monkeypatch, "onnxruntime", "HangOnGenerate")
    assert main(["generate", str(output), "--backend", "onnxruntime", "--prompt", "hi", "--new-tokens", "4", "--timeout", "1"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line == "factorport: error: onnxruntime: no answer in 1 s while generating 4 tokens; killed"
