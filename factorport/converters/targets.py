"""Choosing and replacing the linears a recipe step works on.

The layer-by-layer pipeline narrows every step to one decoder layer (or the
output projection) with `scope(names)`: inside it, `compressible_linears`
returns only those names, so a step written for the whole model works on
one layer unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

from torch import nn

from ..architectures import arch_for, embedding_scale, linear_names, select
from ..errors import FactorportError
from ..ops import CompressedLinear, TiedEmbedding


_SCOPE: ContextVar[frozenset[str] | None] = ContextVar("scope", default=None)


@contextmanager
def scope(names):
    """Steps inside see only the linears `names` (a layer's, or the lm_head)."""
    token = _SCOPE.set(frozenset(names))
    try:
        yield
    finally:
        _SCOPE.reset(token)


def in_scope(name: str) -> bool:
    current = _SCOPE.get()
    return current is None or name in current


def compressible_linears(model, patterns) -> list[str]:
    """Names of the linears matched by `patterns` (see `architectures.select`),
    within the current scope. Matching nothing is an error for the whole
    model; inside a scope it only means the step has nothing to do here."""
    arch = arch_for(model.config)
    names = select(linear_names(model, arch), list(patterns), arch)
    if not names:
        raise FactorportError(f"targets {list(patterns)} match no linear of this model; check the patterns")
    return [n for n in names if in_scope(n)]


def is_tied(model) -> bool:
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    return isinstance(embed, TiedEmbedding) or (
        isinstance(head, nn.Linear) and isinstance(embed, nn.Embedding) and head.weight is embed.weight
    )


def replace_linear(model, name: str, new: CompressedLinear) -> None:
    """Put `new` where `name` was. Replacing the tied output projection also
    re-points the token embedding at it, so the table is stored once."""
    arch = arch_for(model.config)
    tied = name == arch.lm_head and is_tied(model)
    model.set_submodule(name, new)
    if tied:
        old = model.get_input_embeddings()
        model.set_input_embeddings(TiedEmbedding(new, getattr(old, "padding_idx", None), embedding_scale(model.config)))

