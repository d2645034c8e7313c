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

Equal bytes (`size_of: TYPE` or `bytes: N`): instead of llama.cpp's own mix,
each targeted tensor gets the llama.cpp type and the correction rank that
buy the most calibration output error per byte, within the bytes llama.cpp's
quantization to TYPE gives those tensors (or N). The options of a tensor are
its quantization in every type of `types` (llama.cpp's quantizer with
`pure`, so with the importance matrix and the fallbacks llama.cpp applies
where a row does not fit) times the ranks of `correction_ranks`; errors are
the whitened SVD's (`correct`'s EoRA), relative to each tensor's output
energy, and the budget step's solver picks (greedy on lower convex hulls).
The step then attaches the corrections itself: no `correct` step follows.
The blocks of every type are held at once (about 9x the Q4_0 model).

    steps:
      - llamacpp: {size_of: Q4_0}
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..llamacpp.hparams import hparams
from ..llamacpp.names import OUTPUT, TOKEN_EMBEDDING, gguf_arch, linear_tensor, norm_weights
from ..llamacpp.quantize import FTYPES, PURE_FTYPES, quantize_each, quantize_model
from ..ops import CompressedLinear
from ..ops.ggml import GGMLBase
from .budget import Option, choose_options, lower_hull
from .calibration import CalibrationStats
from .lowrank import attach_projection, input_transform, stacked_error_svd, truncate
from .report import LayerReport, output_error
from .targets import compressible_linears, is_tied, replace_linear


@dataclass(frozen=True)
class LlamaCppConfig:
    targets: tuple[str, ...] = ("linears", "lm_head")
    type: str = "Q4_K_M"  # a llama.cpp file type (llama-quantize's names); its mix, without a byte target
    imatrix: bool = True  # quantize with the calibration's importance matrix
    # equal bytes: the targeted tensors and their corrections take at most the
    # bytes llama.cpp's quantization to `size_of` gives them, or `bytes`
    size_of: str | None = None
    bytes: float | None = None
    types: tuple[str, ...] = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0")  # ggml types on offer
    correction_ranks: tuple[int, ...] = (0, 32, 64, 96, 128)  # steps of 32: llama.cpp pays per LoRA pair at decode
    factor_dtype: str = "float16"

    @property
    def equal_bytes(self) -> bool:
        return self.size_of is not None or self.bytes is not None


def check_llamacpp(model, config: LlamaCppConfig) -> None:
    if config.type not in FTYPES:
        raise ValueError(f"type {config.type!r} is not a llama.cpp quantization type; choose one of {', '.join(FTYPES)}")
    if config.size_of is not None and config.bytes is not None:
        raise ValueError("give one of size_of, bytes")
    if config.size_of is not None and config.size_of not in FTYPES:
        raise ValueError(f"size_of {config.size_of!r} is not a llama.cpp quantization type; choose one of {', '.join(FTYPES)}")
    for name in config.types:
        if name not in PURE_FTYPES:
            raise ValueError(f"types: {name!r} is not a ggml type on offer; choose from {', '.join(PURE_FTYPES)}")
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
    if config.equal_bytes:
        return _equal_bytes(model, config, stats, names, importance, started, progress)
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


# ----------------------------------------------------------- equal bytes

# What a LoRA pair adds to adapter.gguf beyond its numbers: two tensor
# entries (name, shape, type, offset) and the data alignment after each.
LORA_PAIR_OVERHEAD = 192


