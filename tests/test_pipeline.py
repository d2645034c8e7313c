"""The layer-by-layer conversion on tiny random Llamas: one decoder layer in
float32 at a time, sequential differs from parallel, parallel equals the
whole-model statistics, sharded output, and a killed run resumed bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch

import factorport
from factorport.converters import apply
from factorport.converters.calibration import collect, token_sequences
from factorport.errors import FactorportError
from factorport.formats import safetensors_dir
from factorport.loading import SafetensorsSource, load_model
from factorport.recipe import load_recipe
from tiny_outputs import TEXT, tiny_source

RECIPE = """name: tiny-gptq-glowq
calibration: {samples: 4, seq_len: 64}
steps:
  - quantize: {targets: [linears], method: gptq, bits: 4, group_size: 32, symmetric: true}
  - correct: {targets: [linears], shared: true, ranks: {rank: 8}}
  - quantize: {targets: [lm_head], method: rtn, bits: 8, group_size: 32, symmetric: true}
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return tiny_source(tmp_path_factory.mktemp("pipeline") / "source", layers=4)


@pytest.fixture
def recipe(tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return path


def stored(out: Path) -> dict[str, torch.Tensor]:
    return safetensors_dir.read_tensors(out / "safetensors")


def test_one_decoder_layer_in_float32_at_a_time(source, recipe, tmp_path, monkeypatch):
    """Every source tensor of a decoder layer is tracked by its storage; when a
    layer's weights are read, no other layer's may still be alive."""
    alive: dict[int, list[weakref.ref]] = {}
    peak = {"layers": 0}
    read = SafetensorsSource.tensor

    def tracked(self, name, dtype=torch.float32):
        tensor = read(self, name, dtype)
        if name.startswith("model.layers."):
            layer = int(name.split(".")[2])
            living = {i for i, refs in alive.items() if any(r() is not None for r in refs)}
            peak["layers"] = max(peak["layers"], len(living | {layer}))
            assert living <= {layer}, f"reading layer {layer} while layers {sorted(living)} are still in memory"
            assert tensor.dtype == torch.float32
            alive.setdefault(layer, []).append(weakref.ref(tensor.untyped_storage()))
        return tensor

    monkeypatch.setattr(SafetensorsSource, "tensor", tracked)
    factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "out", progress=False)
    assert sorted(alive) == [0, 1, 2, 3] and peak["layers"] == 1


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"])
def any_source(request, tmp_path_factory) -> Path:
    config = {"head_dim": 32} if request.param == "qwen3" else {}  # heads wider than width / heads, as Qwen3's
    return tiny_source(tmp_path_factory.mktemp(request.param) / "source", layers=4, arch=request.param, **config)


def test_sequential_and_parallel_differ_and_parallel_matches_whole_model(any_source, recipe, tmp_path):
    source = any_source
    seq = stored(factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "seq", progress=False))
    par = stored(factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "par", mode="parallel", progress=False))
    assert seq.keys() == par.keys()
    first = "model.layers.0.self_attn.o_proj.base.codes"  # layer 0 sees the same inputs either way
    assert torch.equal(seq[first], par[first])
    assert not torch.equal(seq["model.layers.3.mlp.down_proj.base.codes"], par["model.layers.3.mlp.down_proj.base.codes"])

    # parallel == statistics of the whole uncompressed model in one pass (the old convert)
    model, tokenizer, _ = load_model(str(source))
    sequences = token_sequences(tokenizer, str(TEXT.parent / "wiki.valid.tokens"), 4, 64)
    apply(model, load_recipe(str(recipe)).steps, collect(model, sequences, progress=False), progress=False)
    whole = safetensors_dir.state_tensors(model)
    assert whole.keys() == par.keys()
    for name, tensor in par.items():
        torch.testing.assert_close(whole[name], tensor, rtol=0, atol=1e-5 if tensor.is_floating_point() else 0, msg=name)


