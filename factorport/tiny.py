"""A tiny random Llama (hidden 64, 2 layers, vocabulary 128) and a complete
factorport output of it: what `factorport doctor` smoke-tests each backend
with, what the fuzzer mutates, and what the unit tests build on. Random
weights, no data: it exercises every operator and format in seconds."""

from __future__ import annotations

from pathlib import Path

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)

# An int4 base with a shared correction (so adapter.gguf and shared V exist)
# and an int8 tied embedding/head.
RECIPE = """
name: tiny
steps:
  - quantize: {targets: [linears], method: rtn, bits: 4, group_size: 32, symmetric: true}
  - correct: {targets: [linears], shared: true, ranks: {rank: 8}}
  - quantize: {targets: [lm_head], method: rtn, bits: 8, group_size: 32, symmetric: true}
"""


def tiny_llama(seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=True)).eval()


def correlated_activations(n: int, dim: int, seed: int = 0):
    """Activations with strongly correlated channels and uneven scales
    (so that XᵀX is far from a multiple of the identity)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim // 4, generator=g)
    mix = torch.randn(dim // 4, dim, generator=g)
    noise = 0.05 * torch.randn(n, dim, generator=g)
    scales = torch.logspace(-1, 1, dim)[torch.randperm(dim, generator=g)]
    return ((z @ mix + noise) * scales).double()


def random_stats(model, tokens: int = 256, seed: int = 0):
    """CalibrationStats from random correlated activations, keyed like
    `calibrate` keys them (the first linear of each input group)."""
    from .architectures import arch_for, input_groups, linear_names
    from .converters.calibration import CalibrationStats

    arch = arch_for(model.config)
    present = set(linear_names(model, arch))
    grams, key_of = {}, {}
    for i, group in enumerate(input_groups(model, arch)):
        group = [n for n in group if n in present]
        key = group[0]
        for name in group:
            key_of[name] = key
        x = correlated_activations(tokens, model.get_submodule(key).in_features, seed=seed * 1000 + i)
        grams[key] = x.T @ x
    return CalibrationStats(grams=grams, key_of=key_of, tokens=tokens, source="random")


def build_output(directory: Path, recipe: str = RECIPE):
    """Write directory/{safetensors,onnx,gguf,calibration} and manifest.json of the tiny
    Llama compressed with `recipe`; returns the compressed torch model."""
    from .converters import apply
    from .formats import gguf, input_sums, manifest, onnx, safetensors_dir
    from .recipe import parse_recipe

    directory = Path(directory)
    model = tiny_llama()
    parsed = parse_recipe(recipe)
    stats = random_stats(model)
    apply(model, parsed.steps, stats, progress=False)
    for sub in ("safetensors", "onnx", "gguf"):
        (directory / sub).mkdir(parents=True)
    safetensors_dir.save(model, None, directory / "safetensors")
    sums = input_sums.InputSums(stats.input_sums(list(stats.key_of)), stats.tokens, stats.tokens, stats.source)
    input_sums.write(directory / input_sums.FILE, sums)
    onnx.export(model, None, directory / "onnx", progress=False)
    gguf.export(model, None, directory / "gguf", progress=False, input_sums=sums)
    source = {"name": "tiny-random-llama", "kind": "random", "path": "-"}
    manifest.write_manifest(directory, {"source": source, "recipe": {"name": parsed.name, "text": recipe}})
    return model
