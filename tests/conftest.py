"""Shared fixtures for the fast unit tests: tiny random Llama-family models
(hidden 64, ffn 128, 2 layers, 4 heads / 2 kv heads, vocab 128) and
hand-made calibration statistics. Nothing here touches the network or the
real SmolLM2 sample."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from factorport.tiny import TINY, correlated_activations, random_stats  # noqa: F401 (tests import them from here)
from tiny_outputs import perturb_norms


def _build(arch: str, seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    tiny = {**TINY, **overrides}
    if arch == "llama":
        config = transformers.LlamaConfig(**tiny, tie_word_embeddings=True)
        cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        config = transformers.MistralConfig(**tiny, tie_word_embeddings=False, sliding_window=None)
        cls = transformers.MistralForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**tiny, tie_word_embeddings=False)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":  # heads of 32 on a width of 64, as Qwen3-0.6B's 16 x 128 on 1024
        config = transformers.Qwen3Config(**{"head_dim": 32, **tiny}, tie_word_embeddings=True)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "phi3":  # fused qkv_proj and gate_up_proj; its default token ids are of a 32k vocabulary
        config = transformers.Phi3Config(**tiny, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        cls = transformers.Phi3ForCausalLM
    elif arch == "gemma3_text":  # a sliding layer (window 8) and a global one; heads of 16 need q scaled by 1/4
        config = transformers.Gemma3TextConfig(
            **{"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"], **tiny},
            tie_word_embeddings=True,
        )
        cls = transformers.Gemma3ForCausalLM
    else:  # pragma: no cover
        raise ValueError(arch)
    model = cls(config).eval()
    if arch == "qwen2":  # HF initializes biases to zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    assert proj.bias is not None
                    proj.bias.normal_(0, 0.5)
    if arch == "gemma3_text":  # HF initializes Gemma's norms to zeros (a scale of 1 + 0); make them matter
        perturb_norms(model)
    if arch == "qwen3":  # HF initializes the q/k norms to ones; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.3)
                layer.self_attn.k_norm.weight.normal_(1, 0.3)
    return model


@pytest.fixture
def make_model():
    """Factory: make_model('llama' | 'mistral' | 'qwen2' | 'qwen3' | 'phi3' | 'gemma3_text', seed=0, **config overrides) -> a fresh tiny model."""
    return _build


@pytest.fixture
def llama():
    return _build("llama")


@pytest.fixture
def mistral():
    return _build("mistral")


@pytest.fixture
def qwen2():
    return _build("qwen2")


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(123)
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=g)


make_stats = random_stats  # stats_for(model) -> hand-made CalibrationStats


@pytest.fixture
def stats_for():
    """Factory: stats_for(model) -> hand-made CalibrationStats."""
    return make_stats


class ByteTokenizer:
    """The minimum `calibrate` needs: bytes of the text modulo the vocabulary."""

    def __init__(self, vocab_size: int = TINY["vocab_size"]) -> None:
        self.vocab_size = vocab_size

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b % self.vocab_size for b in text.encode("utf-8")]}


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()


@pytest.fixture
def calib_text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40 + "\n")
    return path


def assert_reload_bit_exact(model, input_ids, directory):
    """Save `model` in the safetensors layout, load it back, and check the logits are identical."""
    from factorport.formats import safetensors_dir

    with torch.no_grad():
        before = model(input_ids).logits
    safetensors_dir.save(model, None, directory)
    loaded, _ = safetensors_dir.load(directory)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, before)
    return loaded
