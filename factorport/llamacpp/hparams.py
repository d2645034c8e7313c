"""The `{arch}.*` hyper-parameter keys llama.cpp reads to build a model's graph."""

from __future__ import annotations

from .names import gguf_arch

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
    return meta