def test_a_decoder_that_takes_its_layers_first_output_converts_at_any_depth(recipe, tmp_path):
    """Gemma 3's decoder keeps `layer(...)[0]`: the layers stood in for while
    recording must return what a layer returns, or the hidden states lose a
    dimension per layer and a model deeper than four layers cannot convert."""
    source = tiny_source(tmp_path / "source", layers=6, arch="gemma3_text")
    out = stored(factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "out", progress=False))
    assert {int(n.split(".")[2]) for n in out if n.startswith("model.layers.")} == set(range(6))


def test_asymmetric_targets_are_the_least_squares_fit_to_dense_outputs():
    """W' = W + W·E·(XᵀX)⁻¹ is the least-squares map from the inputs a layer
    gets to the uncompressed outputs, and for any Ŵ the asymmetric error is
    the error against W' on those inputs plus a constant."""
    from factorport.converters.calibration import CalibrationStats
    from factorport.converters.pipeline import aim_at_dense_outputs_

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g, dtype=torch.float64)
    dense = x + 0.3 * torch.randn(200, 12, generator=g, dtype=torch.float64)  # the uncompressed model's inputs
    linear = torch.nn.Linear(12, 5, bias=False).double()
    w = linear.weight.detach().clone()
    stats = CalibrationStats({"l": x.T @ x}, {"l": "l"}, 200, shifts={"l": (dense - x).T @ x})
    aim_at_dense_outputs_(torch.nn.ModuleDict({"l": linear}), ["l"], stats, damping=0.0, share=1.0)
    target = linear.weight.detach()
    torch.testing.assert_close(target, torch.linalg.lstsq(x, dense @ w.T).solution.T)
    errors = []
    for _ in range(3):
        guess = torch.randn(5, 12, generator=g, dtype=torch.float64)
        errors.append(float((dense @ w.T - x @ guess.T).pow(2).sum() - (x @ (target - guess).T).pow(2).sum()))
    assert max(errors) - min(errors) < 1e-8 * abs(errors[0]) and errors[0] > 0


def test_asymmetric_is_sequential_aimed_at_the_uncompressed_model(source, recipe, tmp_path):
    """Layer 0 sees the uncompressed model's inputs either way (nothing to aim
    at: sequential's result, bit for bit); later layers differ."""
    seq = stored(factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "seq", progress=False))
    asym = stored(factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "asym", mode="asymmetric", progress=False))
    assert asym.keys() == seq.keys()
    assert all(torch.equal(asym[k], seq[k]) for k in asym if k.startswith("model.layers.0."))
    assert not torch.equal(asym["model.layers.3.mlp.down_proj.base.codes"], seq["model.layers.3.mlp.down_proj.base.codes"])


BUDGET_RECIPE = """name: tiny-budget
calibration: {samples: 4, seq_len: 64}
steps:
  - budget: {targets: [linears], bits_per_weight: 5.5, bits: [4, 8], group_size: 32, correction_ranks: [0, 8], method: rtn}
"""


def chosen(out: Path) -> dict[str, str]:
    """Each linear's operator, as convert.json reports it (bits and rank included)."""
    return {r["name"]: r["operator"] for r in json.loads((out / "report" / "convert.json").read_text())["layers"]}


