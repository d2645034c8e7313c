"""Choosing and replacing the linears a recipe step works on."""

from __future__ import annotations

from torch import nn

from ..architectures import arch_for, linear_names, select
from ..errors import FactorportError
from ..ops import CompressedLinear, TiedEmbedding


def compressible_linears(model, patterns) -> list[str]:
    """Names of the linears matched by `patterns` (see `architectures.select`)."""
    arch = arch_for(model.config)
    names = select(linear_names(model, arch), list(patterns), arch)
    if not names:
        raise FactorportError(f"targets {list(patterns)} match no linear of this model; check the patterns")
    return names


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
        model.set_input_embeddings(TiedEmbedding(new, getattr(old, "padding_idx", None)))

