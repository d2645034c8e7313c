"""llama.cpp's own programs, built by `scripts/build-llama-tools.sh` from the
llama.cpp source that the pinned llama-cpp-python vendors, with the same
portable CPU flags as the library. `tool(name)` finds one; `run_tool` runs
it in a child process and turns a failure (an exit status or a signal) into
one line. Nothing here loads llama.cpp into factorport's own process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from ..errors import FactorportError, exit_description
from ..hostcpu import require_llama_cpp_features

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench", "llama-cli", "llama-server")
BUILD_INFO = "llama.cpp-BUILD_INFO"  # what they were built from, next to them
# where they are when not next to this Python (a directory holding every tool)
TOOLS_ENV = "FACTORPORT_LLAMA_TOOLS"


def tools_dir() -> Path:
    """$FACTORPORT_LLAMA_TOOLS, else the directory of this Python (the venv's bin, where the set-up copies them)."""
    return Path(os.environ.get(TOOLS_ENV) or Path(sys.executable).parent)


def tool(name: str) -> Path:
    if name not in TOOLS:
        raise FactorportError(f"unknown llama.cpp tool {name!r}; factorport builds {', '.join(TOOLS)}")
    path = tools_dir() / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise FactorportError(
            f"{name} not found in {tools_dir()}; build llama.cpp's tools with `make .venv/.installed` "
            f"(scripts/build-llama-tools.sh) or point ${TOOLS_ENV} at a directory holding them"
        )
    return path


def build_info() -> dict[str, str]:
    """The build's `key: value` lines (source, sdist_sha256, flags); {} when absent."""
    path = tools_dir() / BUILD_INFO
    if not path.is_file():
        return {}
    pairs = (line.partition(": ") for line in path.read_text().splitlines())
    return {key: value for key, sep, value in pairs if sep}


def run_tool(name: str, arguments: list[str], timeout: float = 900.0) -> subprocess.CompletedProcess:
    """`name ARGUMENTS` in a child process, its output captured; a non-zero
    exit, a signal or a timeout becomes a FactorportError naming the tool and
    the last line it printed."""
    require_llama_cpp_features()
    command = [str(tool(name)), *arguments]
    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FactorportError(f"{name} ran past {timeout:.0f} s and was killed") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise FactorportError(f"{name} {exit_description(done.returncode)}: {lines[-1].strip() if lines else 'no output'}")
    return done


def version() -> str:
    """What `llama-cli --version` says of itself (its build number and commit)."""
    done = run_tool("llama-cli", ["--version"], timeout=60)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version")]
    return lines[0].strip() if lines else "unknown"


def llama_perplexity(model: Path, text: Path, n_ctx: int = 512, chunks: int = 8, threads: int = 2, lora: Path | None = None, timeout: float = 1800.0) -> float:
    """The "Final estimate: PPL" of `llama-perplexity -m MODEL [--lora LORA] -f
    TEXT -c N_CTX --chunks CHUNKS -fa off`: the second half of each chunk scored
    (validators.perplexity.llama_perplexity_protocol scores the same tokens)."""
    arguments = ["-m", str(model), *(["--lora", str(lora)] if lora else []), "-f", str(text), "-c", str(n_ctx), "--chunks", str(chunks), "-t", str(threads),
                 # attention as factorport's backend (llama-cpp-python) computes it: flash attention, the tool's
                 # default, rounds differently (0.6% on a Q3_K_M file), which is not what the comparison checks
                 "-fa", "off"]
    done = run_tool("llama-perplexity", arguments, timeout=timeout)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if not found:
        raise FactorportError(f"llama-perplexity printed no final estimate for {model.name}")
    return float(found.group(1))