def test_a_budget_over_every_layer_is_scored_then_fixed(source, tmp_path):
    """Two passes: the scoring pass sees the uncompressed model, so a parallel
    conversion equals the whole-model one, and the sequential one keeps that
    allocation (only its statistics differ); the budget holds."""
    recipe = tmp_path / "budget.yaml"
    recipe.write_text(BUDGET_RECIPE)
    par = factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "par", mode="parallel", progress=False)
    seq = factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "seq", progress=False)
    model, tokenizer, _ = load_model(str(source))
    sequences = token_sequences(tokenizer, str(TEXT.parent / "wiki.valid.tokens"), 4, 64)
    apply(model, load_recipe(str(recipe)).steps, collect(model, sequences, progress=False), progress=False)
    whole = safetensors_dir.state_tensors(model)
    for name, tensor in stored(par).items():
        torch.testing.assert_close(whole[name], tensor, rtol=0, atol=1e-5 if tensor.is_floating_point() else 0, msg=name)
    assert chosen(seq) == chosen(par)
    allocation = json.loads((seq / "report" / "convert.json").read_text())["allocation"]
    assert allocation["model.layers.0.self_attn.shared_q_k_v"]["bits"] in (4, 8) and len(allocation) == 4 * 4  # 4 layers x (qkv, o, gate/up, down)
    operators = set(chosen(seq).values())
    assert any("int8" in o for o in operators) and any("int4" in o for o in operators)  # the budget mixes widths
    assert not (seq / "allocation.json").exists()  # what only a resume needs is gone
    linears = [(n, m) for n, m in load_model(str(source))[0].named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    stored_bytes = sum(t.numel() * t.element_size() for k, t in stored(seq).items() if any(k.startswith(n + ".") for n, _ in linears))
    assert stored_bytes <= 5.5 / 8 * sum(m.weight.numel() for _, m in linears)


def test_sharded_output_loads_like_one_file(source, recipe, tmp_path):
    one = factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "one", progress=False)
    sharded = factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "sharded", max_shard_bytes=1, progress=False)
    files = sorted(p.name for p in (sharded / "safetensors").glob("*.safetensors"))
    assert files == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]  # four layers + the rest
    assert not (sharded / "safetensors" / "model.safetensors").exists()
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    a, _ = factorport.load(one)
    b, _ = factorport.load(sharded)
    assert torch.equal(a(ids).logits, b(ids).logits)
    assert stored(one).keys() == stored(sharded).keys()


def widened_copy(source: Path, directory: Path) -> Path:
    """`source` (bfloat16) with every tensor made float32: the same values."""
    from safetensors.torch import save_file

    shutil.copytree(source, directory)
    tensors = {k: t.float() for k, t in safetensors_dir.read_file_tensors(source / "model.safetensors").items()}
    save_file(tensors, directory / "model.safetensors", {"format": "pt"})
    return directory


RTN_LINEARS = """name: tiny-rtn
calibration: {samples: 2, seq_len: 32}
steps:
  - quantize: {targets: [linears], method: rtn, bits: 4, group_size: 32, symmetric: true}
"""


@pytest.mark.parametrize("tied", [True, False])
def test_bfloat16_tables_are_written_as_read_and_load_widened(tied, tmp_path):
    """A bfloat16 source's embedding and output tables stay bfloat16 on disk
    (the norms float32, as the model computes), and the loaded model equals,
    logit for logit, the conversion of the same values stored in float32."""
    half = tiny_source(tmp_path / "half", layers=2, dtype="bfloat16", tie_word_embeddings=tied)
    full = widened_copy(half, tmp_path / "full")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RTN_LINEARS)
    outs = {name: factorport.convert(str(src), recipe=str(recipe), output=tmp_path / f"out-{name}", progress=False) for name, src in (("half", half), ("full", full))}
    tables = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    assert safetensors_dir.read_metadata(outs["half"] / "safetensors")["table_dtype"] == "bfloat16"
    assert safetensors_dir.read_metadata(outs["full"] / "safetensors")["table_dtype"] is None
    on_disk = stored(outs["half"])
    assert [on_disk[t].dtype for t in tables] == [torch.bfloat16] * len(tables) and ("lm_head.weight" in on_disk) != tied
    assert on_disk["model.norm.weight"].dtype == torch.float32
    half_model, _ = factorport.load(outs["half"])
    full_model, _ = factorport.load(outs["full"])
    assert half_model.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(half_model(ids).logits, full_model(ids).logits)


