"""Hugging Face module names -> llama.cpp's GGUF tensor names, and the row
order llama.cpp expects for rotary projections.

Each family's llama.cpp architecture and tensor stems are in its
`architectures` entry; this module turns them into tensor names. llama.cpp's
`llama` graph (which also runs Mistral) interleaves the two rotary halves of
each q/k head; `qwen2` keeps Hugging Face's order.
"""

from __future__ import annotations

import numpy as np
import torch

from ..architectures import ARCHITECTURES, ArchSpec, arch_for
from ..errors import FactorportError

TOKEN_EMBEDDING = "token_embd.weight"
OUTPUT = "output.weight"
OUTPUT_NORM = "output_norm.weight"
ROPE_FREQS = "rope_freqs.weight"


def gguf_arch(config) -> ArchSpec:
    """The model's architecture entry, if llama.cpp runs the family."""
    arch = arch_for(config)  # unsupported architectures fail with the usual message
    if arch.gguf_arch is None:
        supported = ", ".join(k for k, a in ARCHITECTURES.items() if a.gguf_arch is not None)
        raise FactorportError(f"GGUF export does not support {config.model_type}; supported: {supported}")
    return arch


def linear_tensor(name: str, arch: ArchSpec) -> str:
    """GGUF name (without .weight) of a decoder linear or the output projection, by module path."""
    if name == arch.lm_head:
        return "output"
    rest = name.removeprefix(arch.layers + ".")
    index, _, rel = rest.partition(".")
    if rel not in arch.gguf_linears or not index.isdigit():
        raise FactorportError(f"{name} has no GGUF tensor name; only decoder linears and lm_head are exported")
    return f"blk.{index}.{arch.gguf_linears[rel]}"


def norm_weights(model) -> dict[str, torch.Tensor]:
    """{GGUF name: scale} of every norm: each layer's, then the final one.
    llama.cpp multiplies by the stored tensor, so a family whose norms scale
    by 1 + weight (Gemma) stores 1 + weight."""
    arch = gguf_arch(model.config)
    norms = {}
    for i, layer in enumerate(model.get_submodule(arch.layers)):
        for rel, stem in arch.gguf_norms.items():
            norms[f"blk.{i}.{stem}.weight"] = layer.get_submodule(rel).weight
    norms[OUTPUT_NORM] = model.get_submodule(arch.norm).weight
    if arch.norm_offset:
        norms = {name: weight.float() + arch.norm_offset for name, weight in norms.items()}
    return norms


def rotary_heads(name: str, config) -> int | None:
    """Number of heads whose rows llama.cpp wants interleaved, for q/k; else None."""
    if name.endswith("self_attn.q_proj"):
        return config.num_attention_heads
    if name.endswith("self_attn.k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def rotary_row_order(out_features: int, heads: int) -> np.ndarray:
    """Row index array: new row k comes from old row order[k]. Hugging Face
    keeps each head's rotary pairs in two halves, llama.cpp interleaves them."""
    half = out_features // heads // 2
    return np.arange(out_features).reshape(heads, 2, half).transpose(0, 2, 1).reshape(-1)


def row_order(name: str, out_features: int, config) -> np.ndarray | None:
    """The GGUF row order of linear `name`'s weight (None: Hugging Face's)."""
    heads = rotary_heads(name, config) if gguf_arch(config).gguf_interleave_rotary else None
    return None if heads is None else rotary_row_order(out_features, heads)
