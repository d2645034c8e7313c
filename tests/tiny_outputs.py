"""A real factorport output of a tiny random Llama (hidden 64, 2 layers) with
a tiny BPE tokenizer trained on WikiText, converted by `factorport.convert`
in about a second: manifest, stored thresholds and all. Native artifacts are
stand-in files that test-only backends open (tests/crashing_backends.py)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
TEXT = DATA / "wiki.test.raw"
RECIPE = "name: tiny-w8\nsteps:\n  - quantize: {targets: [linears], method: rtn, bits: 8, group_size: 64, symmetric: true}\n"


ARCH_DEFAULTS = {
    # Phi-3's default token ids are of its 32k vocabulary
    "phi3": lambda layers: {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # heads of 16 (q scaled by 1/4), sliding (window 8) and global layers in turn
    "gemma3_text": lambda layers: {
        "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
    },
}


def perturb_norms(model) -> None:
    """Gemma's norms start at zero (a scale of 1 + 0): random ones make the offset matter."""
    import torch

    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.1)


def tiny_source(directory: Path, layers: int = 2, arch: str = "llama", dtype: str = "float32", **config) -> Path:
    """A Hugging Face directory: a tiny random `arch` (llama, mistral, qwen2, qwen3, phi3, gemma3_text),
    saved in `dtype`, + BPE tokenizer of vocab <= 128."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    lines = TEXT.read_text(encoding="utf-8").splitlines()[:2000]
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>"], limit_alphabet=100, show_progress=False))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        arch,
        **{
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 512, "tie_word_embeddings": True,
            **ARCH_DEFAULTS.get(arch, lambda layers: {})(layers),
            **config,
        }
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval().to(getattr(torch, dtype))
    if arch == "gemma3_text":
        perturb_norms(model)
    directory.mkdir(parents=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_output(root: Path, recipe: str = RECIPE, native: bool = True) -> Path:
    """root/out converted from root/source; with `native`, stand-in
    gguf/model.gguf + gguf/adapter.gguf and onnx/model.onnx, in the manifest."""
    import factorport
    from factorport.formats.manifest import refresh_manifest

    source = tiny_source(root / "source")
    (root / "recipe.yaml").write_text(recipe)
    out = factorport.convert(str(source), recipe=str(root / "recipe.yaml"), output=root / "out", progress=False)
    if native:
        for name in ("gguf/model.gguf", "gguf/adapter.gguf", "onnx/model.onnx"):
            (out / name).parent.mkdir(exist_ok=True)
            (out / name).write_bytes(b"stand-in: opened only by test backends")
        refresh_manifest(out)
    return out
