"""Perplexity on real text, the same way for every backend: the text is
tokenized once (no special tokens), cut into consecutive windows of
`seq_len` tokens (stride = seq_len; each begins with the BOS when the
runtime's tokenizer puts one before a text, as Gemma's does, and then holds
that many fewer text tokens), and every window is scored independently;
perplexity = exp(mean negative log-likelihood of all predicted tokens)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..errors import FactorportError


def text_windows(backend, path: str | Path, windows: int, seq_len: int = 512) -> list[torch.Tensor]:
    """The windows cut by `backend`'s own tokenizer (a validators.backends.Backend):
    each backend scores the text as it would cut it."""
    path = Path(path)
    if not path.is_file():
        raise FactorportError(f"evaluation text {path} does not exist; pass --text FILE")
    text = path.read_text(encoding="utf-8", errors="replace")
    # Tokenize only as much text as the windows need (4 characters a token is generous).
    need = windows * seq_len
    ids, start = backend.tokenize(text[: need * 8]), backend.text_start()
    step = seq_len - len(start)
    if step < 1 or len(ids) < step:
        raise FactorportError(f"evaluation text {path} holds fewer than {seq_len} tokens; pass a longer text")
    count = min(windows, len(ids) // step)
    return [torch.tensor(start + ids[i * step : (i + 1) * step]) for i in range(count)]


def perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: list[torch.Tensor], progress: bool = True) -> float:
    """`logits_of(ids)` returns (seq_len, vocab) logits for one window of token ids."""
    nll, count = 0.0, 0
    for ids in tqdm(windows, desc="perplexity", unit="win", disable=not progress):
        logits = logits_of(ids).float()
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[1:].long(), reduction="sum"))
        count += ids.numel() - 1
    return math.exp(nll / count)