def test_a_compressed_tied_table_is_compressed_from_float32(recipe, tmp_path):
    """The one table of a tied model, compressed, is not a plain table: no table_dtype."""
    half = tiny_source(tmp_path / "half", layers=2, dtype="bfloat16")
    out = factorport.convert(str(half), recipe=str(recipe), output=tmp_path / "out", progress=False)
    meta = safetensors_dir.read_metadata(out / "safetensors")
    assert meta["tied_embeddings"] and meta["table_dtype"] is None and "lm_head" in meta["linears"]
    assert "model.embed_tokens.weight" not in stored(out)


def test_a_shard_missing_from_the_index_is_refused(source, recipe, tmp_path):
    out = factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "out", max_shard_bytes=1, progress=False)
    (out / "safetensors" / "model-00003-of-00005.safetensors").unlink()
    with pytest.raises(FactorportError, match="model-00003-of-00005.safetensors is missing"):
        safetensors_dir.load(out / "safetensors")


KILLED = """
import os, signal, sys
import factorport
def die(layer):
    if layer == 1:
        os.kill(os.getpid(), signal.SIGKILL)
factorport.convert(sys.argv[1], recipe=sys.argv[2], output=sys.argv[3], progress=False, on_layer=die)
"""


@pytest.mark.parametrize("text", [RECIPE, BUDGET_RECIPE, RECIPE.replace("seq_len: 64", "seq_len: 64, mode: asymmetric")],
                         ids=["per-layer", "two-pass", "asymmetric"])
def test_resume_after_kill_is_bit_identical(source, text, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    whole = factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "whole", progress=False)
    out = tmp_path / "resumed"
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED), str(source), str(recipe), str(out)], env=os.environ)
    assert run.returncode == -signal.SIGKILL
    partial = tmp_path / ".resumed.partial"
    assert not out.exists() and partial.is_dir()
    assert sorted(p.name for p in (partial / "pieces").iterdir()) == ["layer-00000.safetensors", "layer-00001.safetensors"]
    assert (partial / "allocation.json").is_file() == (text == BUDGET_RECIPE)  # a resume does not score again

    with pytest.raises(FactorportError, match="different settings"):
        factorport.convert(str(source), recipe=str(recipe), output=out, progress=False, resume=True, mode="parallel")
    factorport.convert(str(source), recipe=str(recipe), output=out, progress=False, resume=True)
    assert not partial.exists()
    a, b = stored(whole), stored(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    names = lambda o: [r["name"] for r in json.loads((o / "report" / "convert.json").read_text())["layers"]]  # noqa: E731
    assert names(out) == names(whole)


def test_resume_without_a_partial_run_is_refused(source, recipe, tmp_path):
    with pytest.raises(FactorportError, match="nothing to resume"):
        factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "out", progress=False, resume=True)


def test_a_failed_layer_keeps_the_finished_ones_for_resume(source, recipe, tmp_path):
    def fail(layer):
        if layer == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        factorport.convert(str(source), recipe=str(recipe), output=tmp_path / "out", progress=False, on_layer=fail)
    assert not (tmp_path / "out").exists()
    assert len(list((tmp_path / ".out.partial" / "pieces").iterdir())) == 3


def test_gguf_source_reads_what_transformers_loads_whole():
    """The embedded Q4_1 GGUF read tensor by tensor equals transformers'
    whole-file load (its fp32 cache), q/k permutation undone included."""
    from factorport.loading import GGUFSource, default_model_dir, embedded_gguf

    gguf = GGUFSource(embedded_gguf())
    whole = SafetensorsSource(default_model_dir())
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.3.{rel}.weight" for rel in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj", "input_layernorm")
    ]
    for name in names:
        assert torch.equal(gguf.tensor(name), whole.tensor(name)), name
    assert not gguf.has("lm_head.weight")  # tied: the table is stored once
    with pytest.raises(FactorportError, match="has no tensor for model.layers.99"):
        gguf.tensor("model.layers.99.mlp.up_proj.weight")
