"""Decode at batch 1 reads every weight once per token, so its speed is bounded
by (memory bandwidth) / (bytes of weights read per token). This measures the
first and counts the second for each kind of artifact."""

from __future__ import annotations

import time
from pathlib import Path

import torch

BANDWIDTH_BYTES = 1 << 30  # 1 GiB: far beyond any cache


def measure_bandwidth(repeats: int = 15, threads: int | None = None) -> float:
    """Read bandwidth in bytes/s: the best of `repeats` sums of a 1 GiB
    float32 array (with the runtime's thread count, as decode uses it). The
    best, not the median: a bound is what the memory can deliver, and single
    passes on a shared machine only ever come out slower."""
    return max(bandwidth_passes(repeats, threads))


def bandwidth_passes(repeats: int = 15, threads: int | None = None) -> list[float]:
    """Bytes/s of each of `repeats` sums of a 1 GiB float32 array. Their
    spread says how steady the machine was: on an idle one they agree within
    a few percent; other processes competing for memory or cores spread them."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        data = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32)
        data.sum()  # touch every page once
        passes = []
        for _ in range(max(1, repeats)):
            started = time.perf_counter()
            data.sum()
            passes.append(BANDWIDTH_BYTES / (time.perf_counter() - started))
        return passes
    finally:
        torch.set_num_threads(previous)


def spread(passes: list[float]) -> float:
    """1 - median / best: 0 when every pass ran as fast as the best one."""
    import statistics

    return 1.0 - statistics.median(passes) / max(passes)


def bytes_read_per_token(artifact: str | Path) -> int:
    """Weight bytes one decode step reads, by artifact kind. An embedding table
    is only gathered (one row a token) unless the output layer reads it too."""
    artifact = Path(artifact)
    if list(artifact.glob("*.onnx")):
        return _onnx_bytes(artifact)
    if list(artifact.glob("*.gguf")):
        return _gguf_bytes(artifact)
    return _safetensors_bytes(artifact)


def _safetensors_bytes(directory: Path) -> int:
    import json

    from ..architectures import arch_for
    from ..formats.summary import tensor_bytes

    sizes = tensor_bytes(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("tie_word_embeddings", False):
        return sum(sizes.values())
    embed = arch_for(config["model_type"]).embed
    return sum(size for name, size in sizes.items() if not name.startswith(embed + "."))


def _onnx_bytes(directory: Path) -> int:
    import onnx

    model_path = directory / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=False)
    gathered_only = {}
    for init in model.graph.initializer:
        gathered_only[init.name] = True
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            if name in gathered_only and not (node.op_type in ("Gather", "GatherBlockQuantized") and position == 0):
                gathered_only[name] = False
    total = 0
    for init in model.graph.initializer:
        if gathered_only.get(init.name):
            continue
        total += _initializer_bytes(init)
    return total


def _initializer_bytes(init) -> int:
    from onnx import helper

    for entry in init.external_data:
        if entry.key == "length":
            return int(entry.value)
    if init.raw_data:
        return len(init.raw_data)
    count = 1
    for dim in init.dims:
        count *= dim
    return count * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def _gguf_bytes(directory: Path) -> int:
    from ..formats.gguf.checks import open_gguf

    total = 0
    for path in sorted(directory.glob("*.gguf")):
        if path.name.endswith(".factorport.gguf"):
            continue  # factorport's own layout; llama.cpp does not run it
        tensors = {t.name: int(t.n_bytes) for t in open_gguf(path).tensors}
        if "token_embd.weight" in tensors and "output.weight" in tensors:
            tensors.pop("token_embd.weight")
        total += sum(tensors.values())
    return total


def weight_file_bytes(artifact: str | Path) -> int:
    """Bytes on disk of the weight files a runtime loads."""
    suffixes = (".onnx", ".onnx_data", ".data", ".gguf", ".safetensors")
    return sum(
        p.stat().st_size
        for p in Path(artifact).iterdir()
        if p.is_file() and p.name.endswith(suffixes) and not p.name.endswith(".factorport.gguf")
    )
