"""The artifact every reader is fuzzed on: a tiny random Llama (hidden 64,
2 layers, vocabulary 128) converted with an int4 base, a shared low-rank
correction (so adapter.gguf, shared V tensors and int4 codes all exist) and
an int8 tied embedding, written as a complete factorport output:
safetensors/, onnx/ (tensors moved to external data, as exports over 2 GB
have them, so locations and offsets can be fuzzed), gguf/ and manifest.json.

It is built in a forked child (`build_in_child`), so the fuzzing process
itself never runs torch compute before it forks its readers.
"""

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

RECIPE = """
name: fuzz-tiny
steps:
  - quantize: {targets: [linears], method: rtn, bits: 4, group_size: 32, symmetric: true}
  - correct: {targets: [linears], shared: true, ranks: {rank: 8}}
  - quantize: {targets: [lm_head], method: rtn, bits: 8, group_size: 32, symmetric: true}
"""

EXTERNAL_DATA = "model.onnx_data"
# the fixed window every reader scores (byte-level vocabulary of 128 tokens)
TOKEN_IDS = [1, 17, 42, 99, 3, 64, 127, 0, 5, 88, 23, 71]


def tiny_llama(seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def random_stats(model, tokens: int = 256, seed: int = 0):
    """Calibration statistics from random activations with correlated,
    unevenly scaled channels (XᵀX far from a multiple of the identity, so the
    correction's eigenspace is not arbitrary)."""
    import torch

    from ..architectures import arch_for, input_groups, linear_names
    from ..converters.calibration import CalibrationStats

    arch = arch_for(model.config)
    present = set(linear_names(model, arch))
    grams, key_of = {}, {}
    for i, group in enumerate(input_groups(model, arch)):
        group = [n for n in group if n in present]
        for name in group:
            key_of[name] = group[0]
        width = model.get_submodule(group[0]).in_features
        g = torch.Generator().manual_seed(seed * 1000 + i)
        x = torch.randn(tokens, width // 4, generator=g) @ torch.randn(width // 4, width, generator=g)
        x = (x + 0.05 * torch.randn(tokens, width, generator=g)) * torch.logspace(-1, 1, width)
        grams[group[0]] = x.double().T @ x.double()
    return CalibrationStats(grams=grams, key_of=key_of, tokens=tokens, source="random")


def _onnx_to_external_data(onnx_dir: Path) -> None:
    import onnx

    path = onnx_dir / "model.onnx"
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA, size_threshold=256)


def build(directory: Path) -> Path:
    """Write the artifact into `directory` (created; must not exist)."""
    from ..converters import apply
    from ..formats import gguf, manifest, onnx, safetensors_dir
    from ..recipe import parse_recipe

    directory = Path(directory)
    model = tiny_llama()
    apply(model, parse_recipe(RECIPE).steps, random_stats(model), progress=False)
    for sub in ("safetensors", "onnx", "gguf"):
        (directory / sub).mkdir(parents=True)
    safetensors_dir.save(model, None, directory / "safetensors")
    onnx.export(model, None, directory / "onnx", progress=False)
    _onnx_to_external_data(directory / "onnx")
    gguf.export(model, None, directory / "gguf", progress=False)
    manifest.write_manifest(directory, {"source": {"name": "tiny-random-llama", "kind": "random", "path": "-"}, "recipe": {"name": "fuzz-tiny", "text": RECIPE}})
    return directory


def build_in_child(directory: Path, timeout: float = 600.0) -> Path:
    """`build(directory)` in a forked child, so that this process stays free
    of the thread pools torch and onnxruntime start on their first compute."""
    from .harness import run_in_child

    outcome = run_in_child(lambda: str(build(directory)), timeout=timeout, memory_limit=None)
    if outcome.kind != "ok":
        raise RuntimeError(f"building the fuzz artifact failed: {outcome.kind}: {outcome.detail}")
    return Path(directory)


__all__ = ["EXTERNAL_DATA", "TOKEN_IDS", "build", "build_in_child"]
