"""The torch backend: the compressed reference every other backend is compared with."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from . import Generation, hf_text_start


class TorchBackend:
    name = "torch"

    def __init__(self, model, tokenizer=None, load_seconds: float = 0.0) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.load_seconds = load_seconds

    @classmethod
    def open(cls, artifact: Path, threads: int | None = None) -> "TorchBackend":
        from ...formats import safetensors_dir

        if threads:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        model, tokenizer = safetensors_dir.load(Path(artifact))
        return cls(model, tokenizer, time.perf_counter() - started)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_start(self) -> list[int]:
        return hf_text_start(self.tokenizer)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(seq_len, vocab) float32 logits for one window of token ids."""
        return self.model(input_ids=torch.as_tensor(ids).reshape(1, -1), use_cache=False).logits[0].float()

    @torch.inference_mode()
    def generate(self, ids: Sequence[int], new_tokens: int) -> Generation:
        """Greedy decoding with the HF KV cache, one forward per token, timed."""
        input_ids = torch.tensor([list(ids)])
        started = time.perf_counter()
        out = self.model(input_ids=input_ids, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        result = Generation([token], time.perf_counter() - started)
        past = out.past_key_values
        for _ in range(new_tokens - 1):
            started = time.perf_counter()
            out = self.model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            token = int(out.logits[0, -1].argmax())
            past = out.past_key_values
            result.decode_seconds.append(time.perf_counter() - started)
            result.tokens.append(token)
        return result
