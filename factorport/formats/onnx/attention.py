"""Each layer's attention as three onnxruntime nodes: RotaryEmbedding (q, k) + GroupQueryAttention.

Optimum's trace writes attention as ~60 small nodes per layer (reshapes whose
shapes are computed from `Shape`, rotary halves, repeat_kv, the mask, the
KV concatenation). Decoding one token at batch 1 pays for every node: on
SmolLM2-135M those shape computations cost more than the quantized matmuls.
Here attention is three nodes: `RotaryEmbedding` for q and for k (from
`position_ids` and the model's cos/sin table), then GroupQueryAttention:
the KV-cache concatenation, grouped heads and causal softmax in one kernel,
reading the cache in Optimum's layout (batch, kv heads, length, head dim),
so the graph keeps Optimum's inputs and outputs.

What the node needs besides q, k, v and the layer's past is computed once
per forward from the 2-D attention mask by a hook on the decoder
(`DecoderInputs`): `total_sequence_length` (int32 scalar), `seqlens_k =
total - 1` for every sequence, and an additive `attention_bias` that hides
padding. GroupQueryAttention's own `seqlens_k` masking assumes right padding;
with the bias, Optimum's left-padded batches are exact too (tested).

Limits: sliding-window models are exported with the traced attention
(`attention="traced"`, also selectable); positions beyond
`max_position_embeddings` are outside the cos/sin table.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .nbits import MS_DOMAIN

ATTENTION_FORMS = ("fused", "traced")


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    kv_heads: int
    head_dim: int
    scale: float


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, halves layout (HF's rotate_half); x (B, S, heads, D), cos (B, S, D/2)."""
    cos = torch.cat([cos, cos], -1)[:, :, None]
    sin = torch.cat([sin, sin], -1)[:, :, None]
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class RotaryEmbeddingFunction(torch.autograd.Function):
    """Traces to one com.microsoft.RotaryEmbedding node over (B, S, heads*D).

    Rotary is its own node rather than GroupQueryAttention's `do_rotary`:
    onnxruntime 1.32's CPU GroupQueryAttention rotates every sequence of a
    batch with the first sequence's position_ids (wrong for left padding)."""

    @staticmethod
    def forward(ctx, x, position_ids, cos_cache, sin_cache, heads: int):
        batch, length, width = x.shape
        rotated = _rotate(x.reshape(batch, length, heads, -1), cos_cache[position_ids], sin_cache[position_ids])
        return rotated.reshape(batch, length, width)

    @staticmethod
    def symbolic(g, x, position_ids, cos_cache, sin_cache, heads: int):
        out = g.op(f"{MS_DOMAIN}::RotaryEmbedding", x, position_ids, cos_cache, sin_cache, num_heads_i=heads, interleaved_i=0)
        out.setType(x.type())
        return out


def reference_attention(q, k, v, past_k, past_v, bias, shape: AttentionShape):
    """What GroupQueryAttention computes (q, k rotated already), in torch:
    (output (B, S, H*D), present_k, present_v)."""
    batch, length, _ = q.shape
    heads = lambda x, n: x.reshape(batch, length, n, shape.head_dim).transpose(1, 2)  # noqa: E731
    present_k = torch.cat([past_k, heads(k, shape.kv_heads)], 2)
    present_v = torch.cat([past_v, heads(v, shape.kv_heads)], 2)
    repeat = shape.num_heads // shape.kv_heads
    past = past_k.shape[2]
    causal = torch.ones(length, past + length, dtype=torch.bool, device=q.device).tril(past)
    mask = bias.masked_fill(~causal, torch.finfo(bias.dtype).min)
    out = torch.nn.functional.scaled_dot_product_attention(
        heads(q, shape.num_heads), present_k.repeat_interleave(repeat, 1), present_v.repeat_interleave(repeat, 1),
        attn_mask=mask, scale=shape.scale,
    )
    return out.transpose(1, 2).reshape(batch, length, -1), present_k, present_v


def _absent(g):
    """An omitted optional input of a contrib op."""
    node = g.op("prim::Constant")
    node.setType(torch._C.OptionalType.ofTensor())
    return node


