"""How far a backend's logits are from the torch reference's, on the same
token windows. Accumulated window by window so only one window's logits
(~100 MB for 512 x 49152 fp32) is held at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ParityAccumulator:
    """Feed (reference, backend, ids) per window; read the metrics at the end."""

    max_abs_diff: float = 0.0
    max_abs_reference: float = 0.0
    sum_abs_diff: float = 0.0
    sum_kl: float = 0.0
    top1_equal: int = 0
    positions: int = 0
    logits_seen: int = 0
    nll_reference: float = 0.0
    nll_backend: float = 0.0
    predicted: int = 0

    def add(self, reference: torch.Tensor, backend: torch.Tensor, ids: torch.Tensor) -> None:
        reference, backend = reference.float(), backend.float()
        if reference.shape != backend.shape:
            raise ValueError(f"logit shapes differ: reference {tuple(reference.shape)}, backend {tuple(backend.shape)}")
        diff = (reference - backend).abs()
        self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))
        self.max_abs_reference = max(self.max_abs_reference, float(reference.abs().max()))
        self.sum_abs_diff += float(diff.sum(dtype=torch.float64))
        self.logits_seen += diff.numel()
        log_p = torch.log_softmax(reference, dim=-1)
        log_q = torch.log_softmax(backend, dim=-1)
        self.sum_kl += float((log_p.exp() * (log_p - log_q)).sum(dtype=torch.float64))
        self.top1_equal += int((reference.argmax(-1) == backend.argmax(-1)).sum())
        self.positions += reference.shape[0]
        targets = ids[1:].long()
        self.nll_reference += float(torch.nn.functional.nll_loss(log_p[:-1], targets, reduction="sum"))
        self.nll_backend += float(torch.nn.functional.nll_loss(log_q[:-1], targets, reduction="sum"))
        self.predicted += targets.numel()

    def metrics(self) -> dict[str, float]:
        ppl_reference = math.exp(self.nll_reference / self.predicted)
        ppl_backend = math.exp(self.nll_backend / self.predicted)
        return {
            "perplexity": ppl_backend,
            "reference_perplexity": ppl_reference,
            "perplexity_rel_diff": abs(ppl_backend - ppl_reference) / ppl_reference,
            "max_abs_logit_diff": self.max_abs_diff,
            "max_abs_logit_diff_rel": self.max_abs_diff / max(self.max_abs_reference, 1e-30),
            "mean_abs_logit_diff": self.sum_abs_diff / self.logits_seen,
            "mean_kl": self.sum_kl / self.positions,
            "top1_agreement": self.top1_equal / self.positions,
        }
