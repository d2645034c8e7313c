"""The torch backend: the compressed reference every other backend is compared with."""

from __future__ import annotations

import torch


class TorchBackend:
    name = "torch"

    def __init__(self, model) -> None:
        self.model = model.eval()

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """(seq_len, vocab) float32 logits for one window of token ids."""
        return self.model(input_ids=ids.reshape(1, -1), use_cache=False).logits[0].float()
