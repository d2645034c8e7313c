"""The tensors of `model.gguf` (what stock llama.cpp runs) and of
`adapter.gguf` (the low-rank terms as a LoRA adapter), planned from a
compressed model.

Per linear `y = base(x) + U·(V·x)`:
* the base goes into model.gguf: losslessly where its grid is a ggml type,
  else re-quantized to `gguf_type` (and the error growth is recorded);
* with a base, U·V goes into the adapter (lora_a = V, lora_b = U); a V shared
  by several linears is written once per member (llama.cpp has no
  shared-input LoRA);
* without a base (pure factorization), U·V is multiplied out and quantized
  like a dense weight; so is a low-rank term on the output projection /
  token embedding, which llama.cpp's LoRA does not cover.
q/k rows (weights, lora_b, biases) are put in llama.cpp's rotary order.

A planned tensor is its name, type and shape plus how to make its data:
the writer makes each one as it writes it, so an export holds the
compressed model and one tensor, never the file's whole contents. Only
llama.cpp's K / IQ mixes need every tensor at once (llama.cpp picks types
over the whole model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ...architectures import linear_names
from ...llamacpp.hparams import hparams, rope_freqs
from ...llamacpp.names import OUTPUT, ROPE_FREQS, TOKEN_EMBEDDING, gguf_arch, linear_tensor, norm_weights, row_order
from ...llamacpp.quantize import quantize_model
from ...ops import CompressedLinear, TiedEmbedding
from . import codecs


def is_tied(model) -> bool:
    """One table serves lookup and logits (llama.cpp then uses token_embd for both)."""
    embed = model.get_input_embeddings()
    head = model.get_submodule(gguf_arch(model.config).lm_head)
    return isinstance(embed, TiedEmbedding) or getattr(head, "weight", None) is embed.weight


@dataclass
class Tensor:
    name: str
    type_name: str  # ggml type
    shape: tuple[int, ...]  # of the data: float arrays, or raw blocks (rows, row_bytes)
    dtype: np.dtype  # float32 / float16, or uint8 for raw blocks
    make: Callable[[], np.ndarray]  # the data, made when written

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _stored_shape(shape: tuple[int, ...], type_name: str) -> tuple[tuple[int, ...], np.dtype]:
    """The (shape, dtype) a weight of `shape` has once encoded as `type_name`."""
    if type_name == "F32":
        return tuple(shape), np.dtype(np.float32)
    if type_name == "F16":
        return tuple(shape), np.dtype(np.float16)
    import gguf

    from ...ops.ggml import ggml_type

    return tuple(gguf.quant_shape_to_byte_shape(shape, ggml_type(type_name))), np.dtype(np.uint8)


@dataclass
class Plan:
    tensors: list[Tensor] = field(default_factory=list)
    lora: list[Tensor] = field(default_factory=list)
    requantized: list[dict] = field(default_factory=list)
    multiplied_out: list[str] = field(default_factory=list)
    duplicated_v: dict[str, list[str]] = field(default_factory=dict)  # shared group -> adapter tensors


@dataclass
class _Pending:
    """A dense weight waiting to be quantized to the user's type."""

    name: str
    weight: Callable[[], np.ndarray]  # float32, rows already in GGUF order
    source: str  # what it was (for the report)


