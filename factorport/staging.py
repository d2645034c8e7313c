"""Where a conversion is built before it becomes its output directory.

`OUTPUT` is only ever created by renaming a complete `.OUTPUT.partial`
beside it, so an interrupted run (Ctrl-C, a crash, kill -9) never leaves a
half-written output. The partial directory is kept on failure: it holds one
file per finished decoder layer and the hidden states entering the next
(`state.safetensors`), so `--resume` continues from the last finished layer
instead of starting over. `resume.json` records the settings; a resume with
different settings is refused (its layers would not belong together).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import FactorportError

SETTINGS = "resume.json"
PIECES = "pieces"  # formats.safetensors_dir.PIECES: the finished layers
STATE = "state.safetensors"
ALLOCATION = "allocation.json"  # a two-pass conversion's solved budget
STAGED_SUMS = "input-sums"  # each finished piece's calibration input sums, joined at the end


def partial_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial")


def refuse_existing(output: Path, force: bool) -> None:
    if Path(output).exists() and not force:
        raise FactorportError(f"output {output} already exists; pass --force to overwrite it")


@contextmanager
def resumable_output(output: Path, force: bool, settings: dict, resume: bool, progress: bool = True):
    """Yield `.OUTPUT.partial` (fresh, or the one `resume` continues, after
    checking its settings); on success it replaces `output`, on failure it is
    kept for `--resume`."""
    output = Path(output)
    refuse_existing(output, force)
    settings = json.loads(json.dumps(settings))  # as resume.json will read back
    staging = partial_dir(output)
    if resume:
        _check_resumable(staging, settings)
    else:
        if staging.exists():
            if progress:
                print(f"factorport: removing {staging} of an earlier interrupted run (--resume would continue it)")
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        (staging / SETTINGS).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    try:
        yield staging
    except BaseException:
        if not any(staging.glob(f"{PIECES}/*.safetensors")):
            shutil.rmtree(staging, ignore_errors=True)  # nothing finished: nothing to resume
        elif progress:
            print(f"factorport: conversion stopped; {staging} is kept, and the same command with --resume continues it")
        raise
    finished(staging)
    _move_into_place(staging, output)


@contextmanager
def staged_output(output: Path, force: bool):
    """Yield a temporary directory beside `output`; on success it becomes
    `output` (replacing an old one only with `force`); on failure it is removed,
    so no partial output is ever left (for exports: nothing to resume)."""
    output = Path(output)
    refuse_existing(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield tmp
        _move_into_place(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(staging: Path, output: Path) -> None:
    """Rename `staging` to `output`, an existing `output` moved aside first and then removed."""
    if output.exists():
        trash = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, trash)
        os.replace(staging, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, output)


def finished(staging: Path) -> None:
    """Drop what only a resume needs (before the manifest hashes the directory)."""
    (staging / SETTINGS).unlink(missing_ok=True)
    (staging / STATE).unlink(missing_ok=True)
    (staging / ALLOCATION).unlink(missing_ok=True)


def _check_resumable(staging: Path, settings: dict) -> None:
    if not (staging / SETTINGS).is_file():
        raise FactorportError(f"nothing to resume: {staging} does not exist or holds no {SETTINGS}; run without --resume")
    try:
        recorded = json.loads((staging / SETTINGS).read_text())
    except (ValueError, UnicodeDecodeError):
        raise FactorportError(f"{staging / SETTINGS} is not valid JSON; run without --resume to start over") from None
    if recorded != settings:
        differ = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
        raise FactorportError(
            f"{staging} was started with different settings ({', '.join(differ)}); run without --resume to start over"
        )
