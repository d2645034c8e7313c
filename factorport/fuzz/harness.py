"""Running one input in a forked child and classifying what happened.

The fuzzing process is a fork server: it imports torch, llama_cpp and
onnxruntime once, runs no compute of its own (a fork after torch or
onnxruntime started their thread pools could deadlock the child), and forks
one child per input. The child sets RLIMIT_AS, runs the reader, writes one
JSON line to a pipe and leaves with os._exit; the server reads the pipe
under a deadline and classifies by the JSON and the waitpid status.

Outcome kinds (the child's own, before the campaign compares results):

    ok         the function returned; `value` is its JSON-able result
    error      a FactorportError; `detail` is its message
    crash      the child died of a signal (segfault, abort, ...)
    hang       no answer before the deadline; the child was killed
    memory     MemoryError, an allocator's out-of-memory error, or bad_alloc
    traceback  any other exception; `detail` is "Type: first line (file:line)"
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import select
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable

DEFAULT_TIMEOUT = 30.0
DEFAULT_MEMORY_LIMIT = 4 << 30  # RLIMIT_AS of every child, bytes
STDERR_TAIL = 8000  # characters of a child's stderr kept with a crash or hang (a Python stack dump included)

# Messages of allocation failures that are not MemoryError: torch's
# allocator, onnxruntime's, C++ std::bad_alloc (also in an abort's stderr).
_OUT_OF_MEMORY = ("can't allocate memory", "bad_alloc", "bad allocation", "out of memory", "cannot allocate memory", "failed to allocate")


@dataclass
class ChildOutcome:
    kind: str  # ok | error | crash | hang | memory | traceback
    detail: str = ""  # error message, exception summary, signal name
    value: object = None  # the function's result when kind == "ok"
    seconds: float = 0.0
    stderr: str = ""  # tail of the child's stderr (crash, hang, memory)


def _exception_summary(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0][:300] if lines else ""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {first}{where}"


def stderr_summary(stderr: str, chars: int = 600) -> str:
    """What a native library said before dying, and the innermost Python frames
    of faulthandler's dump: the part of a crash's stderr worth reading."""
    before, marker, dump = stderr.partition("Fatal Python error")
    said = before.strip()[-chars:]
    if not marker:
        return said
    frames = [line.strip() for line in dump.splitlines() if line.strip().startswith("File ")][:4]
    return (said + "\n" if said else "") + "Fatal Python error" + dump.splitlines()[0] + " at " + " <- ".join(frames)


def _is_out_of_memory(text: str) -> bool:
    text = text.lower()
    return any(marker in text for marker in _OUT_OF_MEMORY)


def _child_result(fn: Callable[[], object]) -> dict:
    """What the child reports: never raises."""
    from ..errors import FactorportError

    try:
        return {"kind": "ok", "value": fn()}
    except MemoryError as exc:
        return {"kind": "memory", "detail": _exception_summary(exc)}
    except FactorportError as exc:
        return {"kind": "error", "detail": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - classifying every escape is the point
        summary = _exception_summary(exc)
        return {"kind": "memory" if _is_out_of_memory(summary) else "traceback", "detail": summary}


def _child_main(fn: Callable[[], object], write_fd: int, stderr_fd: int, memory_limit: int | None) -> None:
    """Runs in the forked child; never returns."""
    status = 0
    try:
        os.dup2(stderr_fd, 2)
        os.dup2(stderr_fd, 1)  # native libraries print to stdout too
        # the Python stack of a native crash goes with the saved stderr (not
        # to a terminal that a test runner's faulthandler may hold)
        faulthandler.enable(file=2, all_threads=False)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        result = _child_result(fn)
        try:
            payload = json.dumps(result)
        except (TypeError, ValueError) as exc:
            payload = json.dumps({"kind": "traceback", "detail": f"unserializable result: {exc}"})
        data = payload.encode() + b"\n"
        while data:
            data = data[os.write(write_fd, data):]
    except BaseException:  # noqa: BLE001 - the child must reach os._exit
        status = 70
    finally:
        os._exit(status)


def _read_until(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Everything written to `fd` until EOF, and whether EOF came before `deadline`."""
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), False
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def classify(payload: bytes, status: int, finished: bool, stderr: str) -> tuple[str, str, object]:
    """(kind, detail, value) from what a child wrote, its waitpid status, and
    whether it answered before the deadline."""
    if not finished:
        return "hang", "no answer before the deadline", None
    if os.WIFSIGNALED(status):
        name = _signal_name(os.WTERMSIG(status))
        # a SIGKILL we did not send is the kernel's out-of-memory killer; an
        # abort after std::bad_alloc is an allocation failure under the rlimit
        if os.WTERMSIG(status) == signal.SIGKILL or _is_out_of_memory(stderr):
            return "memory", f"{name} (allocation failed)", None
        return "crash", name, None
    line = payload.decode("utf-8", errors="replace").strip().splitlines()
    if not line:
        return "crash", f"exit status {os.WEXITSTATUS(status)} without an answer", None
    try:
        result = json.loads(line[-1])
    except json.JSONDecodeError:
        return "crash", f"exit status {os.WEXITSTATUS(status)} with a garbled answer", None
    return result["kind"], result.get("detail", ""), result.get("value")


@dataclass
class RunningChild:
    pid: int
    read_fd: int
    stderr_file: object  # a temporary file the child's stdout and stderr go to
    started: float
    timeout: float


def start_child(fn: Callable[[], object], timeout: float = DEFAULT_TIMEOUT, memory_limit: int | None = DEFAULT_MEMORY_LIMIT) -> RunningChild:
    """Fork a child running `fn()` under RLIMIT_AS `memory_limit` (None: no
    limit); `finish_child` collects it. `fn` returns something JSON-able."""
    read_fd, write_fd = os.pipe()
    stderr_file = tempfile.TemporaryFile(prefix="factorport-fuzz-stderr-")
    sys.stdout.flush()  # or the child's copy of the buffer would be written twice
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        _child_main(fn, write_fd, stderr_file.fileno(), memory_limit)
    os.close(write_fd)
    return RunningChild(pid, read_fd, stderr_file, time.monotonic(), timeout)


def _stop(pid: int, grace: float = 2.0) -> int:
    """End a child past its deadline: SIGABRT first, so faulthandler writes
    where it was stuck into its stderr, then SIGKILL. Returns the wait status."""
    os.kill(pid, signal.SIGABRT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def finish_child(child: RunningChild) -> ChildOutcome:
    """Wait for the child's answer until its deadline (killing it then) and classify it."""
    try:
        payload, finished = _read_until(child.read_fd, child.started + child.timeout)
    finally:
        os.close(child.read_fd)
    status = _stop(child.pid) if not finished else os.waitpid(child.pid, 0)[1]
    seconds = time.monotonic() - child.started
    with child.stderr_file as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - STDERR_TAIL))
        stderr = fh.read().decode("utf-8", errors="replace")
    kind, detail, value = classify(payload, status, finished, stderr)
    return ChildOutcome(kind, detail, value, seconds, stderr if kind in ("crash", "hang", "memory") else "")


def run_in_child(fn: Callable[[], object], timeout: float = DEFAULT_TIMEOUT, memory_limit: int | None = DEFAULT_MEMORY_LIMIT) -> ChildOutcome:
    """Run `fn()` in a forked child under `memory_limit` and `timeout` seconds; classify the outcome."""
    return finish_child(start_child(fn, timeout, memory_limit))