def _rows(a: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    return a if order is None else np.ascontiguousarray(a[order])


def _float32(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().contiguous().numpy()


def _lora_tensor(name: str, t: torch.Tensor, order) -> Tensor:
    type_name = "F16" if t.dtype == torch.float16 else "F32"
    array = (lambda: t.detach().contiguous().numpy()) if type_name == "F16" else (lambda: _float32(t))
    return Tensor(name, type_name, *_stored_shape(tuple(t.shape), type_name), lambda: _rows(array(), order))


def _base_source(module) -> str:
    if isinstance(module, nn.Linear):
        return "dense"
    base = module.base
    if base is None:
        return "low-rank only (multiplied out)"
    spec = base.spec()
    if spec["kind"] == "quantized":
        return f"int{spec['bits']} {'sym' if spec['symmetric'] else 'asym'} g{spec['group_size']}"
    return spec["kind"]


class Planner:
    def __init__(self, model, gguf_type: str) -> None:
        self.model = model
        self.config = model.config
        self.arch = gguf_arch(model.config)
        self.gguf_type = gguf_type
        self.plan = Plan()
        self.pending: list[_Pending] = []
        # every tensor in float32, for llama.cpp's per-tensor type choice; only
        # its K / IQ mixes read it (an 8B model's is 32 GB)
        self.needs_all = gguf_type not in codecs.NUMPY_TYPES
        self.all_dense: dict[str, np.ndarray] = {}

    def run(self) -> Plan:
        embed = self.model.get_input_embeddings()
        head = self.model.get_submodule(self.arch.lm_head)
        tied = is_tied(self.model)
        self._weight(TOKEN_EMBEDDING, head if isinstance(embed, TiedEmbedding) else embed, None, allow_lora=False)
        for name, weight in norm_weights(self.model).items():
            self._float(name, weight)
        factors = rope_freqs(self.model)
        if factors is not None:
            self._float(ROPE_FREQS, factors)
        for name in linear_names(self.model, self.arch, include_lm_head=False):
            module = self.model.get_submodule(name)
            stem = linear_tensor(name, self.arch)
            order = row_order(name, module.out_features, self.config)
            self._weight(f"{stem}.weight", module, order, allow_lora=True)
            if module.bias is not None:
                self._float(f"{stem}.bias", module.bias, order)
        if not tied:
            self._weight(OUTPUT, head, None, allow_lora=False)
        self._quantize_pending()
        self.plan.tensors.sort(key=_tensor_key)
        return self.plan

    def _float(self, name: str, t: torch.Tensor, order=None) -> None:
        make = lambda: _rows(_float32(t), order)  # noqa: E731
        self.plan.tensors.append(Tensor(name, "F32", *_stored_shape(tuple(t.shape), "F32"), make))
        self._remember(name, make)

    def _remember(self, name: str, dense: Callable[[], np.ndarray]) -> None:
        if self.needs_all:
            self.all_dense[name] = dense()

    def _weight(self, name: str, module, order, allow_lora: bool) -> None:
        """The weight slot of one linear (or the embedding table)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            self._dense(name, lambda: _float32(module.weight), order, "dense")
            return
        base, has_lowrank = module.base, module.U is not None
        if base is not None and (allow_lora or not has_lowrank) and codecs.lossless_type(base):
            type_name = codecs.lossless_type(base)
            stored, dtype = _stored_shape((module.out_features, module.in_features), type_name)
            self.plan.tensors.append(Tensor(name, type_name, stored, dtype, lambda: _rows(codecs.lossless_blocks(base)[1], order)))
            self._remember(name, lambda: _rows(_float32(base.to_dense()), order))
        elif base is not None and (allow_lora or not has_lowrank):
            self._dense(name, lambda: _float32(base.to_dense()), order, _base_source(module))
        else:  # no base, or a low-rank term llama.cpp cannot apply here: multiply out
            self._dense(name, lambda: _float32(module.to_dense()), order, _base_source(module) if base is None else "base + low-rank (multiplied out)")
            self.plan.multiplied_out.append(name)
            return
        if has_lowrank:
            self._lora(name, module, order)

    def _dense(self, name: str, weight: Callable[[], np.ndarray], order, source: str) -> None:
        make = lambda: _rows(weight(), order)  # noqa: E731
        self._remember(name, make)
        self.pending.append(_Pending(name, make, source))

    def _lora(self, name: str, module: CompressedLinear, order) -> None:
        self.plan.lora.append(_lora_tensor(f"{name}.lora_a", module.V.V, None))
        self.plan.lora.append(_lora_tensor(f"{name}.lora_b", module.U, order))
        if module.shared_name is not None:
            self.plan.duplicated_v.setdefault(module.shared_name, []).append(f"{name}.lora_a")

    def _quantize_pending(self) -> None:
        """Dense weights -> the user's type: numpy codecs (made again when
        written; here only to measure the error), or llama.cpp's quantizer
        for its K / IQ mixes (which pick per-tensor types)."""
        if not self.pending:
            return
        encoded = quantize_model(self.all_dense, hparams(self.config), self.gguf_type) if self.needs_all else None
        for p in self.pending:
            weight = p.weight()
            if encoded is None:
                type_name, data = self.gguf_type, codecs.encode(weight, self.gguf_type)
                make = lambda p=p: codecs.encode(p.weight(), self.gguf_type)  # noqa: E731
            else:
                type_name, data = encoded[p.name]
                make = lambda data=data: data  # noqa: E731
            error = _relative_error(codecs.decode(data, type_name), weight)
            self.plan.tensors.append(Tensor(p.name, type_name, tuple(data.shape), data.dtype, make))
            self.plan.requantized.append({"tensor": p.name, "from": p.source, "to": type_name, "relative_error": error})
            del data, weight


def _relative_error(new: np.ndarray, reference: np.ndarray) -> float:
    """‖new − reference‖² / ‖reference‖²: the error the re-quantization adds
    to the weight the compressed torch model computes with."""
    ref = reference.astype(np.float64)
    return float(((new.astype(np.float64) - ref) ** 2).sum() / max((ref**2).sum(), 1e-30))


def _tensor_key(t: Tensor):
    """llama.cpp's usual order: embeddings, blocks by index, output."""
    if t.name.startswith("blk."):
        return (1, int(t.name.split(".")[1]), t.name)
    return (0 if t.name == TOKEN_EMBEDDING else 2, 0, t.name)


def plan_model(model, gguf_type: str) -> Plan:
    return Planner(model, gguf_type).run()
