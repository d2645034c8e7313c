"""The compressed graph as data: which operator each linear is, and the
tensor names its slots use. Specified in docs/FORMAT.md; this module is the
single implementation of that spec, shared by every format writer/reader.

Tensor names (prefix = the linear's module path, e.g. model.layers.0.mlp.up_proj):

    {prefix}.base.weight                     dense base
    {prefix}.base.codes / .scale / .minimum  quantized base (minimum: asymmetric only)
    {prefix}.base.blocks                     ggml base: llama.cpp's raw blocks (uint8)
    {prefix}.base.indices                    block-sparse base: kept block columns (int32)
    {prefix}.base.values.*                   block-sparse base: its compact dense/quantized values
    {prefix}.U                               low-rank U (out, rank)
    {prefix}.projection.V                    private low-rank V (rank, in)
    {group}.V                                shared V, stored once at the group's name
    {prefix}.bias                            bias
"""

from __future__ import annotations

import torch
from ..architectures import arch_for, linear_names
from ..errors import FactorportError
from ..ops import BlockSparseBase, CompressedLinear, DenseBase, Projection, QuantizedBase, QuantSpec, TiedEmbedding

FORMAT_NAME = "factorport"
FORMAT_VERSION = 1


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def describe(model) -> dict:
    """The layout metadata of a (possibly partly) compressed model."""
    arch = arch_for(model.config)
    linears, shared = {}, {}
    for name in linear_names(model, arch):
        module = model.get_submodule(name)
        if not isinstance(module, CompressedLinear):
            continue
        entry = {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "base": None if module.base is None else module.base.spec(),
            "lowrank": None,
        }
        if module.U is not None:
            entry["lowrank"] = {"rank": module.rank, "dtype": _dtype_name(module.U), "shared": module.shared_name}
            if module.shared_name is not None:
                group = shared.setdefault(
                    module.shared_name,
                    {"rank": module.rank, "in_features": module.in_features, "dtype": _dtype_name(module.V.V), "members": []},
                )
                group["members"].append(name)
        linears[name] = entry
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        "tied_embeddings": isinstance(model.get_input_embeddings(), TiedEmbedding),
        "linears": linears,
        "shared": shared,
    }


# ---------------------------------------------------------------- rebuilding


def _take(tensors: dict, name: str) -> torch.Tensor:
    if name not in tensors:
        raise FactorportError(f"tensor '{name}' is missing from the file; the artifact is incomplete, re-export it")
    return tensors[name]


def _expect(t: torch.Tensor, shape: tuple, name: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise FactorportError(f"tensor '{name}' has shape {tuple(t.shape)}, the layout says {tuple(shape)}; the file is corrupted")
    return t


def _build_base(spec: dict, tensors: dict, prefix: str, out_features: int, in_features: int):
    kind = spec["kind"]
    if kind == "dense":
        return DenseBase(_expect(_take(tensors, f"{prefix}.weight"), (out_features, in_features), f"{prefix}.weight"))
    if kind == "quantized":
        qspec = QuantSpec(spec["bits"], spec["group_size"], spec["symmetric"])
        packed_cols = in_features // 2 if qspec.bits == 4 else in_features
        codes = _expect(_take(tensors, f"{prefix}.codes"), (out_features, packed_cols), f"{prefix}.codes")
        groups = (out_features, in_features // qspec.group_size)
        scale = _expect(_take(tensors, f"{prefix}.scale"), groups, f"{prefix}.scale")
        minimum = None
        if not qspec.symmetric:
            minimum = _expect(_take(tensors, f"{prefix}.minimum"), groups, f"{prefix}.minimum")
        return QuantizedBase(codes, scale, minimum, qspec, in_features)
    if kind == "ggml":
        from ..ops.ggml import GGMLBase, row_bytes

        try:
            width = row_bytes(in_features, spec["type"])
        except (KeyError, ValueError) as exc:
            raise FactorportError(f"{prefix}: ggml type {spec.get('type')!r} does not fit rows of {in_features}; the file is corrupted") from exc
        blocks = _expect(_take(tensors, f"{prefix}.blocks"), (out_features, width), f"{prefix}.blocks")
        return GGMLBase(blocks, spec["type"], in_features)
    if kind == "block_sparse":
        br, bc = spec["block_shape"]
        kept = spec["blocks_per_row"]
        indices = _expect(_take(tensors, f"{prefix}.indices"), (out_features // br, kept), f"{prefix}.indices")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= in_features // bc):
            raise FactorportError(f"tensor '{prefix}.indices' points outside the matrix; the file is corrupted")
        values = _build_base(spec["values"], tensors, f"{prefix}.values", out_features, kept * bc)
        return BlockSparseBase(indices, values, (br, bc), in_features)
    raise FactorportError(f"unknown base kind '{kind}' in the layout; upgrade factorport")


def rebuild(model, meta: dict, tensors: dict) -> None:
    """Replace the linears of a freshly built `model` by the operators `meta`
    describes, built from (and shape-checked against) `tensors`."""
    if meta.get("format") != FORMAT_NAME:
        raise FactorportError("the file's metadata is not a factorport layout")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise FactorportError(
            f"layout version {meta['format_version']} is newer than this factorport reads ({FORMAT_VERSION}); upgrade"
        )
    arch = arch_for(model.config)
    projections = {}
    for group, info in meta.get("shared", {}).items():
        v = _expect(_take(tensors, f"{group}.V"), (info["rank"], info["in_features"]), f"{group}.V")
        projections[group] = Projection(v)
        model.set_submodule(group, projections[group])
    for name, entry in meta["linears"].items():
        out_f, in_f = entry["out_features"], entry["in_features"]
        base = None if entry["base"] is None else _build_base(entry["base"], tensors, f"{name}.base", out_f, in_f)
        bias = _take(tensors, f"{name}.bias") if entry["bias"] else None
        u = projection = shared = None
        low = entry["lowrank"]
        if low is not None:
            u = _expect(_take(tensors, f"{name}.U"), (out_f, low["rank"]), f"{name}.U")
            shared = low["shared"]
            if shared is None:
                v = _expect(_take(tensors, f"{name}.projection.V"), (low["rank"], in_f), f"{name}.projection.V")
                projection = Projection(v)
            elif shared in projections:
                projection = projections[shared]
            else:
                raise FactorportError(f"{name} refers to shared projection '{shared}', which the layout does not list")
        module = CompressedLinear(in_f, out_f, base, u, projection, shared, bias=bias)
        model.set_submodule(name, module)
    if meta.get("tied_embeddings"):
        old = model.get_input_embeddings()
        model.set_input_embeddings(TiedEmbedding(model.get_submodule(arch.lm_head), getattr(old, "padding_idx", None)))

