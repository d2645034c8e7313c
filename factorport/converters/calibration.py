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

    def xtx(self, name: str, sink_weight: float = 1.0) -> torch.Tensor:
        """XᵀX of a linear's input, the first token of each sequence counted `sink_weight` times."""
        key = self.key_of[name]
        gram = self.grams[key]
        if sink_weight == 1.0 or key not in self.first_tokens:
            return gram
        first = self.first_tokens[key].double()
        return gram + (sink_weight - 1.0) * (first.T @ first)

    def channel_norms(self, name: str) -> torch.Tensor:
        return self.xtx(name).diagonal().clamp_min(0).sqrt()

    def has(self, name: str) -> bool:
        return name in self.key_of


@dataclass(frozen=True)
class CalibrationConfig:
    source: str  # a local text file, or a datasets id "name[:config[:split]]"
    samples: int = 128
    seq_len: int = 512


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


@torch.inference_mode()
def calibrate(model, tokenizer, config: CalibrationConfig, progress: bool = True) -> CalibrationStats:
    """Run the calibration text through `model` and collect XᵀX for every linear input."""
    start = time.perf_counter()
    arch = arch_for(model.config)
    sequences = token_sequences(tokenizer, config.source, config.samples, config.seq_len)
    present = set(linear_names(model, arch))
    # Every buffer is allocated once, before the first forward, and filled in
    # place: long-lived tensors allocated between the forwards' temporaries
    # fragment the heap, and resident memory then grew ~500 MB per sequence.
    grams: dict[str, torch.Tensor] = {}
    scratch: dict[str, torch.Tensor] = {}
    first: dict[str, torch.Tensor] = {}
    key_of: dict[str, str] = {}
    hooks = []
    count = {"seq": 0}
    for group in input_groups(model, arch):
        group = [n for n in group if n in present]
        if not group:
            continue
        key = group[0]
        for name in group:
            key_of[name] = key
        width = model.get_submodule(key).in_features
        grams[key] = torch.zeros(width, width, dtype=torch.float64)
        scratch[key] = torch.empty(width, width)
        first[key] = torch.empty(len(sequences), width)

        def hook(module, args, key=key):
            hidden = args[0].detach()
            x = hidden.reshape(-1, hidden.shape[-1]).float()
            torch.mm(x.T, x, out=scratch[key])
            grams[key] += scratch[key]
            first[key][count["seq"]] = hidden[0, 0]

        hooks.append(model.get_submodule(key).register_forward_pre_hook(hook))
    try:
        for i, seq in enumerate(tqdm(sequences, desc="calibrate", unit="seq", disable=not progress)):
            count["seq"] = i
            model(input_ids=seq, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return CalibrationStats(
        grams=grams,
        key_of=key_of,
        first_tokens=first,
        tokens=sum(s.numel() for s in sequences),
        source=f"{config.source} ({len(sequences)}x{config.seq_len} tokens)",
        seconds=time.perf_counter() - start,
    )
