"""Tolerances derived from the arithmetic, so that no test's verdict depends
on how one CPU's kernels order their sums.

A product of matrices computed in floating point differs from the exact one
by at most gamma_n * (|A| @ |B| @ ...) element by element, where n is the
total reduction length and gamma_n = n*u / (1 - n*u) with u the unit
roundoff (Higham, "Accuracy and Stability of Numerical Algorithms", 3.5).
That holds for any summation order, blocking or FMA use, so two computations
of the same product differ by at most twice that.

A whole network is no single product; `network_tolerance` bounds the
relative drift of its logits by the reduction lengths along one token's path,
times the layer count, a bound generous against rounding and still far below
what a wrong weight, order or mask does (errors of 1e-2 and more).
"""

from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    nu = n * unit_roundoff(dtype)
    return nu / (1 - nu)


def product_bound(*factors: torch.Tensor) -> torch.Tensor:
    """|f0| @ |f1| @ ... in float64: the magnitude the rounding error scales with."""
    bound = factors[0].detach().double().abs()
    for f in factors[1:]:
        bound = bound @ f.detach().double().abs()
    return bound


def assert_product_close(actual: torch.Tensor, expected: torch.Tensor, *factors: torch.Tensor, extra: torch.Tensor | float = 0.0) -> None:
    """`actual` and `expected` are two computations of factors[0] @ factors[1] @ ...
    (plus `extra`, e.g. a bias, added once): assert they agree within twice
    the rounding bound of that product in `actual`'s dtype."""
    n = sum(f.shape[-2] for f in factors[1:])  # the inner dimension of each product
    magnitude = product_bound(*factors) + torch.as_tensor(extra).double().abs()
    tolerance = 2 * gamma(n + 1, actual.dtype) * magnitude  # +1: the final addition
    diff = (actual.double() - expected.double()).abs()
    worst = float((diff - tolerance).max())
    assert worst <= 0, f"differs by more than the rounding bound (max excess {worst:.3g}, max diff {float(diff.max()):.3g})"


def network_tolerance(config, seq_len: int, dtype: torch.dtype = torch.float32) -> float:
    """A relative bound (of the largest logit) on the rounding drift between two
    correct computations of a decoder's logits: every reduction on one
    token's path (q/k/v, attention over `seq_len`, o, gate/up, down, head)
    per layer, over all layers."""
    hidden, ffn = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_layer = hidden + head_dim + seq_len + heads * head_dim + hidden + ffn
    n = per_layer * config.num_hidden_layers + hidden
    return 2 * gamma(n, dtype) * config.num_hidden_layers
