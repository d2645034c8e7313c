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

import math
from collections import Counter

import torch
from torch import nn

from ..architectures import arch_for, embedding_scale, linear_names
from ..errors import FactorportError
from ..ops import BlockSparseBase, CompressedLinear, DenseBase, Projection, QuantizedBase, QuantSpec, TiedEmbedding
from ..ops.quant import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

FORMAT_NAME = "factorport"
# 1: one model.safetensors; 2: also sharded, with model.safetensors.index.json;
# 3: `table_dtype`, embedding and output tables kept in the source's 16-bit type (docs/FORMAT.md)
FORMAT_VERSION = 3


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def describe_linears(model, names) -> tuple[dict, dict]:
    """(linears, shared) of the layout for the compressed linears among `names`:
    one decoder layer's fragment, or the whole model's."""
    linears, shared = {}, {}
    for name in names:
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
    return linears, shared


def layout(model_type: str, tied_embeddings: bool, fragments, table_dtype: str | None = None) -> dict:
    """The layout metadata from `(linears, shared)` fragments (in model order);
    `table_dtype`: the dtype the plain embedding and output tables are stored
    in, when not the model dtype."""
    linears, shared = {}, {}
    for part_linears, part_shared in fragments:
        linears.update(part_linears)
        shared.update(part_shared)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_type": model_type,
        "tied_embeddings": tied_embeddings,
        "linears": linears,
        "shared": shared,
        "table_dtype": table_dtype,
    }


def describe(model) -> dict:
    """The layout metadata of a (possibly partly) compressed model."""
    fragment = describe_linears(model, linear_names(model, arch_for(model.config)))
    return layout(model.config.model_type, isinstance(model.get_input_embeddings(), TiedEmbedding), [fragment])


# ---------------------------------------------------------------- checking

# torch dtype name (as the layout writes it) -> safetensors dtype code
DTYPE_CODES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
    "int8": "I8", "uint8": "U8", "int16": "I16", "int32": "I32", "int64": "I64",
}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
TABLE_DTYPES = ("float16", "bfloat16")  # what `table_dtype` may name: narrower than the model's float32
# Expected dtype of the tensors the layout does not type (norms, embeddings,
# linears left dense, biases): one float dtype shared by all of them.
MODEL_DTYPE = "model dtype"
# ggml block types a `ggml` base may name: those gguf.quants decodes
# (not the integer types, nor Q8_1 / Q8_K, which llama.cpp uses for activations)
GGML_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4",
)
TOP_KEYS = ("format", "format_version", "model_type", "tied_embeddings", "linears", "shared", "table_dtype")
OLD_TOP_KEYS = TOP_KEYS[:-1]  # versions 1 and 2: no table_dtype (the tables have the model dtype)
LINEAR_KEYS = ("in_features", "out_features", "bias", "base", "lowrank")
LOWRANK_KEYS = ("rank", "dtype", "shared")
GROUP_KEYS = ("rank", "in_features", "dtype", "members")
BASE_KEYS = {
    "dense": ("kind", "dtype"),
    "quantized": ("kind", "bits", "group_size", "symmetric"),
    "ggml": ("kind", "type"),
    "block_sparse": ("kind", "block_shape", "blocks_per_row", "density", "values"),
}

Expected = dict[str, tuple[tuple[int, ...], str]]  # tensor -> (shape, dtype code or MODEL_DTYPE)


def _fail(source: str, what: str) -> FactorportError:
    return FactorportError(f"{source}: {what}; re-export it")


def _record(value, keys: tuple[str, ...], what: str, source: str) -> dict:
    """`value` as a JSON object with exactly `keys` (a key this reader does not
    know could change the meaning of the others)."""
    if not isinstance(value, dict) or set(value) != set(keys):
        got = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise _fail(source, f"the layout's {what} is {str(got)[:120]}, expected the keys {list(keys)}")
    return value


