"""Torch modules that trace to the ONNX form of each compressed operator.

Before export, every `CompressedLinear` of the model is swapped for an
`ExportLinear` (and a tied embedding for an `ExportEmbedding`); Optimum's
exporter then traces the decoder as usual and each slot comes out as what it
is:

    dense base          -> MatMul over the (in, out) weight
    quantized base      -> com.microsoft.MatMulNBits over factorport's codes
    block-sparse base   -> see `sparse` (column tiles / gathered blocks / densified)
    low-rank term       -> MatMul(V) then MatMul(U), float32, added to the base
    shared V            -> the whole group as one linear (`ExportGroup`): one
                           MatMul(V), one MatMul over the members' U side by
                           side, one base over their rows stacked (when the
                           bases have one form), one Add, then a Split; each
                           member (`GroupMember`) returns its slice. Decode
                           at batch 1 pays per node, so 3 (q/k/v) or 2
                           (gate/up) of each become one.
    plain int4 group    -> q/k/v (gate/up) without low-rank term, one grid:
                           one MatMulNBits over the rows stacked, then Split.

Swapping is undone afterwards (`swapped` is a context manager), so the model
handed to the exporter is left as it was.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import nn

from ...architectures import arch_for, input_groups, linear_names
from ...ops import BlockSparseBase, CompressedLinear, DenseBase, QuantizedBase, TiedEmbedding
from . import nbits, sparse


class DenseMatMul(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight_t", weight.float().T.contiguous())  # (in, out): a plain MatMul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight_t.to(x.dtype)


class ExportProjection(nn.Module):
    """z = x @ V^T in float32, computed once per input tensor (shared V)."""

    def __init__(self, v: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("v_t", v.float().T.contiguous())
        self._last: tuple[weakref.ref, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is not None and self._last[0]() is x:
            return self._last[1]
        z = x.float() @ self.v_t
        self._last = (weakref.ref(x), z)
        return z


def base_module(base, densify_sparse: bool) -> nn.Module:
    if isinstance(base, DenseBase):
        return DenseMatMul(base.weight)
    if isinstance(base, QuantizedBase):
        if base.qspec.bits == 8 and base.qspec.symmetric:
            return nbits.Int8AsInt4Pair(nbits.from_base(base))
        if nbits.supported(base.qspec):
            return nbits.NBitsMatMul(nbits.from_base(base))
        return DenseMatMul(base.to_dense())  # asymmetric int8: no CPU kernel (see nbits)
    if isinstance(base, BlockSparseBase):
        return sparse.sparse_module(base, densify_sparse)
    raise ValueError(f"no ONNX form for base kind {getattr(base, 'kind', type(base).__name__)}")


class ExportLinear(nn.Module):
    """`base(x) + (x V^T) U^T + bias`, each term in its ONNX form."""

    def __init__(self, linear: CompressedLinear, projection: ExportProjection | None, densify_sparse: bool) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.base = None if linear.base is None else base_module(linear.base, densify_sparse)
        self.projection = projection
        self.register_buffer("u_t", None if linear.U is None else linear.U.float().T.contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None if self.base is None else self.base(x)
        if self.u_t is not None:
            low = (self.projection(x) @ self.u_t).to(x.dtype)
            y = low if y is None else y + low
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


class ExportEmbedding(nn.Module):
    """Tied embedding: rows of the compressed lm_head's dense weight."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.float().contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


class ScaledRows(nn.Module):
    """An embedding lookup whose rows are multiplied by a constant (Gemma's sqrt(hidden))."""

    def __init__(self, lookup: nn.Module, scale: float) -> None:
        super().__init__()
        self.lookup = lookup
        self.scale = scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(ids) * self.scale


def embedding_module(linear: CompressedLinear) -> tuple[nn.Module, str]:
    """The lookup for a tied, compressed lm_head, and how it is computed.

    A symmetric quantized lm_head without low-rank term or bias reads its own
    int codes through GatherBlockQuantized (the table stays int8/int4 in the
    file); anything else gathers rows of a float32 copy of the dense weight.
    """
    base = linear.base
    plain = linear.U is None and linear.bias is None
    if plain and isinstance(base, QuantizedBase) and base.qspec.symmetric:
        return nbits.NBitsEmbedding(nbits.from_base(base)), f"GatherBlockQuantized int{base.qspec.bits}"
    return ExportEmbedding(linear.to_dense()), "Gather over a float32 copy"


def _stacked_base(bases: list, densify_sparse: bool) -> nn.Module | None:
    """One operator over the members' rows stacked, when their bases share a
    form that stacks exactly (dense, or MatMulNBits of one grid); else None."""
    if all(isinstance(b, DenseBase) for b in bases):
        return DenseMatMul(torch.cat([b.weight.float() for b in bases]))
    if not _one_nbits_grid(bases):
        return None
    weights = [nbits.from_base(b) for b in bases]
    return nbits.NBitsMatMul(nbits.stacked(weights))


def _one_nbits_grid(bases: list) -> bool:
    """Quantized bases of one grid that one MatMulNBits runs (int4; symmetric
    int8 runs as two int4 halves, asymmetric int8 densely: neither stacks)."""
    if not all(isinstance(b, QuantizedBase) and b.qspec == bases[0].qspec for b in bases):
        return False
    spec = bases[0].qspec
    return nbits.supported(spec) and not (spec.bits == 8 and spec.symmetric)


