"""ONNX export and the onnxruntime backend on tiny random models: each
compressed operator keeps its form in the graph, the graph computes what the
torch reference computes, and bad directories are refused in one line."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tolerances import network_tolerance

from factorport.converters import QuantizeConfig, apply
from factorport.errors import FactorportError
from factorport.formats.onnx import export
from factorport.formats.onnx import nbits
from factorport.formats.onnx.runtime import DecoderSession
from factorport.ops import QuantizedBase, QuantSpec, TiedEmbedding
from factorport.recipe import load_recipe
from factorport.validators.backends.onnxruntime_backend import OnnxruntimeBackend
from factorport.validators.backends.torch_backend import TorchBackend

RECIPES = Path(__file__).resolve().parents[1] / "samples" / "recipes"


def compressed(make_model, stats_for, recipe: str, arch: str = "llama", **config):
    model = make_model(arch, **config)
    steps = load_recipe(str(RECIPES / f"{recipe}.yaml")).steps
    apply(model, steps, stats_for(model), progress=False)
    return model.eval()


def exported(model, tmp_path: Path, name: str = "onnx", **options) -> tuple[Path, dict, onnx.ModelProto]:
    out = tmp_path / name
    out.mkdir()
    report = export(model, None, out, progress=False, **options)
    return out, report, onnx.load(str(out / "model.onnx"))


def torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.reshape(1, -1), use_cache=False).logits[0].float()


def assert_parity(model, out: Path, ids) -> None:
    expected = torch_logits(model, ids)
    got = DecoderSession.open(out).logits(ids)
    assert (got - expected).abs().max() <= network_tolerance(model.config, len(ids)) * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def nodes(graph: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in graph.graph.node if n.op_type == op]


def ort_dequantized(weight: nbits.NBitsWeight) -> np.ndarray:
    """The weight onnxruntime decodes: MatMulNBits applied to the identity."""
    import onnxruntime as ort

    inputs = ["A", "B", "S"] + (["Z"] if weight.zero_points is not None else [])
    inits = [numpy_helper.from_array(weight.blob.numpy(), "B"), numpy_helper.from_array(weight.scales.numpy(), "S")]
    if weight.zero_points is not None:
        inits.append(numpy_helper.from_array(weight.zero_points.numpy(), "Z"))
    node = helper.make_node(
        "MatMulNBits", inputs, ["Y"], domain="com.microsoft",
        K=weight.in_features, N=weight.out_features, bits=weight.bits, block_size=weight.block_size,
    )
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, weight.in_features])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, weight.out_features])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    eye = np.eye(weight.in_features, dtype=np.float32)
    return session.run(None, {"A": eye})[0].T


def test_int8_as_two_int4_halves_is_exact():
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    base = QuantizedBase.from_weight(weight, QuantSpec(bits=8, group_size=32, symmetric=True))
    high, low = nbits.int8_as_two_int4(nbits.from_base(base))
    assert np.array_equal(ort_dequantized(high) + ort_dequantized(low), base.to_dense().numpy())


@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, True), (4, False)])
def test_matmulnbits_decodes_factorport_codes_exactly(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    weight = torch.randn(48, 128, generator=g) * torch.logspace(-2, 1, 128)
    base = QuantizedBase.from_weight(weight, QuantSpec(bits=bits, group_size=32, symmetric=symmetric))
    reference = base.to_dense().numpy()
    decoded = ort_dequantized(nbits.from_base(base))
    if symmetric:
        assert np.array_equal(decoded, reference)
    else:  # float zero point -minimum/scale: equal to float32 rounding (docs/onnx.md)
        np.testing.assert_allclose(decoded, reference, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(reference).max())


def test_quantized_linears_become_matmulnbits_with_shared_v_computed_once(make_model, stats_for, input_ids, tmp_path):
    model = compressed(make_model, stats_for, "glowq-w4")
    out, report, graph = exported(model, tmp_path)
    layers = model.config.num_hidden_layers
    # a group sharing V is one linear: q/k/v stacked in one int4 MatMulNBits,
    # gate/up in another, plus o and down; the int8 lm_head as two int4
    # halves (fast float32 kernel), and the tied embedding reads the int8 codes
    bits = Counter({a.name: a.i for a in n.attribute}["bits"] for n in nodes(graph, "MatMulNBits"))
    assert bits == {4: 4 * layers + 2}
    widths = Counter({a.name: a.i for a in n.attribute}["N"] for n in nodes(graph, "MatMulNBits"))
    qkv = model.config.hidden_size + 2 * model.config.num_key_value_heads * model.config.head_dim
    lm_head = Counter({model.config.vocab_size: 2})  # the two halves
    assert widths - lm_head == {qkv: layers, 2 * model.config.intermediate_size: layers, model.config.hidden_size: 2 * layers}
    assert len(nodes(graph, "GatherBlockQuantized")) == 1
    # one MatMul per shared V (q/k/v and gate/up share; o and down have their
    # own), each feeding exactly one MatMul over the members' U side by side
    v_matmuls = [n for n in nodes(graph, "MatMul") if n.input[1].endswith(".v_t")]
    assert len(v_matmuls) == 4 * layers == report["shared_projections"]
    assert report["fused_groups"] == 2 * layers
    consumers = Counter(i for n in graph.graph.node for i in n.input)
    assert all(consumers[n.output[0]] == 1 for n in v_matmuls)
    u_matmuls = [n for n in nodes(graph, "MatMul") if n.input[1].endswith(".u_t")]
    assert len(u_matmuls) == 4 * layers
    assert len(nodes(graph, "Split")) == 2 * layers
    # the low-rank term is two MatMuls, never a multiplied-out matrix
    assert not [i for i in graph.graph.initializer if i.name.endswith("weight_t")]
    assert_parity(model, out, input_ids[0])
    assert report["parity"]["top1_agreement"] == 1.0


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text"])
def test_factorized_and_biased_models_match_torch(make_model, stats_for, input_ids, tmp_path, arch):
    model = compressed(make_model, stats_for, "svd-90", arch)
    out, _, graph = exported(model, tmp_path)
    assert not nodes(graph, "MatMulNBits")
    assert_parity(model, out, input_ids[1])


def test_gemmas_linear_rope_scaling_reaches_the_graph(make_model, stats_for, input_ids, tmp_path):
    # the global layers' positions divided by 8, the sliding ones unscaled (Gemma 3 4B and larger)
    model = compressed(make_model, stats_for, "svd-90", "gemma3_text", rope_scaling={"rope_type": "linear", "factor": 8.0})
    out, _, _ = exported(model, tmp_path)
    assert_parity(model, out, input_ids[1])


def test_a_compressed_tied_table_keeps_gemmas_embedding_scale(make_model, input_ids, tmp_path):
    """Gemma multiplies looked-up rows by sqrt(hidden); a TiedEmbedding that
    reads the int8 lm_head must too, in torch and in the ONNX graph."""
    model = make_model("gemma3_text")
    dense = torch_logits(model, input_ids[1])
    spec = QuantizeConfig(targets=("lm_head",), method="rtn", bits=8, group_size=32, symmetric=True)
    apply(model, [("quantize", spec)], None, progress=False)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, TiedEmbedding) and embedding.scale == pytest.approx(8.0)
    got = torch_logits(model, input_ids[1])
    assert (got - dense).abs().max() < 0.05 * dense.abs().max()  # int8 rounding, not a missing factor of 8
    out, report, graph = exported(model, tmp_path)
    assert report["embedding"] == "GatherBlockQuantized int8" and nodes(graph, "GatherBlockQuantized")
    assert_parity(model, out, input_ids[1])


def test_asymmetric_bases_and_int8_fallback(make_model, stats_for, input_ids, tmp_path):
    path = tmp_path / "asym.yaml"
    path.write_text(
        "name: asym\nsteps:\n"
        "  - quantize: {targets: ['*.mlp.*'], method: rtn, bits: 4, group_size: 32, symmetric: false}\n"
        "  - quantize: {targets: ['*.self_attn.*'], method: rtn, bits: 8, group_size: 32, symmetric: false}\n"
    )
    recipe = load_recipe(str(path))
    model = make_model("llama")
    apply(model, recipe.steps, None, progress=False)
    out, _, graph = exported(model, tmp_path)
    zero_pointed = [n for n in nodes(graph, "MatMulNBits") if len(n.input) == 4]
    # asymmetric int4 MLP: gate/up (one input, one grid) stacked in one node, down its own
    assert len(zero_pointed) == 2 * model.config.num_hidden_layers
    assert len(nodes(graph, "MatMulNBits")) == 2 * model.config.num_hidden_layers  # int8 asym: dense fallback
    assert_parity(model, out, input_ids[0])


def test_block_sparse_tiles_read_only_kept_blocks(make_model, stats_for, input_ids, tmp_path):
    model = compressed(make_model, stats_for, "gqsa-w4s50")
    out, _, graph = exported(model, tmp_path, "sparse")
    dense_out, _, dense_graph = exported(model, tmp_path, "dense", densify_sparse=True)

    def nbits_bytes(g):
        names = {n.input[1] for n in nodes(g, "MatMulNBits")}
        return sum(numpy_helper.to_array(i).nbytes for i in g.graph.initializer if i.name in names)

    assert len(nodes(dense_graph, "MatMulNBits")) == 7 * model.config.num_hidden_layers
    assert len(nodes(graph, "MatMulNBits")) > len(nodes(dense_graph, "MatMulNBits"))
    assert nbits_bytes(graph) * 2 == nbits_bytes(dense_graph)  # density 0.5: half the codes
    assert_parity(model, out, input_ids[0])
    assert_parity(model, dense_out, input_ids[0])


def test_backend_generation_matches_torch_and_accuracy_level_4_runs(make_model, stats_for, input_ids, tmp_path):
    model = compressed(make_model, stats_for, "w8-rtn")
    out, _, _ = exported(model, tmp_path)
    prompt = input_ids[0].tolist()
    ours = OnnxruntimeBackend.open(out, threads=1)
    reference = TorchBackend(model).generate(prompt, 10)
    generation = ours.generate(prompt, 10)
    assert generation.tokens == reference.tokens
    assert len(generation.decode_seconds) == 9 and generation.prefill_seconds > 0
    # no cache vs cache: the last position's logits agree
    assert ours.logits(torch.tensor(prompt)).argmax(-1)[-1].item() == generation.tokens[0]
    int8 = OnnxruntimeBackend.open(out, accuracy_level=4)
    expected = torch_logits(model, input_ids[0])
    got = int8.logits(input_ids[0])
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_attention_is_one_groupqueryattention_per_layer_and_the_cache_is_exact(make_model, stats_for, input_ids, tmp_path):
    model = compressed(make_model, stats_for, "glowq-w4")
    out, report, graph = exported(model, tmp_path)
    layers = model.config.num_hidden_layers
    assert report["attention"] == "GroupQueryAttention"
    assert len(nodes(graph, "GroupQueryAttention")) == layers
    assert len(nodes(graph, "RotaryEmbedding")) == 2 * layers  # q and k
    assert len(nodes(graph, "Softmax")) == 0  # nothing of the traced attention is left
    # prompt, then one token at a time, then two at once: the same logits as one pass
    session = DecoderSession.open(out)
    ids = torch.cat([input_ids[0], input_ids[1]]).tolist()
    logits, past = session.step(ids[:8], session.empty_past())
    rows = [logits]
    for start, stop in [(8, 9), (9, 10), (10, 12), (12, 24)]:
        logits, past = session.step(ids[start:stop], past)
        rows.append(logits)
    expected = torch_logits(model, torch.tensor(ids))
    got = torch.from_numpy(np.concatenate(rows))
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_left_padded_batch_matches_each_sequence_alone(make_model, stats_for, input_ids, tmp_path):
    # GroupQueryAttention treats padding as on the right; the exported
    # attention bias and per-sequence rotary make left padding exact too
    model = compressed(make_model, stats_for, "w4-rtn")
    out, _, _ = exported(model, tmp_path)
    session = DecoderSession.open(out).session
    pad = 5
    ids = input_ids.numpy().copy()
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    empty = np.zeros((2, model.config.num_key_value_heads, 0, model.config.head_dim), dtype=np.float32)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    feeds.update({i.name: empty for i in session.get_inputs() if i.name.startswith("past_key_values.")})
    logits = session.run(None, feeds)[0]
    alone = torch_logits(model, input_ids[1, pad:]).numpy()
    np.testing.assert_allclose(logits[1, pad:], alone, rtol=0, atol=network_tolerance(model.config, ids.shape[1]) * np.abs(alone).max())
    assert not np.isnan(logits).any()


def test_traced_attention_is_still_available(make_model, stats_for, input_ids, tmp_path):
    model = compressed(make_model, stats_for, "w4-rtn")
    out, report, graph = exported(model, tmp_path, attention="traced")
    assert report["attention"] == "traced" and not nodes(graph, "GroupQueryAttention")
    assert_parity(model, out, input_ids[0])
    with pytest.raises(FactorportError, match="attention form"):
        exported(model, tmp_path, "bad", attention="flash")


def test_accuracy_level_is_written_on_every_matmulnbits(make_model, stats_for, tmp_path):
    from factorport.formats.onnx.runtime import with_accuracy_level

    model = compressed(make_model, stats_for, "w4-rtn")
    _, _, graph = exported(model, tmp_path)
    assert with_accuracy_level(graph, 4) == len(nodes(graph, "MatMulNBits")) > 0
    assert {a.i for n in nodes(graph, "MatMulNBits") for a in n.attribute if a.name == "accuracy_level"} == {4}


# --- bad input --------------------------------------------------------------


@pytest.fixture
def small_export(make_model, stats_for, tmp_path):
    model = compressed(make_model, stats_for, "w4-rtn")
    out, _, _ = exported(model, tmp_path)
    return out


def test_missing_model_is_refused(tmp_path):
    with pytest.raises(FactorportError, match="has no model.onnx"):
        OnnxruntimeBackend.open(tmp_path)


def test_truncated_model_is_refused(small_export):
    path = small_export / "model.onnx"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(FactorportError, match="truncated"):
        OnnxruntimeBackend.open(small_export)


def test_external_data_outside_the_directory_is_refused(small_export, tmp_path):
    model = onnx.load(str(small_export / "model.onnx"))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 1024)
    onnx.save(model, str(small_export / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    model = onnx.load(str(small_export / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    onnx.save(model, str(small_export / "model.onnx"))
    with pytest.raises(FactorportError, match="outside the directory"):
        OnnxruntimeBackend.open(small_export)
    assert secret.read_bytes() == b"\0" * 1024


def int4_tied(make_model, stats_for, arch: str = "llama"):
    """w4-gptq-tied4: plain int4 decoder linears and an int4 tied table."""
    return compressed(make_model, stats_for, "w4-gptq-tied4", arch)


def test_the_tied_int4_table_is_stored_once(make_model, stats_for, input_ids, tmp_path):
    model = int4_tied(make_model, stats_for)
    out, report, graph = exported(model, tmp_path)
    assert report["embedding"] == "GatherBlockQuantized int4 (the lm_head's table)"
    (gather,) = nodes(graph, "GatherBlockQuantized")
    (lm_head,) = [n for n in nodes(graph, "MatMulNBits") if "lm_head" in n.name]
    producers = {o: n for n in graph.graph.node for o in n.output}
    # the gather's table and scales are Reshapes of the lm_head's own initializers
    assert [producers[gather.input[i]].op_type for i in (0, 2)] == ["Reshape", "Reshape"]
    assert [producers[gather.input[i]].input[0] for i in (0, 2)] == [lm_head.input[1], lm_head.input[2]]
    codes = next(i for i in graph.graph.initializer if i.name == lm_head.input[1])
    assert [i.name for i in graph.graph.initializer if i.raw_data == codes.raw_data] == [codes.name]  # stored once
    assert_parity(model, out, input_ids[0])
    # and the torch lookup reads the same codes the graph gathers
    ids = input_ids[0][:5]
    table = nbits.from_base(model.lm_head.base).dequantize()
    assert torch.equal(model.get_input_embeddings()(ids), table[ids])


def test_plain_int4_siblings_are_one_matmulnbits(make_model, stats_for, input_ids, tmp_path):
    model = compressed(make_model, stats_for, "w4-rtn", "qwen2")  # q/k/v biases ride along
    out, report, graph = exported(model, tmp_path)
    layers = model.config.num_hidden_layers
    widths = Counter({a.name: a.i for a in n.attribute}["N"] for n in nodes(graph, "MatMulNBits"))
    qkv = model.config.hidden_size + 2 * model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads)
    assert widths[qkv] == layers and widths[2 * model.config.intermediate_size] == layers
    assert sum(widths.values()) == 4 * layers and report["stacked_groups"] == 2 * layers
    assert_parity(model, out, input_ids[0])


def test_accuracy_level_is_written_and_each_session_sets_its_own(make_model, stats_for, input_ids, tmp_path):
    from factorport.formats.onnx.graph import load_structure
    from factorport.formats.onnx.runtime import written_accuracy_level

    model = int4_tied(make_model, stats_for)
    out, report, graph = exported(model, tmp_path, accuracy_level=4)
    levels = {a.i for n in nodes(graph, "MatMulNBits") for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4} and report["accuracy_level"] == 4
    assert written_accuracy_level(load_structure(out / "model.onnx")) == 4
    ids = input_ids[0]
    exact = DecoderSession.open(out).logits(ids)  # level 0 asked: the file's 4 is rewritten in memory
    fast = DecoderSession.open(out, accuracy_level=4).logits(ids)
    expected = torch_logits(model, ids)
    assert (exact - expected).abs().max() <= network_tolerance(model.config, len(ids)) * expected.abs().max()
    assert not torch.equal(exact, fast)  # int8 activations really ran
    with pytest.raises(FactorportError, match="accuracy_level 7 is not one of"):
        export(model, None, tmp_path / "bad", progress=False, accuracy_level=7)
