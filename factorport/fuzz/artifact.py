"""The artifact every reader is fuzzed on: the tiny output of
`factorport.tiny` (int4 base, shared low-rank correction, so adapter.gguf,
shared V tensors and int4 codes all exist, int8 tied embedding), with its
ONNX tensors moved to external data, as exports over 2 GB have them, so
locations and offsets can be fuzzed.

It is built in a forked child (`build_in_child`), so the fuzzing process
itself never runs torch compute before it forks its readers.
"""

from __future__ import annotations

from pathlib import Path

EXTERNAL_DATA = "model.onnx_data"
# the fixed window every reader scores (byte-level vocabulary of 128 tokens)
TOKEN_IDS = [1, 17, 42, 99, 3, 64, 127, 0, 5, 88, 23, 71]


def _onnx_to_external_data(onnx_dir: Path) -> None:
    import onnx

    path = onnx_dir / "model.onnx"
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA, size_threshold=256)


def build(directory: Path) -> Path:
    """Write the artifact into `directory` (created; must not exist): the
    tiny output, its ONNX weights moved to external data (as exports over
    2 GB have them, so locations and offsets are fuzzed too)."""
    from ..formats.manifest import refresh_manifest
    from ..tiny import build_output

    directory = Path(directory)
    build_output(directory)
    _onnx_to_external_data(directory / "onnx")
    refresh_manifest(directory)
    return directory


def build_in_child(directory: Path, timeout: float = 600.0) -> Path:
    """`build(directory)` in a forked child, so that this process stays free
    of the thread pools torch and onnxruntime start on their first compute."""
    from .harness import run_in_child

    outcome = run_in_child(lambda: str(build(directory)), timeout=timeout, memory_limit=None)
    if outcome.kind != "ok":
        raise RuntimeError(f"building the fuzz artifact failed: {outcome.kind}: {outcome.detail}")
    return Path(directory)


__all__ = ["EXTERNAL_DATA", "TOKEN_IDS", "build", "build_in_child"]
