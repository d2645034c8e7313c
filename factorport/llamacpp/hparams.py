"""The `{arch}.*` hyper-parameter keys llama.cpp reads to build a model's
graph, and its per-dimension rotary frequency factors (`rope_freqs`)."""

from __future__ import annotations

import torch

from ..errors import FactorportError
from .names import gguf_arch

# llama.cpp's graphs that read rope_freqs.weight (src/models/llama.cpp)
ROPE_FREQS_ARCHS = ("llama",)
# ... and those whose linear scaling is the key rope.scaling.factor, applied to
# the global layers only (llama.cpp's gemma3 fixes the sliding layers' scale
# at 1, as transformers' Gemma 3 gives them an unscaled rotary of their own)
ROPE_LINEAR_ARCHS = ("gemma3",)

CONTEXT_DEFAULT = 2048  # when the config names no maximum position


def hparams(config) -> dict:
    a = gguf_arch(config).gguf_arch
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    meta = {
        "general.architecture": a,
        f"{a}.block_count": config.num_hidden_layers,
        f"{a}.context_length": getattr(config, "max_position_embeddings", None) or CONTEXT_DEFAULT,
        f"{a}.embedding_length": config.hidden_size,
        f"{a}.feed_forward_length": config.intermediate_size,
        f"{a}.attention.head_count": heads,
        f"{a}.attention.head_count_kv": getattr(config, "num_key_value_heads", None) or heads,
        f"{a}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{a}.rope.freq_base": float(getattr(config, "rope_theta", 10000.0)),
        f"{a}.rope.dimension_count": head_dim,
        f"{a}.vocab_size": config.vocab_size,
    }
    if head_dim != config.hidden_size // heads:
        meta[f"{a}.attention.key_length"] = head_dim
        meta[f"{a}.attention.value_length"] = head_dim
    if a == "gemma3":
        meta.update(_gemma3(config, head_dim))
    scaling = getattr(config, "rope_scaling", None) or {}
    if a in ROPE_LINEAR_ARCHS and scaling.get("rope_type") == "linear":
        meta[f"{a}.rope.scaling.type"] = "linear"
        meta[f"{a}.rope.scaling.factor"] = float(scaling["factor"])
    return meta


def _gemma3(config, head_dim: int) -> dict:
    """llama.cpp's gemma3 (src/models/gemma3.cpp): which layers slide and how
    far, the sliding layers' rotary base, the final soft cap. Its graph scales
    q by 1 / sqrt(head size) and has no attention soft cap."""
    if getattr(config, "query_pre_attn_scalar", head_dim) != head_dim or getattr(config, "attn_logit_softcapping", None):
        raise FactorportError(
            "GGUF export: llama.cpp's gemma3 scales q by 1/sqrt(head size) and caps no attention logits; "
            f"this config has query_pre_attn_scalar {config.query_pre_attn_scalar} and attn_logit_softcapping "
            f"{config.attn_logit_softcapping}; export ONNX or the safetensors layout"
        )
    sliding = [kind == "sliding_attention" for kind in config.layer_types]
    meta = {"gemma3.rope.freq_base_swa": float(config.rope_local_base_freq)}
    if any(sliding):
        meta["gemma3.attention.sliding_window"] = int(config.sliding_window)
        meta["gemma3.attention.sliding_window_pattern"] = sliding
    if getattr(config, "final_logit_softcapping", None):
        meta["gemma3.final_logit_softcapping"] = float(config.final_logit_softcapping)
    return meta


def rope_freqs(model) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs.weight` for a model whose rotary rescales each
    frequency once (Llama 3.1+'s `llama3`, `linear`): the factor each of its
    `head size / 2` frequencies is divided by, read off the model's own
    rotary module against the unscaled frequencies; None when unscaled or
    when the scaling travels as keys (`hparams`). Scalings llama.cpp would
    compute otherwise are refused."""
    arch = gguf_arch(model.config)
    rotary = model.get_submodule(f"{arch.decoder}.{arch.rotary}")
    kind = getattr(rotary, "rope_type", "default")
    if kind == "default" or (kind == "linear" and arch.gguf_arch in ROPE_LINEAR_ARCHS):
        return None
    if kind not in ("llama3", "linear") or getattr(rotary, "attention_scaling", 1.0) != 1.0 or arch.gguf_arch not in ROPE_FREQS_ARCHS:
        raise FactorportError(
            f"GGUF export does not carry rope scaling '{kind}' for {model.config.model_type} (llama.cpp would rotate "
            "other frequencies); export ONNX or the safetensors layout, which keep the model's own rotary"
        )
    scaled = rotary.inv_freq.double()
    dims = 2 * scaled.numel()
    unscaled = float(model.config.rope_theta) ** -(torch.arange(0, dims, 2, dtype=torch.float64) / dims)
    return (unscaled / scaled).float()
