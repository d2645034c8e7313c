"""`factorport doctor` on this host: the llama.cpp build fits the CPU, every
backend's smoke test runs a real exported model and agrees with torch."""

from __future__ import annotations

import json

from factorport import hostcpu
from factorport.cli import main
from factorport.llamacpp import tools


def test_doctor_reports_the_build_and_every_backend_passes(capsys):
    assert main(["doctor", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    llama = report["llama.cpp"]
    assert llama["missing_on_this_cpu"] == []
    assert "AVX2" in llama["compiled_with"]
    assert not [f for f in llama["compiled_with"] if f.startswith(("AVX512", "AMX"))]
    assert {p.rsplit("/", 1)[-1] for p in llama["libraries"]} >= {"libllama.so", "libggml-cpu.so"}
    assert set(report["smoke"]) == {"torch", "onnxruntime", "llama.cpp"}
    assert all(result["passed"] for result in report["smoke"].values()), report["smoke"]
    assert report["versions"]["llama_cpp_python"] == "0.3.36"
    kit = report["llama.cpp tools"]
    assert "error" not in kit, kit
    assert set(kit["paths"]) == set(tools.TOOLS) and all(kit["paths"].values())
    assert kit["version"].startswith("version: ")
    assert kit["build"]["source"] == "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp"


def test_doctor_fails_when_the_tools_are_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(tools.TOOLS_ENV, str(tmp_path))
    assert main(["doctor", "--no-smoke"]) == 1
    assert "llama.cpp tools: not built: llama-quantize" in capsys.readouterr().out


def test_doctor_says_when_llama_cpp_does_not_fit(monkeypatch, capsys):
    monkeypatch.setattr(hostcpu, "missing_llama_cpp_features", lambda: ["avx2"])
    assert main(["doctor", "--no-smoke"]) == 1
    assert "this CPU lacks avx2" in capsys.readouterr().out
