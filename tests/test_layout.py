"""formats: the safetensors layout round-trips bit for bit, stores a shared V
once, and reports truncation, missing tensors and changed files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from factorport.architectures import arch_for
from factorport.converters import FactorizeConfig, QuantizeConfig, apply
from factorport.converters.ranks import RankPolicy
from factorport.errors import FactorportError
from factorport.formats import manifest, safetensors_dir
from factorport.formats.layout import describe
from factorport.formats.summary import format_table, inspect_artifact
from factorport.ops import BlockSparseBase, CompressedLinear, DenseBase, Projection, QuantizedBase, QuantSpec, TiedEmbedding

GROUP = "model.layers.0.self_attn.qkv_shared"
QKV = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]


def _members(model) -> list[str]:
    """Layer 0's linears that read the attention input: q/k/v, or phi3's one fused linear."""
    return [f"model.layers.0.{rel}" for rel in arch_for(model.config).input_groups[0]]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _share_qkv(model, rank=4, seed=0):
    """GlowQ-style: q/k/v keep their base and get a low-rank term with one shared V."""
    g = torch.Generator().manual_seed(seed)
    proj = Projection(0.1 * torch.randn(rank, model.config.hidden_size, generator=g))
    model.set_submodule(GROUP, proj)
    for name in _members(model):
        m = model.get_submodule(name)
        m.set_lowrank(0.1 * torch.randn(m.out_features, rank, generator=g), proj, GROUP)
    return proj


def _compress(model, lm_head=True):
    targets = ("linears", "lm_head") if lm_head else ("linears",)
    apply(model, [("quantize", QuantizeConfig(targets=targets, bits=4, group_size=32, symmetric=False))], None, progress=False)
    return _share_qkv(model)


def _keys(directory):
    with safe_open(str(directory / safetensors_dir.WEIGHTS), framework="pt") as fh:
        return list(fh.keys())


def _save(model, directory):
    directory.mkdir(exist_ok=True)
    return safetensors_dir.save(model, None, directory)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3_text"])
def test_round_trip_bit_identical(make_model, input_ids, tmp_path, arch):
    model = make_model(arch)
    _compress(model)
    ref = _logits(model, input_ids)
    meta = _save(model, tmp_path / "st")
    assert (tmp_path / "st" / "config.json").is_file()
    loaded, tokenizer = safetensors_dir.load(tmp_path / "st")
    assert tokenizer is None
    assert torch.equal(_logits(loaded, input_ids), ref)
    # in the real decoder q/k/v read one tensor: the shared V·x is computed once per forward
    assert loaded.get_submodule(GROUP).calls == 1
    # the loaded graph is the compressed one, not a densified copy
    members = _members(model)
    q = loaded.get_submodule(members[0])
    assert isinstance(q, CompressedLinear) and isinstance(q.base, QuantizedBase)
    assert q.shared_name == GROUP and q.V is loaded.get_submodule(GROUP)
    assert all(loaded.get_submodule(n).V is q.V for n in members)
    assert describe(loaded) == meta
    if arch == "llama":
        assert isinstance(loaded.get_input_embeddings(), TiedEmbedding)
        assert loaded.get_input_embeddings()._linear is loaded.lm_head
    if arch == "qwen2":
        assert all(loaded.get_submodule(n).bias is not None for n in members)
        assert torch.equal(loaded.get_submodule(QKV[1]).bias, model.get_submodule(QKV[1]).bias)


def test_shared_v_stored_once(llama, tmp_path):
    proj = _compress(llama)
    meta = _save(llama, tmp_path)
    keys = _keys(tmp_path)
    v_keys = [k for k in keys if k.endswith(".V")]
    assert v_keys == [f"{GROUP}.V"]
    for name in QKV:
        assert f"{name}.U" in keys
        assert f"{name}.projection.V" not in keys
    assert meta["shared"] == {GROUP: {"rank": 4, "in_features": 64, "dtype": "float32", "members": QKV}}
    for name in QKV:
        assert meta["linears"][name]["lowrank"] == {"rank": 4, "dtype": "float32", "shared": GROUP}
    with safe_open(str(tmp_path / safetensors_dir.WEIGHTS), framework="pt") as fh:
        assert torch.equal(fh.get_tensor(f"{GROUP}.V"), proj.V)
        header = json.loads(fh.metadata()[safetensors_dir.METADATA_KEY])
    assert header == meta


def test_tied_table_stored_once(llama, tmp_path):
    """A tied model with a compressed lm_head stores no float embedding table;
    with a dense lm_head the table is stored once and re-tied on load."""
    _compress(llama, lm_head=True)
    _save(llama, tmp_path / "a")
    keys = _keys(tmp_path / "a")
    assert "lm_head.base.codes" in keys
    assert not any(k.startswith("model.embed_tokens") for k in keys)


def test_dense_tied_head_round_trip(make_model, input_ids, tmp_path):
    model = make_model("llama")
    _compress(model, lm_head=False)
    ref = _logits(model, input_ids)
    _save(model, tmp_path)
    keys = _keys(tmp_path)
    assert ("model.embed_tokens.weight" in keys) != ("lm_head.weight" in keys)  # exactly one copy
    loaded, _ = safetensors_dir.load(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(_logits(loaded, input_ids), ref)


def _block_sparse(out, inp, quantized, seed=0):
    g = torch.Generator().manual_seed(seed)
    br, bc, kept = 16, 32, 1
    indices = torch.stack([torch.randperm(inp // bc, generator=g)[:kept].sort().values for _ in range(out // br)])
    compact = 0.05 * torch.randn(out, kept * bc, generator=g)
    values = QuantizedBase.from_weight(compact, QuantSpec(4, 32, True)) if quantized else DenseBase(compact)
    return BlockSparseBase(indices, values, (br, bc), inp)


def test_every_operator_kind_round_trips(mistral, input_ids, tmp_path):
    g = torch.Generator().manual_seed(1)
    layer = "model.layers.1"
    # dense base + private low rank, block-sparse (dense values), block-sparse (int4 values) + low rank,
    # int8 symmetric, int4 asymmetric group 64
    o = mistral.get_submodule(f"{layer}.self_attn.o_proj")
    mistral.set_submodule(
        f"{layer}.self_attn.o_proj",
        CompressedLinear(64, 64, DenseBase(o.weight.detach()), 0.1 * torch.randn(64, 3, generator=g), Projection(0.1 * torch.randn(3, 64, generator=g))),
    )
    mistral.set_submodule(f"{layer}.mlp.gate_proj", CompressedLinear(64, 128, _block_sparse(128, 64, False)))
    mistral.set_submodule(
        f"{layer}.mlp.up_proj",
        CompressedLinear(64, 128, _block_sparse(128, 64, True, seed=2), 0.1 * torch.randn(128, 2, generator=g), Projection(0.1 * torch.randn(2, 64, generator=g))),
    )
    d = mistral.get_submodule(f"{layer}.mlp.down_proj")
    mistral.set_submodule(f"{layer}.mlp.down_proj", CompressedLinear(128, 64, QuantizedBase.from_weight(d.weight.detach(), QuantSpec(8, 64, True))))
    apply(mistral, [("quantize", QuantizeConfig(targets=("model.layers.0.*",), bits=4, group_size=64, symmetric=False))], None, progress=False)
    ref = _logits(mistral, input_ids)
    meta = _save(mistral, tmp_path)
    up = meta["linears"][f"{layer}.mlp.up_proj"]
    assert up["base"]["kind"] == "block_sparse" and up["base"]["values"]["kind"] == "quantized"
    assert up["lowrank"]["shared"] is None
    keys = _keys(tmp_path)
    for suffix in ("base.indices", "base.values.codes", "base.values.scale", "U", "projection.V"):
        assert f"{layer}.mlp.up_proj.{suffix}" in keys
    assert f"{layer}.mlp.gate_proj.base.values.weight" in keys
    assert "model.layers.0.mlp.up_proj.base.minimum" in keys
    assert f"{layer}.mlp.down_proj.base.minimum" not in keys
    loaded, _ = safetensors_dir.load(tmp_path)
    assert torch.equal(_logits(loaded, input_ids), ref)
    assert isinstance(loaded.get_submodule(f"{layer}.mlp.up_proj").base, BlockSparseBase)


@pytest.mark.parametrize("shared", [False, True])
def test_factorized_round_trip(make_model, input_ids, tmp_path, shared):
    model = make_model("llama")
    apply(model, [("factorize", FactorizeConfig(method="plain", ranks=RankPolicy(rank=8)))], None, progress=False)
    if shared:  # q/k/v with no base and one shared V
        _share_qkv(model, rank=8)
    ref = _logits(model, input_ids)
    _save(model, tmp_path)
    loaded, _ = safetensors_dir.load(tmp_path)
    assert torch.equal(_logits(loaded, input_ids), ref)


# ------------------------------------------------------------------ corruption


@pytest.fixture
def artifact(make_model, tmp_path):
    model = make_model("llama")
    _compress(model)
    directory = tmp_path / "out" / safetensors_dir.SUBDIR
    directory.mkdir(parents=True)
    safetensors_dir.save(model, None, directory)
    return directory


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(artifact, keep):
    path = artifact / safetensors_dir.WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(FactorportError, match="truncated or corrupted"):
        safetensors_dir.load(artifact)


def test_header_only_garbage(artifact):
    (artifact / safetensors_dir.WEIGHTS).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(FactorportError, match="truncated or corrupted"):
        safetensors_dir.load(artifact)


def _rewrite(artifact, change):
    path = artifact / safetensors_dir.WEIGHTS
    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata()
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_missing_tensor(artifact):
    _rewrite(artifact, lambda t: t.pop("model.layers.1.mlp.up_proj.base.scale"))
    with pytest.raises(FactorportError, match=r"model\.layers\.1\.mlp\.up_proj\.base\.scale' is missing"):
        safetensors_dir.load(artifact)


def test_missing_shared_v(artifact):
    _rewrite(artifact, lambda t: t.pop(f"{GROUP}.V"))
    with pytest.raises(FactorportError, match="qkv_shared.V"):
        safetensors_dir.load(artifact)


def test_wrong_shape(artifact):
    def change(t):
        t["model.layers.0.self_attn.q_proj.U"] = torch.zeros(64, 5)

    _rewrite(artifact, change)
    with pytest.raises(FactorportError, match=r"q_proj\.U' has shape \(64, 5\)"):
        safetensors_dir.load(artifact)


def test_unexpected_tensor(artifact):
    def change(t):
        t["model.layers.0.extra"] = torch.zeros(3)

    _rewrite(artifact, change)
    with pytest.raises(FactorportError, match="extra' is unexpected"):
        safetensors_dir.load(artifact)


def test_plain_safetensors_is_not_an_artifact(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / safetensors_dir.WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(FactorportError, match="no factorport layout"):
        safetensors_dir.read_metadata(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert safetensors_dir.find_artifact(tmp_path) is None


def test_find_artifact(artifact):
    assert safetensors_dir.find_artifact(artifact) == artifact
    assert safetensors_dir.find_artifact(artifact.parent) == artifact  # an output directory
    assert safetensors_dir.find_artifact(artifact.parent.parent) is None


# ------------------------------------------------------------------ inspect


def test_inspect_totals(artifact):
    summary = inspect_artifact(artifact.parent)
    assert summary["path"] == str(artifact)
    with safe_open(str(artifact / safetensors_dir.WEIGHTS), framework="pt") as fh:
        sizes = {k: fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in fh.keys()}
    totals = summary["totals"]
    assert totals["total_bytes"] == sum(sizes.values())
    assert totals["compressed_bytes"] + totals["other_bytes"] == totals["total_bytes"]
    assert totals["file_bytes"] == (artifact / safetensors_dir.WEIGHTS).stat().st_size > totals["total_bytes"]
    assert totals["compressed_linears"] == 15  # 14 decoder linears + lm_head
    # per-layer bytes and the shared V add up to the compressed bytes
    assert sum(layer["bytes"] for layer in summary["layers"]) + sum(summary["shared"].values()) == totals["compressed_bytes"]
    assert summary["shared"] == {GROUP: sizes[f"{GROUP}.V"]}
    # what is left is the norms (no embedding table: the head is compressed and tied)
    norms = {k: v for k, v in sizes.items() if "norm" in k}
    assert totals["other_bytes"] == sum(norms.values())
    by_name = {layer["name"]: layer for layer in summary["layers"]}
    q = by_name["model.layers.0.self_attn.q_proj"]
    assert q["operator"] == "quantized int4a+lowrank (shared V)"
    assert (q["bits"], q["group_size"], q["rank"], q["shape"]) == (4, 32, 4, [64, 64])
    # 64x64 int4: 2048 code bytes + 64x2 groups of fp16 scale and minimum + U (64x4 fp32)
    assert q["bytes"] == 64 * 32 + 2 * (64 * 2 * 2) + 64 * 4 * 4
    assert by_name["model.layers.0.self_attn.o_proj"]["operator"] == "quantized int4a"
    assert summary["tied_embeddings"] is True
    table = format_table(summary)
    assert "shared projection" in table and f"{totals['total_bytes']:,}" in table


def test_inspect_not_an_artifact(tmp_path):
    with pytest.raises(FactorportError, match="not a factorport artifact"):
        inspect_artifact(tmp_path)


# ------------------------------------------------------------------ manifest


def test_manifest_detects_changes(artifact):
    root = artifact.parent
    (root / "report").mkdir()
    (root / "report" / "convert.json").write_text("{}\n")
    written = manifest.write_manifest(root, {"recipe": {"name": "t"}})
    assert set(written["files"]) == {
        "safetensors/model.safetensors",
        "safetensors/config.json",
        "safetensors/generation_config.json",
        "report/convert.json",
    }
    assert manifest.read_manifest(root)["recipe"] == {"name": "t"}
    assert "torch" in written["packages"]
    assert manifest.verify_manifest(root) == []

    weights = artifact / safetensors_dir.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one tensor
    weights.write_bytes(bytes(data))
    assert manifest.verify_manifest(root) == ["safetensors/model.safetensors: sha256 differs from the manifest"]

    (root / "report" / "convert.json").unlink()
    problems = manifest.verify_manifest(root)
    assert "report/convert.json: missing" in problems and len(problems) == 2


def test_manifest_absent_or_broken(tmp_path):
    with pytest.raises(FactorportError, match="no manifest.json"):
        manifest.verify_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(FactorportError, match="not valid JSON"):
        manifest.verify_manifest(tmp_path)


def test_merged_pieces_hold_every_tensor_in_write_order(tmp_path):
    """Two pieces whose names interleave in name order, several dtypes, an
    empty tensor and a chunk smaller than a tensor: the merged file reads
    back every tensor bit for bit, through the checked reader."""
    first = {"model.layers.10.a": torch.randn(7, 5), "model.layers.2.b": torch.randint(0, 255, (33,), dtype=torch.uint8),
             "z.empty": torch.empty(0, 3, dtype=torch.float16)}
    second = {"model.layers.1.c": torch.randn(4, dtype=torch.float64), "model.layers.3.d": torch.randn(9).to(torch.bfloat16)}
    paths = [tmp_path / "one.safetensors", tmp_path / "two.safetensors"]
    for path, tensors in zip(paths, (first, second)):
        safetensors_dir.write_file(path, tensors, {"format": "pt"})
    merged = tmp_path / "merged.safetensors"
    safetensors_dir.merge_files(paths, merged, {"format": "pt", "k": "v"}, chunk=8)
    back = safetensors_dir.read_file_tensors(merged)
    assert set(back) == set(first) | set(second)
    assert all(torch.equal(back[k], t) for k, t in {**first, **second}.items())
    entries, metadata = safetensors_dir.read_header(merged)
    assert metadata == {"format": "pt", "k": "v"}
    assert [n for n, _ in sorted(entries.items(), key=lambda item: item[1].offset)] == sorted(entries)
