"""`llamacpp`: bases quantized by llama.cpp's own quantizer.

The model's weights go through `llama_model_quantize` with a llama.cpp type
(Q4_K_M, Q3_K_M, Q4_0, ... — the K-quant mixes pick a type per tensor by
name, layer and shape, exactly as `llama-quantize` does on this model), and
every targeted linear gets a `GGMLBase` holding the resulting blocks. When
the recipe calibrates (it does unless `imatrix: false`), llama.cpp quantizes
with the calibration's importance matrix, the mean x² of each input column,
as `llama-imatrix` + `llama-quantize --imatrix` would on the same text. The
torch model then computes with the very weights llama.cpp reads, so a
following `correct` step corrects *that* error, and the GGUF exporter copies
the blocks unchanged.

    steps:
      - llamacpp: {type: Q4_K_M}
      - correct: {targets: [linears], shared: false, ranks: {budget: {added_bytes: 4.0e+6}}}
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..llamacpp.hparams import hparams
from ..llamacpp.names import OUTPUT, TOKEN_EMBEDDING, gguf_arch, linear_tensor, norm_weights
from ..llamacpp.quantize import FTYPES, quantize_model
from ..ops import CompressedLinear
from ..ops.ggml import GGMLBase
from .calibration import CalibrationStats
from .report import LayerReport, output_error
from .targets import compressible_linears, is_tied, replace_linear


@dataclass(frozen=True)
class LlamaCppConfig:
    targets: tuple[str, ...] = ("linears", "lm_head")
    type: str = "Q4_K_M"  # a llama.cpp file type (llama-quantize's names)
    imatrix: bool = True  # quantize with the calibration's importance matrix


def check_llamacpp(model, config: LlamaCppConfig) -> None:
    if config.type not in FTYPES:
        raise ValueError(f"type {config.type!r} is not a llama.cpp quantization type; choose one of {', '.join(FTYPES)}")
    gguf_arch(model.config)
    for name in compressible_linears(model, config.targets):
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise ValueError(f"{name} is already compressed; llamacpp quantizes dense weights, put it first")


def _gguf_names(model, targets: list[str]) -> dict[str, str]:
    """{module name: GGUF tensor name} of the targeted linears (a tied lm_head is token_embd)."""
    arch = gguf_arch(model.config)
    tied = is_tied(model)
    names = {}
    for name in targets:
        if name == arch.lm_head:
            names[name] = TOKEN_EMBEDDING if tied else OUTPUT
        else:
            names[name] = f"{linear_tensor(name, arch)}.weight"
    return names


def _importance(names: dict[str, str], stats: CalibrationStats) -> dict[str, np.ndarray]:
    """{gguf name: mean x² per input column}, what llama-quantize computes from
    an imatrix file. Like llama-imatrix, none for a tied table: as the token
    embedding, its rows are read whole and its columns are not inputs."""
    sums = stats.input_sums(list(names))
    return {names[n]: (s / stats.tokens).numpy() for n, s in sums.items() if names[n] != TOKEN_EMBEDDING}


def _all_tensors(model) -> dict:
    """Every weight under its GGUF name, float32, Hugging Face row order
    (rows are quantized independently, so the rotary order does not matter)."""
    linears = compressible_linears(model, ["linears", "lm_head"])
    tensors = {TOKEN_EMBEDDING: model.get_input_embeddings().weight, **norm_weights(model)}
    tensors.update({gguf: model.get_submodule(name).weight for name, gguf in _gguf_names(model, linears).items()})
    return {k: v.detach().float().contiguous().numpy() for k, v in tensors.items()}


@torch.no_grad()
def llamacpp_(model, config: LlamaCppConfig, stats: CalibrationStats | None, progress: bool = True) -> list[LayerReport]:
    check_llamacpp(model, config)
    started = time.perf_counter()
    targets = compressible_linears(model, config.targets)
    names = _gguf_names(model, targets)
    importance = _importance(names, stats) if config.imatrix and stats is not None else None
    if progress:
        print(f"factorport: llama.cpp quantizes the model to {config.type}{' with an importance matrix' if importance else ''}")
    blocks = quantize_model(_all_tensors(model), hparams(model.config), config.type, importance=importance)
    seconds = (time.perf_counter() - started) / len(targets)
    reports = []
    for name, tensor in names.items():
        linear = model.get_submodule(name)
        type_name, data = blocks[tensor]
        base = GGMLBase(torch.from_numpy(data.copy()), type_name, linear.in_features)
        new = CompressedLinear.from_linear(linear, base)
        error = output_error(linear.weight, base.to_dense(), stats.xtx(name)) if stats is not None and stats.has(name) else None
        report = LayerReport.compare(name, linear, new, error, seconds, step="llamacpp")
        report.operator = f"llama.cpp {type_name} ({config.type}{', imatrix' if importance and tensor in importance else ''})"
        replace_linear(model, name, new)
        reports.append(report)
    return reports
