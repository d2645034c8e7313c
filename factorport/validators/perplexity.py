"""Perplexity on real text, the same way for every backend: the text is
tokenized once (no special tokens), cut into consecutive windows of
`seq_len` tokens (stride = seq_len; each begins with the BOS when the
runtime's tokenizer puts one before a text, as Gemma's does, and then holds
that many fewer text tokens), and every window is scored independently;
perplexity = exp(mean negative log-likelihood of all predicted tokens).

`llama_perplexity_protocol` is instead `llama-perplexity -c n_ctx`'s protocol,
to check this code against llama.cpp's own tool on the very tokens it scores."""

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


def llama_perplexity_protocol(backend, path: str | Path, chunks: int, n_ctx: int = 512) -> float:
    """`backend`'s perplexity as `llama-perplexity -c n_ctx --chunks N` computes
    it: the second half of each chunk scored (`_llama_perplexity_chunks`)."""
    return perplexity(backend.logits, _llama_perplexity_chunks(backend, path, chunks, n_ctx), progress=False, first=n_ctx // 2)


def _llama_perplexity_chunks(backend, path: str | Path, chunks: int, n_ctx: int) -> list[torch.Tensor]:
    """The chunks `llama-perplexity` scores: the text read byte for byte and
    tokenized whole after the runtime's start (its BOS, if it adds one), cut
    into consecutive n_ctx pieces, each piece's first token then replaced by
    that BOS."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")  # as llama-perplexity reads it: "\r\n" kept
    start = backend.text_start()
    ids = start + backend.tokenize(text[: chunks * n_ctx * 8])
    if len(ids) < chunks * n_ctx:
        raise FactorportError(f"evaluation text {path} holds fewer than {chunks} x {n_ctx} tokens; pass a longer text or fewer chunks")
    pieces = [torch.tensor(ids[i * n_ctx : (i + 1) * n_ctx]) for i in range(chunks)]
    for piece in pieces:
        piece[: len(start)] = torch.tensor(start)
    return pieces


def perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor], windows: list[torch.Tensor], progress: bool = True, first: int = 0) -> float:
    """`logits_of(ids)` returns (seq_len, vocab) logits for one window of token
    ids; the tokens after position `first` of each window are scored."""
    nll, count = 0.0, 0
    for ids in tqdm(windows, desc="perplexity", unit="win", disable=not progress):
        logits = logits_of(ids).float()
        nll += float(torch.nn.functional.cross_entropy(logits[first:-1], ids[first + 1 :].long(), reduction="sum"))
        count += ids.numel() - 1 - first
    return math.exp(nll / count)
