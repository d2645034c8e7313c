"""The compressed linear: `y = base(x) + U · (V · x) + bias`.

`base` is None, dense, quantized or block-sparse (see `bases`). The low-rank
term's V is a `Projection`; several linears that read the same input may hold
the same Projection, which then computes `V · x` once per input tensor.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .bases import Base


def _version(x: torch.Tensor) -> int:
    """In-place change counter (inference tensors have none; they are not
    modified between the members' calls of one forward)."""
    return -1 if x.is_inference() else x._version


class Projection(nn.Module):
    """V (rank, in_features) of a low-rank term, private or shared by a group.

    A shared projection is registered once in the model (at `name`); members
    only hold a reference. `forward` remembers (weakly) its last input and its
    output, so the members of a group that are all called on the same tensor
    cost one matmul; `calls` counts the matmuls actually done.
    """

    def __init__(self, v: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("V", v)
        self.calls = 0
        self._last: tuple[weakref.ref, int, torch.Tensor] | None = None

    @property
    def rank(self) -> int:
        return self.V.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = self._last
        version = _version(x)
        if last is not None and last[0]() is x and last[1] == version:
            return last[2]
        z = x.float() @ self.V.float().T
        self.calls += 1
        # A weak reference: the input is not kept alive, only the (small) result.
        self._last = (weakref.ref(x), version, z)
        return z


class CompressedLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        base: Base | None,
        u: torch.Tensor | None = None,
        projection: Projection | None = None,
        shared_name: str | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if (u is None) != (projection is None):
            raise ValueError("a low-rank term needs both U and V")
        if base is None and u is None:
            raise ValueError("a compressed linear needs a base, a low-rank term, or both")
        self.in_features = in_features
        self.out_features = out_features
        self.base = base
        self.register_buffer("U", u)
        self.register_buffer("bias", None if bias is None else bias.detach())
        # A shared projection lives elsewhere in the model; keep it out of this
        # module's children so it is stored (and counted) once.
        self.shared_name = shared_name
        if shared_name is None:
            self.projection = projection
        else:
            object.__setattr__(self, "_shared_projection", projection)

    @classmethod
    def from_linear(cls, linear: nn.Linear, base: Base | None) -> "CompressedLinear":
        return cls(linear.in_features, linear.out_features, base, bias=linear.bias)

    @property
    def V(self) -> Projection | None:
        return self.projection if self.shared_name is None else self._shared_projection

    @property
    def rank(self) -> int:
        return 0 if self.U is None else self.U.shape[1]

    def set_lowrank(self, u: torch.Tensor, projection: Projection, shared_name: str | None = None) -> None:
        if "projection" in self._modules:
            del self._modules["projection"]
        self.U = u
        self.shared_name = shared_name
        if shared_name is None:
            self.projection = projection
        else:
            object.__setattr__(self, "_shared_projection", projection)

    def num_params(self) -> int:
        """Weights stored by this linear; a shared V counts where it is registered."""
        count = 0 if self.base is None else self.base.num_params()
        if self.U is not None:
            count += self.U.numel() + (self.V.V.numel() if self.shared_name is None else 0)
        return count + (0 if self.bias is None else self.bias.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None if self.base is None else self.base(x)
        if self.U is not None:
            low = (self.V(x) @ self.U.float().T).to(x.dtype)
            y = low if y is None else y + low
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def to_dense(self) -> torch.Tensor:
        """The dense float32 weight this operator computes (for export and checks)."""
        w = None if self.base is None else self.base.to_dense()
        if self.U is not None:
            low = self.U.float() @ self.V.V.float()
            w = low if w is None else w + low
        return w

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the dense weight, without building the whole matrix."""
        w = None if self.base is None else self.base.rows(ids)
        if self.U is not None:
            low = self.U[ids].float() @ self.V.V.float()
            w = low if w is None else w + low
        return w

    def extra_repr(self) -> str:
        base = "none" if self.base is None else self.base.kind
        shared = f", shared={self.shared_name}" if self.shared_name else ""
        return f"in={self.in_features}, out={self.out_features}, base={base}, rank={self.rank}{shared}"


class TiedEmbedding(nn.Module):
    """Token embedding that reads its table from a compressed output projection,
    so a tied model stores the compressed table once and uses it both ways."""

    def __init__(self, linear: CompressedLinear, padding_idx: int | None = None, scale: float = 1.0) -> None:
        super().__init__()
        object.__setattr__(self, "_linear", linear)
        self.num_embeddings = linear.out_features
        self.embedding_dim = linear.in_features
        self.padding_idx = padding_idx
        self.scale = scale  # what the rows are multiplied by (Gemma: sqrt(hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._linear.rows(ids)
        return rows if self.scale == 1.0 else rows * self.scale

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads `.weight` for dtype/device checks; this builds the table.
        return self._linear.to_dense()