def stacked_plain(model, arch, plain: dict[str, CompressedLinear]) -> list[tuple[str, ...]]:
    """Input groups (q/k/v, gate/up) whose members are all plain (no low-rank
    term) int4 bases of one grid: each is exported as one MatMulNBits over the
    rows stacked, exactly the members' products side by side. At batch 1 a
    decode step pays per node, so 3 or 2 nodes become one, as the model
    builder's packed q/k/v and gate/up."""
    return [group for group in input_groups(model, arch)
            if len(group) > 1 and _one_nbits_grid([plain[name].base if name in plain else None for name in group])]


class ExportGroup(nn.Module):
    """Linears that share V (and so read one input) computed as one:
    `base_stacked(x) + (x V^T) [U_1^T | U_2^T ...] + bias`, split per member;
    or plain int4 linears of one input group, `base_stacked(x) + bias`.

    Bases that do not stack (mixed kinds) stay per member and are added to
    their slice of the low-rank term. The result is remembered for the last
    input tensor, so the members' calls on that tensor trace one product."""

    def __init__(self, linears: list[CompressedLinear], densify_sparse: bool) -> None:
        super().__init__()
        self.sizes = [linear.out_features for linear in linears]
        low_rank = linears[0].U is not None  # else: plain bases that stack (`stacked_plain`)
        self.register_buffer("v_t", linears[0].V.V.float().T.contiguous() if low_rank else None)
        self.register_buffer("u_t", torch.cat([linear.U.float() for linear in linears]).T.contiguous() if low_rank else None)
        bases = [linear.base for linear in linears]
        self.base = None
        self.member_bases = nn.ModuleList()
        if all(b is not None for b in bases):
            self.base = _stacked_base(bases, densify_sparse)
        if self.base is None and any(b is not None for b in bases):
            self.member_bases = nn.ModuleList(nn.Identity() if b is None else base_module(b, densify_sparse) for b in bases)
        biased = any(linear.bias is not None for linear in linears)
        self.register_buffer("bias", torch.cat([
            torch.zeros(linear.out_features) if linear.bias is None else linear.bias.detach().float() for linear in linears
        ]) if biased else None)
        self.has_member_base = [b is not None for b in bases]
        self._last: tuple[weakref.ref, tuple[torch.Tensor, ...]] | None = None

    def _compute(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = None if self.v_t is None else ((x.float() @ self.v_t) @ self.u_t).to(x.dtype)
        if self.base is not None:
            y = self.base(x) if y is None else self.base(x) + y
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        parts = torch.split(y, self.sizes, dim=-1)
        if len(self.member_bases):
            parts = tuple(base(x) + part if has else part
                          for base, part, has in zip(self.member_bases, parts, self.has_member_base))
        return parts

    def forward(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self._last is None or self._last[0]() is not x:
            self._last = (weakref.ref(x), self._compute(x))
        return self._last[1][index]


class GroupMember(nn.Module):
    """One member's slice of an `ExportGroup` (a submodule shared by all the
    members: its weights are traced once, by whichever member runs first)."""

    def __init__(self, group: ExportGroup, index: int, linear: CompressedLinear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.group = group
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group(x, self.index)


def export_modules(model, densify_sparse: bool) -> tuple[dict[str, nn.Module], dict]:
    """The replacement module for every compressed linear (and a tied embedding)."""
    arch = arch_for(model.config)
    groups: dict[int, list[tuple[str, CompressedLinear]]] = {}
    replacements: dict[str, nn.Module] = {}
    plain: dict[str, CompressedLinear] = {}
    for name in linear_names(model, arch):
        module = model.get_submodule(name)
        if not isinstance(module, CompressedLinear):
            continue
        if module.U is None:
            plain[name] = module
        else:
            groups.setdefault(id(module.V), []).append((name, module))
    stacked = 0
    for members in stacked_plain(model, arch, plain):
        group = ExportGroup([plain[name] for name in members], densify_sparse)
        stacked += 1
        for index, name in enumerate(members):
            replacements[name] = GroupMember(group, index, plain.pop(name))
    for name, module in plain.items():
        replacements[name] = ExportLinear(module, None, densify_sparse)
    fused = 0
    for members in groups.values():
        if len(members) == 1:
            name, module = members[0]
            replacements[name] = ExportLinear(module, ExportProjection(module.V.V), densify_sparse)
            continue
        group = ExportGroup([module for _, module in members], densify_sparse)
        fused += 1
        for index, (name, module) in enumerate(members):
            replacements[name] = GroupMember(group, index, module)
    info = {"shared_projections": len(groups), "fused_groups": fused, "stacked_groups": stacked, "embedding": None}
    embedding = model.get_input_embeddings()
    if isinstance(embedding, TiedEmbedding):
        module, how = embedding_module(embedding._linear)
        replacements[arch.embed] = module if embedding.scale == 1.0 else ScaledRows(module, embedding.scale)
        info["embedding"] = how
    return replacements, info


@contextmanager
def swapped(model, replacements: dict[str, nn.Module]):
    """Install `replacements` in `model` for the duration of the block.

    Names may nest (a layer's attention, then replaced itself after its
    projections): they are installed in order and restored in reverse."""
    originals = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            model.set_submodule(name, module)
        yield model
    finally:
        for name, module in reversed(originals.items()):
            model.set_submodule(name, module)