class GroupQueryAttentionFunction(torch.autograd.Function):
    """Traces to one GroupQueryAttention node; in torch computes the same."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, seqlens_k, total, bias, shape: AttentionShape):
        return reference_attention(q, k, v, past_k, past_v, bias, shape)

    @staticmethod
    def symbolic(g, q, k, v, past_k, past_v, seqlens_k, total, bias, shape: AttentionShape):
        absent = _absent(g)
        out, present_k, present_v = g.op(
            f"{MS_DOMAIN}::GroupQueryAttention",
            q, k, v, past_k, past_v, seqlens_k, total, absent, absent, absent, bias,  # no cos/sin/positions: see RotaryEmbeddingFunction
            num_heads_i=shape.num_heads,
            kv_num_heads_i=shape.kv_heads,
            scale_f=shape.scale,
            outputs=3,
        )
        out.setType(q.type())
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        return out, present_k, present_v


class DecoderInputs(nn.Module):
    """Per-forward inputs every fused attention reads, computed once by a
    forward pre-hook on the decoder from its `attention_mask` and
    `position_ids`; also holds the model's cos/sin table (one copy in the
    file, however many layers read it)."""

    def __init__(self, rotary: nn.Module, max_positions: int) -> None:
        super().__init__()
        positions = torch.arange(max_positions).reshape(1, -1)
        probe = torch.zeros(1, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = rotary(probe, positions)  # (1, positions, head_dim), attention scaling included
        half = cos.shape[-1] // 2
        self.register_buffer("cos_cache", cos[0, :, :half].float().contiguous())
        self.register_buffer("sin_cache", sin[0, :, :half].float().contiguous())
        self.seqlens_k = self.total = self.position_ids = self.bias = None

    def capture(self, module, args, kwargs) -> None:
        mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is None or mask.dim() != 2 or position_ids is None:
            raise ValueError("fused attention needs the 2-D attention_mask and position_ids (Optimum's decoder inputs)")
        self.total = torch._shape_as_tensor(mask)[1].to(torch.int32)  # traced as Shape, not a constant
        # every sequence spans the whole mask; padding is hidden by the bias
        self.seqlens_k = (torch.ones_like(mask).sum(-1) - 1).to(torch.int32)
        self.position_ids = position_ids
        # (batch, 1, new tokens, total): the finite minimum keeps fully padded rows free of NaN
        padding = (1.0 - mask.float())[:, None, None, :] * torch.finfo(torch.float32).min
        self.bias = padding.expand(-1, -1, position_ids.shape[-1], -1)


class FusedAttention(nn.Module):
    """Replaces a decoder layer's attention module for export: projections
    as installed on the original module (compressed operators included),
    then one GroupQueryAttention, then o_proj. The layer's cache entry is
    replaced by the node's present key/value."""

    def __init__(self, attention: nn.Module, inputs: DecoderInputs, shape: AttentionShape, arch) -> None:
        super().__init__()
        self.attention = attention
        self.inputs = inputs
        self.shape = shape
        self.qk_norms = arch.qk_norms
        self.qkv = arch.qkv

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k and v: three linears, or the row blocks of one fused linear."""
        linears = [self.attention.get_submodule(name) for name in self.qkv]
        if len(linears) == 3:
            return tuple(linear(x) for linear in linears)
        q_width, kv_width = self.shape.num_heads * self.shape.head_dim, self.shape.kv_heads * self.shape.head_dim
        return linears[0](x).split([q_width, kv_width, kv_width], dim=-1)

    def _head_norm(self, x: torch.Tensor, which: int, heads: int) -> torch.Tensor:
        """The family's RMS norm over each head of q or k (before rotary), if it has one."""
        if self.qk_norms is None:
            return x
        batch, length, _ = x.shape
        norm = self.attention.get_submodule(self.qk_norms[which])
        # the width a Python int: the graph then states it (the contrib-node checks read it)
        return norm(x.reshape(batch, length, heads, self.shape.head_dim)).reshape(batch, length, heads * self.shape.head_dim)

    def forward(self, hidden_states, past_key_values=None, **kwargs):
        attn, shape = self.attention, self.shape
        q, k, v = self._projections(hidden_states)
        q, k = self._head_norm(q, 0, shape.num_heads), self._head_norm(k, 1, shape.kv_heads)
        layer = None if past_key_values is None else past_key_values.layers[attn.layer_idx]
        if layer is not None and layer.is_initialized:
            past_k, past_v = layer.keys, layer.values
        else:
            past_k = past_v = q.new_zeros(q.shape[0], shape.kv_heads, 0, shape.head_dim)
        inputs = self.inputs
        tables = (inputs.position_ids, inputs.cos_cache, inputs.sin_cache)
        q = RotaryEmbeddingFunction.apply(q, *tables, shape.num_heads)
        k = RotaryEmbeddingFunction.apply(k, *tables, shape.kv_heads)
        out, present_k, present_v = GroupQueryAttentionFunction.apply(
            q, k, v, past_k, past_v, inputs.seqlens_k, inputs.total, inputs.bias, shape
        )
        if layer is not None:
            if not layer.is_initialized:
                layer.lazy_initialization(present_k)
            layer.keys, layer.values = present_k, present_v
        return attn.o_proj(out), None


def replacements(model, arch) -> tuple[dict[str, nn.Module], DecoderInputs | None]:
    """A `FusedAttention` for every layer's attention module (empty when the
    model's attention is not one GroupQueryAttention computes)."""
    config = model.config
    if not fusable(config):
        return {}, None
    decoder = model.get_submodule(arch.decoder)
    inputs = DecoderInputs(decoder.get_submodule(arch.rotary), config.max_position_embeddings)
    shape = attention_shape(config)
    modules = {}
    for index in range(len(model.get_submodule(arch.layers))):
        name = f"{arch.layers}.{index}.{arch.attention}"
        modules[name] = FusedAttention(model.get_submodule(name), inputs, shape, arch)
    return modules, inputs


@contextmanager
def capturing(model, arch, inputs: DecoderInputs | None):
    """Run `inputs.capture` before every forward of the decoder, for the block."""
    if inputs is None:
        yield
        return
    handle = model.get_submodule(arch.decoder).register_forward_pre_hook(inputs.capture, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def attention_shape(config) -> AttentionShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return AttentionShape(config.num_attention_heads, config.num_key_value_heads, head_dim, head_dim**-0.5)


def fusable(config) -> bool:
    """GroupQueryAttention as used here: full causal attention, rotary in halves."""
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return not sliding and getattr(config, "partial_rotary_factor", 1.0) == 1.0
