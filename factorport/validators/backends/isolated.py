"""A backend in a child process, so that a native crash or hang stays there.

llama.cpp and onnxruntime are native code: on a host whose CPU advertises
features that fault (a VM's AMX: SIGILL), or on a file their own checks miss,
they can kill the whole process. `IsolatedBackend` has the Backend interface
and forwards every call over a pipe to a child started with 'spawn' (a fresh
interpreter: no state copied from the parent, no fork of threads). A child
that dies becomes one line naming the backend, the signal and what it was
doing; a child that does not answer within the per-call timeout is killed.

Only our own child's answers are unpickled here, and the child only unpickles
what this parent sends; no file is ever unpickled.
"""

from __future__ import annotations

import builtins
import importlib
import multiprocessing
import os
import signal
from multiprocessing.connection import wait
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...errors import FactorportError, exit_description

DEFAULT_TIMEOUT_S = 900.0  # one call: loading a large GGUF, or one window of a 7B model on 2 cores, takes minutes
TIMEOUT_ENV = "FACTORPORT_BACKEND_TIMEOUT"
STARTUP_TIMEOUT_S = 300.0  # a fresh interpreter importing torch, before the per-call timeout starts: slow on a busy host
CLOSE_TIMEOUT_S = 10.0
METHODS = ("tokenize", "text_start", "detokenize", "logits", "generate")


def default_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise FactorportError(f"{TIMEOUT_ENV}={value!r}: expected a positive number of seconds")
    return seconds


class _Array:
    """A tensor on the wire: numpy pickles by value, whereas a torch tensor
    sent through multiprocessing goes by shared memory the sender must keep alive."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.array = tensor.detach().cpu().numpy()


def _pack(value):
    if isinstance(value, torch.Tensor):
        return _Array(value)
    return tuple(_pack(v) for v in value) if isinstance(value, tuple) else value


def _unpack(value):
    if isinstance(value, _Array):
        return torch.from_numpy(np.ascontiguousarray(value.array))
    return tuple(_unpack(v) for v in value) if isinstance(value, tuple) else value


class IsolatedBackend:
    """The Backend interface, served by a child process."""

    def __init__(self, name: str, process, conn, timeout: float) -> None:
        self.name = name
        self.process = process
        self.conn = conn
        self.timeout = timeout
        self.load_seconds = float("nan")
        self.ended: str | None = None  # why the child is gone, once it is

    @classmethod
    def open(cls, name: str, backend_cls: str, artifact: Path, options: dict, timeout: float | None = None, loading: str = "") -> "IsolatedBackend":
        """Start a child that opens `artifact` with `backend_cls` ("module:Class")."""
        timeout = default_timeout() if timeout is None else float(timeout)
        if not timeout > 0:
            raise FactorportError(f"backend timeout must be a positive number of seconds, got {timeout}")
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=_serve, args=(child_end, backend_cls, str(artifact), dict(options)), name=f"factorport-{name}", daemon=True
        )
        process.start()
        child_end.close()  # so that the child's death reads as EOF here
        proxy = cls(name, process, parent_end, STARTUP_TIMEOUT_S)
        proxy._answer("starting")
        proxy.timeout = timeout
        proxy.load_seconds = proxy._answer(f"loading {loading or artifact}")
        return proxy

    # The Backend interface.

    def tokenize(self, text: str) -> list[int]:
        return self._call("tokenize", (text,), "tokenizing")

    def text_start(self) -> list[int]:
        return self._call("text_start", (), "tokenizing")

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._call("detokenize", (list(ids),), "detokenizing")

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self._call("logits", (torch.as_tensor(ids),), "scoring a window")

    def generate(self, ids: Sequence[int], new_tokens: int):
        return self._call("generate", ([int(t) for t in ids], int(new_tokens)), f"generating {new_tokens} tokens")

    def close(self) -> None:
        """Ask the child to free its runtime and exit; kill it if it does not."""
        if self.process is None:
            return
        try:
            self.conn.send(("close", ()))
            if self.conn.poll(CLOSE_TIMEOUT_S):
                self.conn.recv()
        except (OSError, EOFError):
            pass  # already gone
        self.process.join(CLOSE_TIMEOUT_S)
        self._end("closed")

    def __enter__(self) -> "IsolatedBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "process", None) is not None:
            self._end("closed")

    # The wire.

    def _call(self, method: str, args: tuple, doing: str):
        if self.process is None:
            raise FactorportError(f"{self.name}: its process has ended ({self.ended}); open the backend again")
        try:
            self.conn.send((method, _pack(args)))
        except OSError:  # the child died since its last answer
            raise self._died(doing) from None
        return self._answer(doing)

    def _answer(self, doing: str):
        """The child's answer to the last request, or the one-line reason there is none."""
        ready = wait([self.conn, self.process.sentinel], self.timeout)
        if not ready:
            self._end(f"killed after {self.timeout:g} s")
            raise FactorportError(f"{self.name}: no answer in {self.timeout:g} s while {doing}; killed")
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):
            raise self._died(doing) from None
        if status == "ok":
            return _unpack(value)
        kind, message = value
        if kind == "FactorportError":
            raise FactorportError(message)
        first = (message.splitlines() or [""])[0]
        raise _rebuilt(kind, f"{self.name}: {kind} while {doing}: {first}")

    def _died(self, doing: str) -> FactorportError:
        self.process.join(CLOSE_TIMEOUT_S)
        how = exit_description(self.process.exitcode)
        self._end(how)
        return FactorportError(f"{self.name}: {how} while {doing}")

    def _end(self, why: str) -> None:
        process, self.process = self.process, None
        self.ended = why
        if process is not None and process.is_alive():
            process.kill()
            process.join(CLOSE_TIMEOUT_S)
        self.conn.close()


def _rebuilt(kind: str, message: str) -> Exception:
    """The child's ValueError stays a ValueError (callers tell runtime
    errors apart by type); anything not built in becomes a FactorportError."""
    cls = getattr(builtins, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:
            pass
    return FactorportError(message)


def _serve(conn, backend_cls: str, artifact: str, options: dict) -> None:
    """The child: open the backend, then answer requests until told to close
    or until the parent goes away."""
    import faulthandler

    faulthandler.disable()  # a crash is reported by the parent in one line, not as a C stack dump
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn.send(("ok", None))  # started: from here on, each step has the per-call timeout
    try:
        module, name = backend_cls.split(":")
        backend = getattr(importlib.import_module(module), name).open(Path(artifact), **options)
        conn.send(("ok", float(getattr(backend, "load_seconds", float("nan")))))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back as an answer
        conn.send(("error", (type(exc).__name__, str(exc))))
        return
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            break  # the parent is gone
        if method == "close":
            break
        try:
            if method not in METHODS:
                raise FactorportError(f"unknown backend call {method!r}")
            answer = ("ok", _pack(getattr(backend, method)(*_unpack(args))))
        except Exception as exc:  # noqa: BLE001
            answer = ("error", (type(exc).__name__, str(exc)))
        conn.send(answer)
    getattr(backend, "close", lambda: None)()
    try:
        conn.send(("ok", None))
    except OSError:
        pass
