"""Calibration: stream token sequences through the model and keep, for every
distinct linear input, its second moment XᵀX (float64, summed over tokens).

Linears that read the same tensor (q/k/v, gate/up) share one matrix. Only the
running sums are kept, so peak memory does not grow with the number of
sequences. Per-channel activation norms are the square roots of XᵀX's diagonal.

The first token of every sequence is also kept on its own (N vectors per
input, so still independent of N in all but that small matrix): it is the
attention sink, which most heads attend to, and steps may weight it more
(`xtx(name, sink_weight)`; see `quantize.QuantizeConfig.sink_weight`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from ..architectures import arch_for, input_groups, linear_names
from ..errors import FactorportError


@dataclass
class CalibrationStats:
    grams: dict[str, torch.Tensor]  # input key -> XᵀX (in, in) float64, every token once
    key_of: dict[str, str]  # linear name -> input key
    tokens: int
    first_tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # input key -> (sequences, in)
    source: str = ""
    seconds: float = 0.0
    # mode asymmetric: input key -> (X_dense - X)ᵀX (in, in) float64, X_dense the
    # same tokens' input in the uncompressed model
    shifts: dict[str, torch.Tensor] = field(default_factory=dict)

    def xtx(self, name: str, sink_weight: float = 1.0) -> torch.Tensor:
        """XᵀX of a linear's input, the first token of each sequence counted `sink_weight` times."""
        key = self.key_of[name]
        gram = self.grams[key]
        if sink_weight == 1.0 or key not in self.first_tokens:
            return gram
        first = self.first_tokens[key].double()
        return gram + (sink_weight - 1.0) * (first.T @ first)

    def hessian(self, name: str, sink_weight: float = 1.0) -> torch.Tensor:
        """`xtx` as a new float32 matrix, for the sweeps (GPTQ, SparseGPT) that
        work in float32 and may change it in place: a 14336-wide input's XᵀX is
        0.8 GB in float32, and no float64 temporary is made."""
        key = self.key_of[name]
        h = self.grams[key].float()
        if sink_weight != 1.0 and key in self.first_tokens:
            first = self.first_tokens[key].float()
            h.addmm_(first.T, first, alpha=sink_weight - 1.0)
        return h

    def channel_norms(self, name: str) -> torch.Tensor:
        return self.xtx(name).diagonal().clamp_min(0).sqrt()

    def has(self, name: str) -> bool:
        return name in self.key_of

    def input_sums(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Each of `names`' Σ over the tokens of x² per input column (XᵀX's
        diagonal, float32 on the CPU): what llama.cpp calls an importance matrix."""
        return {n: self.grams[self.key_of[n]].diagonal().float().clamp_min(0).cpu() for n in names if self.has(n)}


@dataclass(frozen=True)
class CalibrationConfig:
    source: str  # a local text file, or a datasets id "name[:config[:split]]"
    samples: int = 128
    seq_len: int = 512
    # sequential: each layer's statistics come from the inputs the already
    # compressed layers produce (GPTQ's reference, llm-compressor); parallel:
    # every layer's from the uncompressed model; asymmetric: sequential
    # inputs, and each linear aims at the uncompressed model's output on the
    # same tokens (GPTAQ) instead of its own dense output on the inputs it gets.
    mode: str = "sequential"


MODES = ("sequential", "parallel", "asymmetric")


TEXT_SUFFIXES = (".txt", ".raw", ".tokens", ".md", ".text")


def _text_chunks(source: str) -> Iterator[str]:
    """Text in pieces of whole lines (~64 KB), from a file or a datasets id."""
    path = Path(source).expanduser()
    if path.exists() or source.startswith((".", "/", "~")) or path.suffix in TEXT_SUFFIXES:
        if not path.is_file():
            raise FactorportError(f"calibration text {source} does not exist; pass --calib with a text file")
        with open(path, encoding="utf-8", errors="replace") as fh:
            while lines := fh.readlines(1 << 16):
                yield "".join(lines)
        return
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise FactorportError("calibrating on a datasets id needs 'pip install datasets'") from exc
    name, config, split = (source.split(":") + [None, None])[:3]
    try:
        ds = datasets.load_dataset(name, config, split=split or "train", streaming=True)
    except Exception as exc:
        raise FactorportError(
            f"could not open calibration dataset '{source}' ({type(exc).__name__}); "
            "pass a local text file with --calib"
        ) from exc
    for row in ds:
        text = row.get("text", "")
        if text:
            yield text


def token_sequences(tokenizer, source: str, samples: int, seq_len: int) -> list[torch.Tensor]:
    """`samples` consecutive windows of `seq_len` tokens from the start of the text."""
    if samples < 1 or seq_len < 2:
        raise FactorportError(f"calibration needs samples >= 1 and seq_len >= 2, got {samples} x {seq_len}")
    need = samples * seq_len
    ids: list[int] = []
    for chunk in _text_chunks(source):
        ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if not ids:
        raise FactorportError(f"calibration text {source} is empty; pass a file with text in it")
    count = len(ids) // seq_len
    if count == 0:
        raise FactorportError(
            f"calibration text {source} has {len(ids)} tokens, fewer than one sequence of {seq_len}; "
            "pass more text or a smaller --calib-seq-len"
        )
    if count < samples:
        print(f"factorport: calibration text holds only {count} sequences of {seq_len} tokens (asked {samples})")
    count = min(count, samples)
    return [torch.tensor(ids[i * seq_len : (i + 1) * seq_len]).unsqueeze(0) for i in range(count)]


# sequences run together, at most this many tokens a forward: larger matrix
# products, and activations bounded whatever the number of sequences
BATCH_TOKENS = 2048


class GramCollector:
    """Forward pre-hooks that sum XᵀX (float64) of every distinct input of the
    linears `names`, and keep each sequence's first token (`sequence` says
    which sequence a forward starts at). Every buffer is
    allocated once, before the first forward, and filled in place: long-lived
    tensors allocated between the forwards' temporaries fragment the heap, and
    resident memory then grew ~500 MB per sequence."""

    def __init__(self, model, names, sequences: int, device: torch.device | str = "cpu", shifts: bool = False) -> None:
        arch = arch_for(model.config)
        wanted = set(names)
        self.grams: dict[str, torch.Tensor] = {}
        self.first: dict[str, torch.Tensor] = {}
        self.shifts: dict[str, torch.Tensor] = {}
        self.key_of: dict[str, str] = {}
        self.sequence = 0  # which sequence the next forward is
        # with shifts: a forward while `recording` keeps the uncompressed
        # model's inputs, the next (same tokens) counts (X_dense - X)ᵀX
        self.recording = False
        self._dense: dict[str, torch.Tensor] = {}
        self._scratch: dict[str, torch.Tensor] = {}
        self._hooks = []
        for group in input_groups(model, arch):
            group = [n for n in group if n in wanted]
            if not group:
                continue
            key = group[0]
            for name in group:
                self.key_of[name] = key
            width = model.get_submodule(key).in_features
            self.grams[key] = torch.zeros(width, width, dtype=torch.float64, device=device)
            self._scratch[key] = torch.empty(width, width, device=device)
            self.first[key] = torch.empty(sequences, width, device=device)
            if shifts:
                self.shifts[key] = torch.zeros(width, width, dtype=torch.float64, device=device)
            self._hooks.append(model.get_submodule(key).register_forward_pre_hook(self._hook(key)))

    def _hook(self, key: str):
        def hook(module, args):
            if self.recording:
                self._dense[key] = args[0].detach().float().clone()
            else:
                self.add(key, args[0])

        return hook

    def add(self, key: str, hidden: torch.Tensor) -> None:
        """Count `hidden` (sequences, tokens, width), sequences `self.sequence`
        onwards, as an input of `key`."""
        x = hidden.detach().reshape(-1, hidden.shape[-1]).float()
        torch.mm(x.T, x, out=self._scratch[key])
        self.grams[key] += self._scratch[key]
        self.first[key][self.sequence : self.sequence + hidden.shape[0]] = hidden[:, 0]
        if key in self.shifts:
            dense = self._dense.pop(key).reshape(x.shape)
            torch.mm((dense - x).T, x, out=self._scratch[key])
            self.shifts[key] += self._scratch[key]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._scratch.clear()

    def stats(self, tokens: int, source: str, seconds: float) -> CalibrationStats:
        self.close()
        return CalibrationStats(self.grams, self.key_of, tokens, self.first, source, seconds, self.shifts)


def describe_source(config: CalibrationConfig, sequences: list[torch.Tensor]) -> str:
    return f"{config.source} ({len(sequences)}x{config.seq_len} tokens)"


def calibrate(model, tokenizer, config: CalibrationConfig, progress: bool = True) -> CalibrationStats:
    """Run the calibration text through the whole `model` and collect XᵀX for every linear input."""
    sequences = token_sequences(tokenizer, config.source, config.samples, config.seq_len)
    return collect(model, sequences, describe_source(config, sequences), progress)


@torch.inference_mode()
def collect(model, sequences: list[torch.Tensor], source: str = "", progress: bool = True) -> CalibrationStats:
    """XᵀX of every linear input of the whole `model` (in memory) over token
    `sequences`: every layer's statistics from the uncompressed model."""
    start = time.perf_counter()
    collector = GramCollector(model, linear_names(model, arch_for(model.config)), len(sequences))
    batch = max(1, BATCH_TOKENS // sequences[0].shape[1]) if sequences else 1
    try:
        for i in tqdm(range(0, len(sequences), batch), desc="calibrate", unit="batch", disable=not progress):
            collector.sequence = i
            model(input_ids=torch.cat(sequences[i : i + batch]), use_cache=False)
    finally:
        collector.close()
    tokens = sum(s.numel() for s in sequences)
    return collector.stats(tokens, source, time.perf_counter() - start)
