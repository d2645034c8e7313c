"""Perplexity on real text, the same way for every backend: the text is
tokenized once (no special tokens), cut into consecutive windows of
`seq_len` tokens (stride = seq_len), and every window is scored
independently; perplexity = exp(mean negative log-likelihood of all
predicted tokens)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..errors import FactorportError


def text_windows(tokenize: Callable[[str], list[int]], path: str | Path, windows: int, seq_len: int = 512) -> list[torch.Tensor]:
    """`tokenize(text)` is the runtime's own tokenizer (no special tokens):
    each backend scores the text as it would cut it."""
    path = Path(path)
    if not path.is_file():
        raise FactorportError(f"evaluation text {path} does not exist; pass --text FILE")
    text = path.read_text(encoding="utf-8", errors="replace")
    # Tokenize only as much text as the windows need (4 characters a token is generous).
    need = windows * seq_len
    ids = tokenize(text[: need * 8])
    if len(ids) < seq_len:
        raise FactorportError(f"evaluation text {path} holds fewer than {seq_len} tokens; pass a longer text")
    count = min(windows, len(ids) // seq_len)
    return [torch.tensor(ids[i * seq_len : (i + 1) * seq_len]) for i in range(count)]


def perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: list[torch.Tensor], progress: bool = True) -> float:
    """`logits_of(ids)` returns (seq_len, vocab) logits for one window of token ids."""
    nll, count = 0.0, 0
    for ids in tqdm(windows, desc="perplexity", unit="win", disable=not progress):
        logits = logits_of(ids).float()
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:].long(), reduction="sum"))
        count += ids.numel() - 1
    return math.exp(nll / count)
