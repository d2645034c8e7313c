"""Hugging Face module names -> llama.cpp's GGUF tensor names, and the row
order llama.cpp expects for rotary projections.

llama.cpp's `llama` architecture (which also runs Mistral) and `qwen2` use the
same block tensor names; they differ in the rotary layout of q/k rows (llama
interleaves the two halves of each head, qwen2 keeps Hugging Face's order) and
in biases (qwen2 has q/k/v biases).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...architectures import ArchSpec, arch_for
from ...errors import FactorportError

# per-layer linear (relative to the layer) -> GGUF tensor stem
LINEAR_STEMS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
NORM_STEMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
TOKEN_EMBEDDING = "token_embd.weight"
OUTPUT = "output.weight"
OUTPUT_NORM = "output_norm.weight"


@dataclass(frozen=True)
class GGUFArch:
    """How one Hugging Face model type is written for stock llama.cpp."""

    name: str  # general.architecture
    interleave_rotary: bool  # q/k rows permuted into llama.cpp's rotary layout


GGUF_ARCHS = {
    "llama": GGUFArch("llama", interleave_rotary=True),
    "mistral": GGUFArch("llama", interleave_rotary=True),
    "qwen2": GGUFArch("qwen2", interleave_rotary=False),
}


def gguf_arch(config) -> GGUFArch:
    arch_for(config)  # unsupported architectures fail with the usual message
    if config.model_type not in GGUF_ARCHS:
        raise FactorportError(f"GGUF export does not support {config.model_type}; supported: {', '.join(GGUF_ARCHS)}")
    return GGUF_ARCHS[config.model_type]


def linear_tensor(name: str, arch: ArchSpec) -> str:
    """GGUF name (without .weight) of a linear given by its module path."""
    if name == arch.lm_head:
        return "output"
    rest = name.removeprefix(arch.layers + ".")
    index, _, rel = rest.partition(".")
    if rel not in LINEAR_STEMS or not index.isdigit():
        raise FactorportError(f"{name} has no GGUF tensor name; only decoder linears and lm_head are exported")
    return f"blk.{index}.{LINEAR_STEMS[rel]}"


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


def row_order(name: str, out_features: int, config, garch: GGUFArch) -> np.ndarray | None:
    heads = rotary_heads(name, config) if garch.interleave_rotary else None
    return None if heads is None else rotary_row_order(out_features, heads)
