"""How far a backend's logits are from the torch reference's, on the same
token windows. Accumulated window by window so only one window's logits
(~100 MB for 512 x 49152 fp32) is held at a time."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# A backend's top-1 that differs from the reference's still agrees when the
# reference scores it within this fraction of the window's largest |logit| of
# its own best: two fp32 programs summing in different orders flip such
# near-ties (Gemma-3-270M on onnxruntime: 1 of 1024 positions) and neither
# pick is wrong. The count of such positions is reported as top1_near_ties.
TIE_TOLERANCE = 1e-5


@dataclass
class ParityAccumulator:
    """Feed (reference, backend, ids) per window; read the metrics at the end."""

    max_abs_diff: float = 0.0
    max_abs_reference: float = 0.0
    sum_abs_diff: float = 0.0
    sum_kl: float = 0.0
    top1_equal: int = 0
    top1_near_ties: int = 0
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
        self._add_top1(reference, backend)
        self.positions += reference.shape[0]
        targets = ids[1:].long()
        self.nll_reference += float(torch.nn.functional.nll_loss(log_p[:-1], targets, reduction="sum"))
        self.nll_backend += float(torch.nn.functional.nll_loss(log_q[:-1], targets, reduction="sum"))
        self.predicted += targets.numel()

    def _add_top1(self, reference: torch.Tensor, backend: torch.Tensor) -> None:
        best, picked = reference.max(-1), backend.argmax(-1)
        equal = best.indices == picked
        gap = best.values - reference.gather(-1, picked[:, None]).squeeze(-1)
        near_tie = ~equal & (gap <= TIE_TOLERANCE * float(reference.abs().max()))
        self.top1_equal += int(equal.sum()) + int(near_tie.sum())
        self.top1_near_ties += int(near_tie.sum())

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
            "top1_near_ties": self.top1_near_ties,
        }
