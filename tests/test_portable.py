"""The native code the set-up built runs on any x86-64-v3 host: no AMX
tile instruction and no AVX-512 instruction anywhere in llama.cpp's
libraries or its tools (a VM may advertise both and fault on them), and factorport
refuses, with one line, to load llama.cpp on a CPU below that level."""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from factorport import hostcpu
from factorport.errors import FactorportError
from factorport.llamacpp import tools

FLAGS_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "llama-cpp-flags.sh"
# ggml's CMake option -> the /proc/cpuinfo flag of that instruction set
GGML_OPTION_FLAGS = {"SSE42": "sse4_2", "AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI2": "bmi2"}

x86_only = pytest.mark.skipif(platform.machine().lower() not in hostcpu.X86_MACHINES, reason="x86-64 build settings")


@x86_only
def test_llama_cpp_libraries_hold_no_amx_or_avx512_instruction():
    libraries = hostcpu.llama_cpp_libraries()
    assert {p.name for p in libraries} >= {"libllama.so", "libggml-cpu.so", "libggml-base.so"}
    for library in libraries:
        assert hostcpu.disassembly_findings(library) == {"amx": 0, "zmm": 0}, library


@x86_only
@pytest.mark.parametrize("name", tools.TOOLS)
def test_llama_cpp_tools_hold_no_amx_or_avx512_instruction(name):
    assert hostcpu.disassembly_findings(tools.tool(name)) == {"amx": 0, "zmm": 0}


def test_disassembly_scan_finds_amx_and_avx512(tmp_path):
    """The scan above would see them if they were there."""
    source = tmp_path / "tiles.c"
    source.write_text(
        'void zero_tile(void) { __asm__ volatile("tilezero %%tmm0" ::: "memory"); }\n'
        'void add_wide(void) { __asm__ volatile("vaddps %%zmm1, %%zmm2, %%zmm3" ::: "memory"); }\n'
    )
    library = tmp_path / "libtiles.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    assert hostcpu.disassembly_findings(library) == {"amx": 1, "zmm": 1}


@x86_only
def test_required_features_are_the_build_flags_and_what_llama_cpp_reports():
    enabled = set(re.findall(r"-DGGML_(\w+)=ON", FLAGS_SCRIPT.read_text()))
    assert not any(opt.startswith(("AVX512", "AMX", "NATIVE")) for opt in enabled)
    assert {GGML_OPTION_FLAGS[o] for o in enabled if o in GGML_OPTION_FLAGS} == set(hostcpu.LLAMA_CPP_X86_FEATURES)
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    report = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    on = set(re.findall(r"(\w+) = 1", report))
    assert {"AVX", "AVX2", "FMA", "F16C"} <= on
    assert not {name for name in on if name.startswith(("AVX512", "AMX"))}


def test_llama_cpp_refused_on_a_cpu_below_the_build_level(monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(hostcpu, "cpu_flags", lambda: frozenset({"sse4_2", "avx", "fma", "f16c"}))
    assert hostcpu.missing_llama_cpp_features() == ["avx2", "bmi2"]
    with pytest.raises(FactorportError, match=r"^this CPU lacks avx2, bmi2, which the llama.cpp build needs"):
        hostcpu.require_llama_cpp_features()
    monkeypatch.setattr(hostcpu, "cpu_flags", lambda: frozenset(hostcpu.LLAMA_CPP_X86_FEATURES) | {"amx_tile"})
    hostcpu.require_llama_cpp_features()  # AMX advertised: nothing built uses it