def _equal_bytes(model, config: LlamaCppConfig, stats, names: dict[str, str], importance, started: float, progress: bool) -> list[LayerReport]:
    if stats is None:
        raise ValueError("a byte target (size_of, bytes) needs calibration statistics: the choice is by calibration output error")
    arch = gguf_arch(model.config)
    correctable = {n for n in names if n != arch.lm_head}  # llama.cpp's adapter corrects the decoder linears
    runs = [(PURE_FTYPES[t], True) for t in config.types]
    if config.size_of is not None:
        runs.append((config.size_of, False))
    if progress:
        print(f"factorport: llama.cpp quantizes the model to {', '.join(config.types)}{' with an importance matrix' if importance else ''}"
              + (f" and to {config.size_of} (the byte target)" if config.size_of else ""))
    tensors = _all_tensors(model)
    offered: dict[str, dict[str, np.ndarray]] = {tensor: {} for tensor in names.values()}  # gguf name -> {ggml type: blocks}
    target = config.bytes
    for (ftype, pure), blocks in zip(runs, quantize_each(tensors, hparams(model.config), runs, importance=importance)):
        if not pure:
            target = sum(data.nbytes for tensor, (_, data) in blocks.items() if tensor in offered)
        for tensor in offered:
            type_name, data = blocks[tensor]
            offered[tensor].setdefault(type_name, data)
    del tensors
    hulls, whitenings = {}, {}
    for name in tqdm(names, desc="equal bytes (types x ranks)", unit="tensor", disable=not progress):
        whitenings[name] = input_transform("whitened", stats.xtx(name), 0.0, 1e-6)
        ranks = config.correction_ranks if name in correctable else (0,)
        hulls[name] = lower_hull(_options(model.get_submodule(name), offered[names[name]], whitenings[name], ranks, config))
    chosen = choose_options(hulls, target)
    seconds = (time.perf_counter() - started) / len(names)
    dtype = getattr(torch, config.factor_dtype)
    reports = []
    for name, tensor in names.items():
        option, linear = chosen[name], model.get_submodule(name)
        base = GGMLBase(torch.from_numpy(offered[tensor][option.base].copy()), option.base, linear.in_features)
        u = projection = None
        if option.rank:
            p, s, right, _ = stacked_error_svd([linear.weight.detach()], [base.to_dense()], whitenings[name], False)
            u, v = truncate(p, s, right, option.rank, dtype)
            projection, _, _ = attach_projection(model, (name,), v, "llamacpp")
        new = CompressedLinear(linear.in_features, linear.out_features, base, u, projection, None, linear.bias)
        report = LayerReport.compare(name, linear, new, output_error(linear.weight, new.to_dense(), stats.xtx(name)), seconds, step="llamacpp")
        report.operator = f"llama.cpp {option.base}{', imatrix' if importance and tensor in importance else ''}, correction rank {option.rank}"
        replace_linear(model, name, new)
        reports.append(report)
    if progress:
        spent = sum(o.bytes for o in chosen.values())
        held = Counter(o.base for o in chosen.values())
        print(f"factorport: llama.cpp types {', '.join(f'{k} x{v}' for k, v in held.most_common())}; "
              f"{sum(1 for o in chosen.values() if o.rank)} corrections; {spent / 1e6:.2f} of {target / 1e6:.2f} MB")
    return reports


def _options(linear, offered: dict[str, np.ndarray], whitening, ranks, config: LlamaCppConfig) -> list[Option]:
    """(type, rank, bytes, relative output error) for every type on offer and rank."""
    weight = linear.weight.detach().double()
    reference = float(whitening.apply(weight).pow(2).sum())
    factor_bytes = torch.empty(0, dtype=getattr(torch, config.factor_dtype)).element_size()
    options = []
    for type_name, blocks in offered.items():
        error = weight - GGMLBase(torch.from_numpy(blocks), type_name, linear.in_features).to_dense().double()
        if any(ranks):  # left after a correction of rank r: the σ² beyond r
            left = torch.linalg.svdvals(whitening.apply(error)).pow(2).flip(0).cumsum(0).flip(0).tolist() + [0.0]
        else:
            left = [float(whitening.apply(error).pow(2).sum())]
        for rank in ranks:
            if rank >= len(left):
                continue
            cost = blocks.nbytes + (rank * sum(weight.shape) * factor_bytes + LORA_PAIR_OVERHEAD if rank else 0)
            options.append(Option(type_name, rank, cost, left[rank] / max(reference, 1e-30)))
    return options
