"""GGUF export on tiny random models: lossless block types, re-quantization
report, LoRA adapter layout, factorport's own GGUF layout, bad input."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from factorport.converters import apply
from factorport.errors import FactorportError
from factorport.formats.gguf import ADAPTER_FILE, MODEL_FILE, NATIVE_FILE, export, load_native
from factorport.formats.gguf.checks import check_adapter, open_gguf
from factorport.llamacpp.names import rotary_row_order
from factorport.recipe import parse_recipe


def convert(model, stats, steps: str):
    apply(model, parse_recipe("name: t\nsteps:\n" + steps).steps, stats, progress=False)
    return model


def tensors_of(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize(
    "bits,symmetric,expected",
    [(4, True, "Q4_0"), (4, False, "Q4_1"), (8, True, "Q8_0")],
)
def test_lossless_block_types_decode_to_the_torch_weights(make_model, stats_for, tmp_path, bits, symmetric, expected):
    model = make_model("llama")
    convert(model, stats_for(model), f"  - quantize: {{targets: [linears, lm_head], bits: {bits}, group_size: 32, symmetric: {str(symmetric).lower()}}}\n")
    report = export(model, None, tmp_path, progress=False)
    assert report["requantized"] == []
    _, tensors = tensors_of(tmp_path / MODEL_FILE)
    config = model.config
    for i in range(config.num_hidden_layers):
        for rel, stem, heads in [("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2), ("mlp.down_proj", "ffn_down", None)]:
            t = tensors[f"blk.{i}.{stem}.weight"]
            assert t.tensor_type.name == expected
            decoded = gguf.quants.dequantize(np.array(t.data), t.tensor_type)
            reference = model.get_submodule(f"model.layers.{i}.{rel}").base.to_dense().detach().numpy()
            if heads:
                reference = reference[rotary_row_order(reference.shape[0], heads)]
            assert np.array_equal(decoded, reference)
    embed = tensors["token_embd.weight"]
    assert embed.tensor_type.name == expected and "output.weight" not in tensors  # tied: one table
    assert np.array_equal(gguf.quants.dequantize(np.array(embed.data), embed.tensor_type), model.lm_head.base.to_dense().detach().numpy())


def test_tensors_are_made_one_at_a_time_while_writing(make_model, stats_for, tmp_path, monkeypatch):
    """Planning reads no lossless weight; writing makes each tensor just
    before it writes it, so the file is never held whole."""
    from factorport.formats.gguf import codecs, model_file

    model = make_model("llama")
    convert(model, stats_for(model), "  - quantize: {targets: [linears, lm_head], bits: 4, group_size: 32, symmetric: true}\n")
    events = []
    blocks, write = codecs.lossless_blocks, gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(codecs, "lossless_blocks", lambda base: events.append("make") or blocks(base))
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", lambda self, data, *a: events.append("write") or write(self, data, *a))
    model_file.plan_model(model, "F16")
    assert events == []
    export(model, None, tmp_path, progress=False, native=False)
    made = "".join("m" if e == "make" else "w" for e in events)
    assert made.count("m") == model.config.num_hidden_layers * 7 + 1  # the linears and the tied table
    assert "mm" not in made  # each made tensor is written before the next is made


def test_other_grids_are_requantized_and_reported(make_model, stats_for, tmp_path):
    model = make_model("llama")
    convert(model, stats_for(model), "  - quantize: {targets: [linears], bits: 4, group_size: 64, symmetric: true}\n")
    report = export(model, None, tmp_path, progress=False, gguf_type="Q8_0")
    names = {r["tensor"] for r in report["requantized"]}
    assert "blk.0.attn_q.weight" in names and "token_embd.weight" in names
    assert all(r["to"] == "Q8_0" and 0 < r["relative_error"] < 1e-3 for r in report["requantized"])
    reader, tensors = tensors_of(tmp_path / MODEL_FILE)
    assert tensors["blk.1.ffn_up.weight"].tensor_type.name == "Q8_0"
    assert {r["tensor"] for r in json.loads(field(reader, "factorport.requantized"))} == names


def test_adapter_holds_each_low_rank_term_with_llamacpp_shapes(make_model, stats_for, tmp_path):
    model = make_model("llama")
    convert(
        model,
        stats_for(model),
        "  - quantize: {targets: [linears], bits: 4, group_size: 32, symmetric: true}\n"
        "  - correct: {targets: [linears], shared: true, ranks: {rank: 8}}\n",
    )
    report = export(model, None, tmp_path, progress=False)
    reader, tensors = tensors_of(tmp_path / ADAPTER_FILE)
    assert field(reader, "general.type") == "adapter" and field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == 0.0  # llama.cpp: scale 1 for every rank
    q = model.model.layers[0].self_attn.q_proj
    a, b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    assert np.array(a.data).shape == (8, 64) and np.array(b.data).shape == (64, 8)
    assert np.array_equal(np.array(a.data), q.V.V.detach().numpy())
    assert np.array_equal(np.array(b.data), q.U.detach().numpy()[rotary_row_order(64, 4)])
    duplicated = json.loads(field(reader, "factorport.duplicated_shared_v"))
    assert sorted(duplicated["model.layers.0.self_attn.shared_q_k_v"]) == sorted(
        f"blk.0.{s}.weight.lora_a" for s in ("attn_q", "attn_k", "attn_v")
    )
    assert report["adapter"]["pairs"] == 14
    check_adapter(open_gguf(tmp_path / MODEL_FILE), tmp_path / ADAPTER_FILE)  # its own model accepts it


def test_pure_factorization_is_multiplied_out(make_model, stats_for, tmp_path):
    model = make_model("llama")
    convert(model, stats_for(model), "  - factorize: {targets: ['*.mlp.*'], method: plain, ranks: {rank: 16}}\n")
    report = export(model, None, tmp_path, progress=False, gguf_type="F32")
    assert set(report["multiplied_out"]) == {f"blk.{i}.ffn_{s}.weight" for i in range(2) for s in ("gate", "up", "down")}
    assert report["adapter"] is None and not (tmp_path / ADAPTER_FILE).exists()
    _, tensors = tensors_of(tmp_path / MODEL_FILE)
    assert np.allclose(np.array(tensors["blk.0.ffn_up.weight"].data), model.model.layers[0].mlp.up_proj.to_dense().detach().numpy())


NATIVE_RECIPES = [
    ("llama", "  - share: {targets: [linears], ranks: {rank: 16}, factor_dtype: float16}\n"),
    ("llama", "  - quantize: {targets: [linears], bits: 4, group_size: 64, symmetric: false}\n"
              "  - correct: {targets: [linears], shared: true, ranks: {rank: 4}}\n"
              "  - quantize: {targets: [lm_head], bits: 8, group_size: 32}\n"),
    ("qwen2", "  - sparsify: {targets: ['*.mlp.*'], method: magnitude, density: 0.5, block_rows: 1, block_cols: 16, bits: 4}\n"),
]


@pytest.mark.parametrize("arch,steps", NATIVE_RECIPES)
def test_factorport_gguf_loads_back_bit_exact(make_model, stats_for, input_ids, tmp_path, arch, steps):
    model = convert(make_model(arch), None, steps) if "share" not in steps and "correct" not in steps else None
    if model is None:
        model = make_model(arch)
        convert(model, stats_for(model), steps)
    export(model, None, tmp_path, progress=False)
    reader = open_gguf(tmp_path / NATIVE_FILE)
    assert field(reader, "general.architecture") == "factorport" and field(reader, "factorport.llama_cpp_runnable") is False
    loaded, _ = load_native(tmp_path / NATIVE_FILE)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_truncated_gguf_is_refused(make_model, tmp_path):
    model = make_model("llama")
    export(model, None, tmp_path, progress=False)
    data = (tmp_path / MODEL_FILE).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(FactorportError, match="truncated"):
        open_gguf(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:100])
    with pytest.raises(FactorportError, match="truncated|not a readable"):
        open_gguf(tmp_path / "header.gguf")


def test_adapter_of_another_model_is_refused(make_model, stats_for, tmp_path):
    import transformers

    from conftest import TINY

    steps = "  - quantize: {targets: [linears], bits: 4, group_size: 32}\n  - correct: {targets: [linears], shared: false, ranks: {rank: 4}}\n"
    small = make_model("llama")
    convert(small, stats_for(small), steps)
    (tmp_path / "small").mkdir()
    export(small, None, tmp_path / "small", progress=False)
    torch.manual_seed(1)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, "intermediate_size": 96}, tie_word_embeddings=True)).eval()
    (tmp_path / "other").mkdir()
    export(other, None, tmp_path / "other", progress=False)
    with pytest.raises(FactorportError, match="do not fit the weight"):
        check_adapter(open_gguf(tmp_path / "other" / MODEL_FILE), tmp_path / "small" / ADAPTER_FILE)


def test_unknown_gguf_type_is_one_line_error(make_model, tmp_path):
    with pytest.raises(FactorportError, match="unknown --gguf-type 'Q9_Z'"):
        export(make_model("llama"), None, tmp_path, progress=False, gguf_type="Q9_Z")


def test_an_embedded_vocabulary_matches_the_tokens_transformers_built_from_it():
    """transformers' GGUF loader writes SentencePiece spaces as '▁', byte tokens
    as their character, and may drop trailing tokens; anything else is another vocabulary."""
    from factorport.formats.gguf.metadata import _same_vocabulary

    gguf_tokens = ["<pad>", "<0x09>", "  ", "▁a", "b", "<unused>"]
    assert _same_vocabulary(["<pad>", "\t", "▁▁", "▁a", "b"], gguf_tokens)
    assert not _same_vocabulary(["<pad>", "\n", "▁▁", "▁a", "b"], gguf_tokens)
    assert not _same_vocabulary(["<pad>", "\t", "▁▁", "▁a", "c"], gguf_tokens)
    assert not _same_vocabulary(gguf_tokens + ["extra"], gguf_tokens)
