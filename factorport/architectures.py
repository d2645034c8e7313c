"""Per-architecture knowledge, in one table (as Optimum keeps its exporters).

Everything else in factorport asks this table which modules are the linears
of a decoder layer, which of them read the same input (and so may share a
low-rank factor), where the embedding and output projection live, and what
llama.cpp calls the family and its tensors (`factorport.llamacpp` builds the
GGUF names from these).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from .errors import FactorportError


class UnsupportedArchitecture(FactorportError):
    pass


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    layers: str  # attribute path of the decoder layer list
    linears: tuple[str, ...]  # per layer, relative to the layer
    input_groups: tuple[tuple[str, ...], ...]  # linears of one layer that read the same tensor
    embed: str
    lm_head: str
    qkv_bias: bool
    decoder: str = "model"  # the module that takes attention_mask and position_ids
    norm: str = "model.norm"  # the final norm, between the last layer and lm_head
    attention: str = "self_attn"  # per layer
    rotary: str = "rotary_emb"  # relative to the decoder: (x, position_ids) -> cos, sin
    # RMS norms over each head of q and of k, before rotary (relative to the attention)
    qk_norms: tuple[str, str] | None = None
    # the projections of q, k and v (relative to the attention): three linears,
    # or one whose output rows are q's, then k's, then v's
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    # RMS norms scale by norm_offset + weight (Gemma: 1 + weight)
    norm_offset: float = 0.0
    # the token embedding's rows are multiplied by sqrt(hidden size) (Gemma)
    embedding_scaled: bool = False
    # whether its tokenizers may carry the pre-tokenizer regex Mistral fixed
    # (transformers >= 4.57.3 then decides, and warns, for itself)
    mistral_regex: bool = False
    # llama.cpp: its architecture name (general.architecture; None: no GGUF
    # export), whether q/k rows go into its interleaved rotary order (its
    # `llama` graph; `qwen2` keeps Hugging Face's), and the block tensor stem
    # of each linear and norm (relative to the layer)
    gguf_arch: str | None = None
    gguf_interleave_rotary: bool = False
    gguf_linears: Mapping[str, str] = field(default_factory=dict)
    gguf_norms: Mapping[str, str] = field(default_factory=dict)


_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


_LLAMA_GGUF_LINEARS = MappingProxyType(dict(zip(_LLAMA_LINEARS, ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"))))
_LLAMA_GGUF_NORMS = MappingProxyType({"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"})


def _llama_family(model_type: str, gguf_arch: str, qkv_bias: bool = False, mistral_regex: bool = False, qk_norms: bool = False,
                  norms: dict[str, str] | None = None, **particular) -> ArchSpec:
    """Llama's layer layout; `norms` replaces its GGUF norm names, `particular` sets other fields."""
    gguf_norms = dict(norms or _LLAMA_GGUF_NORMS)
    if qk_norms:
        gguf_norms.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    return ArchSpec(
        model_type=model_type,
        layers="model.layers",
        linears=_LLAMA_LINEARS,
        input_groups=_LLAMA_GROUPS,
        embed="model.embed_tokens",
        lm_head="lm_head",
        qkv_bias=qkv_bias,
        mistral_regex=mistral_regex,
        qk_norms=("q_norm", "k_norm") if qk_norms else None,
        gguf_arch=gguf_arch,
        gguf_interleave_rotary=gguf_arch == "llama",
        gguf_linears=_LLAMA_GGUF_LINEARS,
        gguf_norms=MappingProxyType(gguf_norms),
        **particular,
    )


def _phi3() -> ArchSpec:
    """Phi-3: q/k/v one linear (`qkv_proj`), gate and up one linear
    (`gate_up_proj`, gate's rows first). Each fused linear is kept whole, so a
    layer has four linears, each its own input group; llama.cpp's phi3 reads
    them fused too (attn_qkv, ffn_up of 2 x ffn rows)."""
    linears = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    return ArchSpec(
        model_type="phi3",
        layers="model.layers",
        linears=linears,
        input_groups=tuple((name,) for name in linears),
        embed="model.embed_tokens",
        lm_head="lm_head",
        qkv_bias=False,
        qkv=("qkv_proj",),
        gguf_arch="phi3",
        gguf_linears=MappingProxyType(dict(zip(linears, ("attn_qkv", "attn_output", "ffn_up", "ffn_down")))),
        gguf_norms=_LLAMA_GGUF_NORMS,
    )


# Gemma 3 (text): four norms a layer (before and after attention and MLP),
# each scaling by 1 + weight; sliding-window layers between global ones; an
# embedding scaled by sqrt(hidden)
_GEMMA3_GGUF_NORMS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _llama_family("llama", "llama"),
    "mistral": _llama_family("mistral", "llama", mistral_regex=True),  # llama.cpp runs Mistral as llama
    "qwen2": _llama_family("qwen2", "qwen2", qkv_bias=True),
    "qwen3": _llama_family("qwen3", "qwen3", qk_norms=True),  # no q/k/v bias; head size set apart from the width
    "phi3": _phi3(),
    "gemma3_text": _llama_family("gemma3_text", "gemma3", qk_norms=True, norms=_GEMMA3_GGUF_NORMS, norm_offset=1.0, embedding_scaled=True),
}


def tokenizer_options(model_type: str | None) -> dict:
    """Keyword arguments for `AutoTokenizer.from_pretrained` of a saved model of
    this family. transformers 4.57.3+ warns that every local tokenizer of over
    100k tokens (Llama 3's, Qwen's) saved by a 4.57 release "has an incorrect
    regex pattern" unless told otherwise; only Mistral's ever had one."""
    spec = ARCHITECTURES.get(model_type)
    return {} if spec is None or spec.mistral_regex else {"fix_mistral_regex": False}


def arch_for(config) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"architecture '{model_type}' is not supported; supported: {supported}"
        )
    return ARCHITECTURES[model_type]


def embedding_scale(config) -> float:
    """What the family multiplies embedding rows by: sqrt(hidden) as a float32,
    as Gemma's embedding computes it, or 1."""
    if not arch_for(config).embedding_scaled:
        return 1.0
    return float(np.float32(config.hidden_size**0.5))


def layer_count(model, arch: ArchSpec) -> int:
    return len(model.get_submodule(arch.layers))


def linear_names(model, arch: ArchSpec, include_lm_head: bool = True) -> list[str]:
    """Every compressible linear of the model, in execution order."""
    names = [
        f"{arch.layers}.{i}.{rel}" for i in range(layer_count(model, arch)) for rel in arch.linears
    ]
    return names + [arch.lm_head] if include_lm_head else names


def input_groups(model, arch: ArchSpec) -> list[tuple[str, ...]]:
    """Linears grouped by the tensor they read, layer by layer; lm_head alone."""
    groups = [
        tuple(f"{arch.layers}.{i}.{rel}" for rel in group)
        for i in range(layer_count(model, arch))
        for group in arch.input_groups
    ]
    return groups + [(arch.lm_head,)]


def select(names: list[str], patterns: list[str], arch: ArchSpec) -> list[str]:
    """Names matching any glob pattern. `linears` means every decoder linear;
    `lm_head` means the output projection."""
    chosen = []
    for name in names:
        for pattern in patterns:
            if pattern == "linears":
                hit = name != arch.lm_head
            elif pattern == "lm_head":
                hit = name == arch.lm_head
            else:
                hit = fnmatch.fnmatchcase(name, pattern)
            if hit:
                chosen.append(name)
                break
    return chosen
