"""What this host's CPU offers, and whether the native libraries fit it.

llama.cpp (library and tools) is built with `scripts/llama-cpp-flags.sh` for a fixed
instruction-set level instead of the build machine's CPU (see the script for
why). `LLAMA_CPP_X86_FEATURES` is that level, as /proc/cpuinfo names the
flags; `require_llama_cpp_features` refuses, with one line, to load
llama.cpp on a CPU without them instead of dying with SIGILL. A test checks
the list against the flags of the script and the library's own report.
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

from .errors import FactorportError

# x86-64-v3 as built (-DGGML_AVX2=ON ... -DGGML_AVX512=OFF -DGGML_AMX_*=OFF).
LLAMA_CPP_X86_FEATURES = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2")
# Flags worth showing in `factorport doctor`: the ones native libraries choose kernels by.
REPORTED_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
X86_MACHINES = ("x86_64", "amd64")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The feature flags the kernel reports for CPU 0, or None where unknown
    (not Linux, or no /proc)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def missing_llama_cpp_features() -> list[str]:
    """Flags the llama.cpp build needs that this CPU lacks ([] when it fits or
    when the flags cannot be read: then there is nothing to go by)."""
    flags = cpu_flags()
    if flags is None or platform.machine().lower() not in X86_MACHINES:
        return []
    return [f for f in LLAMA_CPP_X86_FEATURES if f not in flags]


def require_llama_cpp_features() -> None:
    missing = missing_llama_cpp_features()
    if missing:
        raise FactorportError(
            f"this CPU lacks {', '.join(missing)}, which the llama.cpp build needs (x86-64-v3); "
            "use the onnxruntime backend on this host"
        )


# Every AMX instruction (tile configuration, loads/stores, dot products).
AMX_MNEMONICS = frozenset({
    "ldtilecfg", "sttilecfg", "tilerelease", "tilezero", "tileloadd", "tileloaddt1", "tilestored",
    "tdpbssd", "tdpbsud", "tdpbusd", "tdpbuud", "tdpbf16ps", "tdpfp16ps", "tcmmimfp16ps", "tcmmrlfp16ps",
})


def llama_cpp_libraries() -> list[Path]:
    """The shared libraries llama-cpp-python loads (found without loading them)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return []
    import hashlib

    distinct: dict[str, Path] = {}  # the wheel ships libX.so and libX.so.0 as copies of one file
    for path in sorted((Path(spec.origin).parent / "lib").glob("*.so*")):
        if path.is_file():
            distinct.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), path)
    return sorted(distinct.values())


def disassembly_findings(library: Path) -> dict[str, int]:
    """How many AMX instructions, and instructions on 512-bit zmm registers,
    `objdump -d` finds in `library`. Either would fault on a CPU (or a VM)
    that does not enable them, and this build dispatches to none at run time."""
    import subprocess

    counts = {"amx": 0, "zmm": 0}
    with subprocess.Popen(["objdump", "-d", "--no-show-raw-insn", str(library)], stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            _, sep, instruction = line.partition(":\t")
            if not sep:
                continue
            mnemonic = instruction.split(None, 1)[0] if instruction.strip() else ""
            if mnemonic in AMX_MNEMONICS:
                counts["amx"] += 1
            elif "%zmm" in instruction:
                counts["zmm"] += 1
    if proc.returncode != 0:
        raise FactorportError(f"objdump could not disassemble {library} (exit {proc.returncode})")
    return counts


def import_llama_cpp():
    """llama_cpp, imported only on a CPU that can run what was built."""
    require_llama_cpp_features()
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - a dependency
        raise FactorportError("llama.cpp is missing; run 'make test' or scripts/install-llama-cpp-python.sh") from exc
    return llama_cpp