def _count(value, what: str, source: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _fail(source, f"the layout's {what} = {str(value)[:40]} is not an integer >= {minimum}")
    return value


def _flag(value, what: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(source, f"the layout's {what} = {str(value)[:40]} is not true/false")
    return value


def _float_code(value, what: str, source: str) -> str:
    if value not in FLOAT_DTYPES:
        raise _fail(source, f"the layout's {what} = {str(value)[:40]} is not one of {', '.join(FLOAT_DTYPES)}")
    return DTYPE_CODES[value]


def check_header(meta: dict, source: str) -> None:
    """The top-level fields: a factorport layout of a version this reader knows."""
    if meta.get("format") != FORMAT_NAME:
        raise FactorportError(f"{source}: the metadata is not a factorport layout; re-export it")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(source, f"the layout's format_version = {str(version)[:40]} is not a version number")
    if version > FORMAT_VERSION:
        raise FactorportError(f"{source}: layout version {version} is newer than this factorport reads ({FORMAT_VERSION}); upgrade")
    _record(meta, TOP_KEYS if version >= 3 else OLD_TOP_KEYS, "top level", source)
    _flag(meta["tied_embeddings"], "tied_embeddings", source)
    if meta.get("table_dtype") not in (None, *TABLE_DTYPES):
        raise _fail(source, f"the layout's table_dtype = {str(meta['table_dtype'])[:40]} is not one of {', '.join(TABLE_DTYPES)} (or null)")
    for key in ("linears", "shared"):
        if not isinstance(meta[key], dict):
            raise _fail(source, f"the layout's {key} is not a JSON object")


def _quantized_tensors(spec: dict, prefix: str, out_f: int, in_f: int, source: str) -> Expected:
    what = f"{prefix} spec"
    bits, group = _count(spec["bits"], f"{what} bits", source), _count(spec["group_size"], f"{what} group_size", source)
    if bits not in SUPPORTED_BITS:
        raise _fail(source, f"the layout's {what} has bits = {bits}, not one of {SUPPORTED_BITS}")
    if group not in SUPPORTED_GROUP_SIZES or in_f % group:
        raise _fail(source, f"the layout's {what} has group_size = {str(group)[:20]}, which is not one of {SUPPORTED_GROUP_SIZES} dividing {in_f}")
    symmetric = _flag(spec["symmetric"], f"{what} symmetric", source)
    codes_dtype = "I8" if bits == 8 and symmetric else "U8"
    tensors = {
        f"{prefix}.codes": ((out_f, in_f // 2 if bits == 4 else in_f), codes_dtype),
        f"{prefix}.scale": ((out_f, in_f // group), "F16"),
    }
    if not symmetric:
        tensors[f"{prefix}.minimum"] = ((out_f, in_f // group), "F16")
    return tensors


def _ggml_tensors(spec: dict, prefix: str, out_f: int, in_f: int, source: str) -> Expected:
    from ..ops.ggml import row_bytes

    if spec["type"] not in GGML_TYPES:
        raise _fail(source, f"the layout's {prefix} has ggml type {str(spec['type'])[:20]!r}, not one of {', '.join(GGML_TYPES)}")
    try:
        width = row_bytes(in_f, spec["type"])
    except ValueError:
        raise _fail(source, f"{prefix}: ggml type {spec['type']} does not fit rows of {in_f}") from None
    return {f"{prefix}.blocks": ((out_f, width), "U8")}


def _block_sparse_tensors(spec: dict, prefix: str, out_f: int, in_f: int, source: str) -> Expected:
    shape = spec["block_shape"]
    if not (isinstance(shape, list) and len(shape) == 2):
        raise _fail(source, f"the layout's {prefix} block_shape is not [block_rows, block_cols]")
    br = _count(shape[0], f"{prefix} block_rows", source)
    bc = _count(shape[1], f"{prefix} block_cols", source)
    if out_f % br or in_f % bc:
        raise _fail(source, f"the layout's {prefix} block shape {br}x{bc} does not tile the {out_f}x{in_f} weight")
    kept = _count(spec["blocks_per_row"], f"{prefix} blocks_per_row", source)
    if kept > in_f // bc:
        raise _fail(source, f"the layout's {prefix} keeps {kept} blocks per row of {in_f // bc}")
    density = spec["density"]
    if not isinstance(density, (int, float)) or isinstance(density, bool) or not math.isclose(density, kept * bc / in_f, rel_tol=1e-9):
        raise _fail(source, f"the layout's {prefix} density = {str(density)[:20]} is not blocks_per_row x block_cols / in = {kept * bc / in_f}")
    values = spec["values"]
    if not isinstance(values, dict) or values.get("kind") not in ("dense", "quantized"):
        raise _fail(source, f"the layout's {prefix} values are not a dense or quantized base")
    tensors = base_tensors(values, f"{prefix}.values", out_f, kept * bc, source)
    tensors[f"{prefix}.indices"] = ((out_f // br, kept), "I32")
    return tensors


def base_tensors(spec, prefix: str, out_f: int, in_f: int, source: str) -> Expected:
    """The tensors (shape, dtype) a base spec of an (out_f, in_f) weight names."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if not isinstance(kind, str) or kind not in BASE_KEYS:
        raise FactorportError(f"{source}: unknown base kind {str(kind)[:40]!r} for {prefix} in the layout; upgrade factorport or re-export it")
    spec = _record(spec, BASE_KEYS[kind], f"{prefix} spec", source)
    if kind == "dense":
        return {f"{prefix}.weight": ((out_f, in_f), _float_code(spec["dtype"], f"{prefix} dtype", source))}
    if kind == "quantized":
        return _quantized_tensors(spec, prefix, out_f, in_f, source)
    if kind == "ggml":
        return _ggml_tensors(spec, prefix, out_f, in_f, source)
    return _block_sparse_tensors(spec, prefix, out_f, in_f, source)


def _lowrank_tensors(name: str, low, out_f: int, in_f: int, shared: dict, source: str) -> Expected:
    low = _record(low, LOWRANK_KEYS, f"{name} lowrank", source)
    rank = _count(low["rank"], f"{name} rank", source)
    code = _float_code(low["dtype"], f"{name} lowrank dtype", source)
    tensors = {f"{name}.U": ((out_f, rank), code)}
    group = low["shared"]
    if group is None:
        tensors[f"{name}.projection.V"] = ((rank, in_f), code)
        return tensors
    if not isinstance(group, str) or group not in shared:
        raise _fail(source, f"{name} refers to shared projection {str(group)[:80]!r}, which the layout does not list")
    info = _group_record(group, shared[group], source)
    if (info["rank"], info["in_features"]) != (rank, in_f):
        raise _fail(source, f"{name} (rank {rank}, in {in_f}) does not fit its shared group {group} (rank {info['rank']}, in {info['in_features']})")
    if name not in info["members"]:
        raise _fail(source, f"{name} refers to shared group {group}, which does not list it as a member")
    return tensors


def _linear_tensors(name: str, entry, linear: nn.Linear, shared: dict, source: str) -> Expected:
    entry = _record(entry, LINEAR_KEYS, f"entry of {name}", source)
    out_f, in_f, has_bias = linear.out_features, linear.in_features, linear.bias is not None
    shape = (_count(entry["out_features"], f"{name} out_features", source), _count(entry["in_features"], f"{name} in_features", source))
    if shape != (out_f, in_f):
        raise _fail(source, f"the layout makes {name} {shape[0]}x{shape[1]}, config.json makes it {out_f}x{in_f}")
    if _flag(entry["bias"], f"{name} bias", source) != has_bias:
        raise _fail(source, f"the layout says {name} has {'a' if entry['bias'] else 'no'} bias, this architecture says the opposite")
    if entry["base"] is None and entry["lowrank"] is None:
        raise _fail(source, f"the layout gives {name} neither a base nor a low-rank term")
    tensors = {} if entry["base"] is None else base_tensors(entry["base"], f"{name}.base", out_f, in_f, source)
    if entry["lowrank"] is not None:
        tensors.update(_lowrank_tensors(name, entry["lowrank"], out_f, in_f, shared, source))
    if has_bias:
        tensors[f"{name}.bias"] = ((out_f,), MODEL_DTYPE)
    return tensors


def _group_record(group: str, info, source: str) -> dict:
    info = _record(info, GROUP_KEYS, f"shared group {group}", source)
    _count(info["rank"], f"{group} rank", source)
    _count(info["in_features"], f"{group} in_features", source)
    members = info["members"]
    if not (isinstance(members, list) and members and all(isinstance(m, str) for m in members) and len(set(members)) == len(members)):
        raise _fail(source, f"the layout's shared group {group} members are not a non-empty list of distinct names")
    return info


def _group_tensors(group: str, info, linears: dict, skeleton, source: str) -> Expected:
    info = _group_record(group, info, source)
    code = _float_code(info["dtype"], f"{group} dtype", source)
    for member in info["members"]:
        low = linears.get(member, {}).get("lowrank") if isinstance(linears.get(member), dict) else None
        if not isinstance(low, dict) or low.get("shared") != group:
            raise _fail(source, f"shared group {group} lists {member[:80]}, whose V is not the group's")
    _check_group_name(group, linears, skeleton, source)
    return {f"{group}.V": ((info["rank"], info["in_features"]), code)}


def _check_group_name(group: str, linears: dict, skeleton, source: str) -> None:
    """A group's V is registered as a new module beside its members: its name
    must not replace (or hide inside) anything the model already has."""
    parent, _, leaf = group.rpartition(".")
    try:
        holder = skeleton.get_submodule(parent)
    except AttributeError:
        holder = None
    inside_linear = any(parent == n or parent.startswith(n + ".") for n in linears)
    if holder is None or inside_linear or not leaf.isidentifier() or hasattr(holder, leaf):
        raise _fail(source, f"shared group name {group[:80]!r} is not a free module name beside its members")


def table_names(arch) -> tuple[str, str]:
    """The embedding and output tables, the tensors `table_dtype` applies to."""
    return f"{arch.embed}.weight", f"{arch.lm_head}.weight"


def _plain_tensors(skeleton, meta: dict, arch) -> Expected:
    """Tensors the layout does not describe: the skeleton's own, less the
    compressed linears, the tied output projection (stored once, as the
    embedding) and, with a compressed tied table, the embedding. The tables
    have `table_dtype` where the layout sets one."""
    linears, tied = meta["linears"], meta["tied_embeddings"]
    alias = f"{arch.lm_head}.weight" if getattr(skeleton.config, "tie_word_embeddings", False) else None
    table_code = DTYPE_CODES[meta["table_dtype"]] if meta.get("table_dtype") else MODEL_DTYPE
    tables = table_names(arch)
    tensors = {}
    for key, t in skeleton.state_dict(keep_vars=True).items():
        owner = key.rpartition(".")[0]
        if key == alias or owner in linears or (tied and owner == arch.embed):
            continue
        tensors[key] = (tuple(t.shape), table_code if key in tables else MODEL_DTYPE)
    return tensors


def expected_tensors(meta: dict, skeleton, source: str) -> Expected:
    """Every tensor the file must hold, with its shape and dtype, from the
    layout and the model skeleton (which may live on the meta device)."""
    check_header(meta, source)
    arch = arch_for(skeleton.config)
    if meta["model_type"] != skeleton.config.model_type:
        raise _fail(source, f"the layout is for {str(meta['model_type'])[:40]!r}, config.json for {skeleton.config.model_type!r}")
    known = set(linear_names(skeleton, arch))
    linears, shared = meta["linears"], meta["shared"]
    if meta["tied_embeddings"] and arch.lm_head not in linears:
        raise _fail(source, f"the layout ties the embedding to {arch.lm_head}, which it does not compress")
    expected: Expected = {}
    for name, entry in linears.items():
        if name not in known:
            raise _fail(source, f"the layout names {name[:80]!r}, which is not a linear of this {arch.model_type} model")
        expected.update(_linear_tensors(name, entry, skeleton.get_submodule(name), shared, source))
    for group, info in shared.items():
        expected.update(_group_tensors(group, info, linears, skeleton, source))
    expected.update(_plain_tensors(skeleton, meta, arch))
    return expected


def verify_tensors(meta: dict, table: dict[str, tuple[str, tuple[int, ...]]], skeleton, source: str) -> None:
    """The file's tensor table ({name: (dtype code, shape)}) holds exactly the
    tensors the layout and the skeleton name: none missing, none left over,
    each with its shape and dtype; the untyped ones share one float dtype."""
    expected = expected_tensors(meta, skeleton, source)
    untyped = {}
    for name, (shape, dtype) in expected.items():
        if name not in table:
            raise _fail(source, f"tensor '{name}' is missing from the file; the artifact is incomplete")
        code, got = table[name]
        if tuple(got) != shape:
            raise _fail(source, f"tensor '{name}' has shape {tuple(got)}, the layout says {shape}; the file is corrupted")
        if dtype == MODEL_DTYPE:
            untyped[name] = code
        elif code != dtype:
            raise _fail(source, f"tensor '{name}' is {code}, the layout says {dtype}; the file is corrupted")
    for name in table:
        if name not in expected:
            raise _fail(source, f"tensor '{name}' is unexpected: the layout does not account for it")
    _check_model_dtype(untyped, source)


def _check_model_dtype(untyped: dict[str, str], source: str) -> None:
    floats = {DTYPE_CODES[d] for d in FLOAT_DTYPES}
    counts = Counter(untyped.values())
    if not counts:
        return
    common = counts.most_common(1)[0][0]
    for name, code in untyped.items():
        if code not in floats or code != common:
            theirs = f"the model's other tensors are {common}" if code != common else "not a float type"
            raise _fail(source, f"tensor '{name}' is {code}, {theirs}; the file is corrupted")


# ---------------------------------------------------------------- rebuilding


def _take(tensors: dict, name: str) -> torch.Tensor:
    if name not in tensors:
        raise FactorportError(f"tensor '{name}' is missing from the file; the artifact is incomplete, re-export it")
    return tensors[name]


def _check_indices(indices: torch.Tensor, columns: int, name: str, source: str) -> None:
    """Kept block columns: in range and strictly ascending in every block-row
    (the spec's order; a repeated column would add a block twice)."""
    if not indices.numel():
        return
    if int(indices.min()) < 0 or int(indices.max()) >= columns:
        raise _fail(source, f"tensor '{name}' points outside the matrix; the file is corrupted")
    if indices.shape[1] > 1 and not bool((indices[:, 1:] > indices[:, :-1]).all()):
        raise _fail(source, f"tensor '{name}' is not strictly ascending in every row; the file is corrupted")


def _build_base(spec: dict, tensors: dict, prefix: str, out_features: int, in_features: int, source: str):
    kind = spec["kind"]
    if kind == "dense":
        return DenseBase(_take(tensors, f"{prefix}.weight"))
    if kind == "quantized":
        qspec = QuantSpec(spec["bits"], spec["group_size"], spec["symmetric"])
        codes = _take(tensors, f"{prefix}.codes")
        if qspec.bits == 8 and qspec.symmetric and codes.numel() and int(codes.min()) < -127:
            raise _fail(source, f"tensor '{prefix}.codes' holds -128, outside the symmetric int8 grid; the file is corrupted")
        minimum = None if qspec.symmetric else _take(tensors, f"{prefix}.minimum")
        return QuantizedBase(codes, _take(tensors, f"{prefix}.scale"), minimum, qspec, in_features)
    if kind == "ggml":
        from ..ops.ggml import GGMLBase

        return GGMLBase(_take(tensors, f"{prefix}.blocks"), spec["type"], in_features)
    br, bc = spec["block_shape"]
    kept = spec["blocks_per_row"]
    indices = _take(tensors, f"{prefix}.indices")
    _check_indices(indices, in_features // bc, f"{prefix}.indices", source)
    values = _build_base(spec["values"], tensors, f"{prefix}.values", out_features, kept * bc, source)
    return BlockSparseBase(indices, values, (br, bc), in_features)


def rebuild(model, meta: dict, tensors: dict, source: str = "the file") -> None:
    """Replace the linears of a freshly built `model` by the operators `meta`
    describes, built from `tensors`. Call `verify_tensors` first: this checks
    only what needs the tensor data (block indices, int8 codes)."""
    arch = arch_for(model.config)
    projections = {}
    for group in meta.get("shared", {}):
        projections[group] = Projection(_take(tensors, f"{group}.V"))
        model.set_submodule(group, projections[group])
    for name, entry in meta["linears"].items():
        out_f, in_f = entry["out_features"], entry["in_features"]
        base = None if entry["base"] is None else _build_base(entry["base"], tensors, f"{name}.base", out_f, in_f, source)
        bias = _take(tensors, f"{name}.bias") if entry["bias"] else None
        u = projection = shared = None
        low = entry["lowrank"]
        if low is not None:
            u = _take(tensors, f"{name}.U")
            shared = low["shared"]
            projection = Projection(_take(tensors, f"{name}.projection.V")) if shared is None else projections[shared]
        module = CompressedLinear(in_f, out_f, base, u, projection, shared, bias=bias)
        model.set_submodule(name, module)
    if meta.get("tied_embeddings"):
        old = model.get_input_embeddings()
        model.set_input_embeddings(TiedEmbedding(model.get_submodule(arch.lm_head), getattr(old, "padding_idx", None), embedding_scale(model.config)))


def widen_tables(model, meta: dict) -> None:
    """Give tables stored in `table_dtype` the model dtype (the final norm's),
    after the file's tensors are attached: the model computes as it did before
    saving (a 16-bit float widens exactly)."""
    if not meta.get("table_dtype"):
        return
    arch = arch_for(model.config)
    dtype = model.get_submodule(arch.norm).weight.dtype
    for name in table_names(arch):
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, (nn.Embedding, nn.Linear)) and module.weight.dtype != dtype:
            module.weight = nn.Parameter(module.weight.to(dtype), requires_grad=False)
