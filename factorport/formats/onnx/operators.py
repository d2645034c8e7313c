"""Torch modules that trace to the ONNX form of each compressed operator.

Before export, every `CompressedLinear` of the model is swapped for an
`ExportLinear` (and a tied embedding for an `ExportEmbedding`); Optimum's
exporter then traces the decoder as usual and each slot comes out as what it
is:

    dense base          -> MatMul over the (in, out) weight
    quantized base      -> com.microsoft.MatMulNBits over factorport's codes
    block-sparse base   -> see `sparse` (column tiles / gathered blocks / densified)
    low-rank term       -> MatMul(V) then MatMul(U), float32, added to the base
    shared V            -> one MatMul per group: the ExportProjection of a group
                           remembers its last input, so the members that read
                           the same tensor reuse one traced product

Swapping is undone afterwards (`swapped` is a context manager), so the model
handed to the exporter is left as it was.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch import nn

from ...architectures import arch_for, linear_names
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


def export_modules(model, densify_sparse: bool) -> tuple[dict[str, nn.Module], dict]:
    """The replacement module for every compressed linear (and a tied embedding)."""
    arch = arch_for(model.config)
    projections: dict[int, ExportProjection] = {}
    replacements: dict[str, nn.Module] = {}
    for name in linear_names(model, arch):
        module = model.get_submodule(name)
        if not isinstance(module, CompressedLinear):
            continue
        projection = None
        if module.U is not None:
            key = id(module.V)
            if key not in projections:
                projections[key] = ExportProjection(module.V.V)
            projection = projections[key]
        replacements[name] = ExportLinear(module, projection, densify_sparse)
    info = {"shared_projections": sum(1 for p in projections.values()), "embedding": None}
    embedding = model.get_input_embeddings()
    if isinstance(embedding, TiedEmbedding):
        module, how = embedding_module(embedding._linear)
        replacements[arch.embed] = module
        info["embedding"] = how
    return replacements, info


@contextmanager
def swapped(model, replacements: dict[str, nn.Module]):
    """Install `replacements` in `model` for the duration of the block."""
    originals = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            model.set_submodule(name, module)
        yield model
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)
