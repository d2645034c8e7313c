"""What a recipe step did to each layer, for `report/convert.json`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..ops.quant import row_chunks


def module_bytes(module: nn.Module) -> int:
    """Bytes of the tensors a module stores (a shared projection is counted
    where it is registered, so once)."""
    tensors = list(module.parameters()) + [b for b in module.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def module_params(module: nn.Module) -> int:
    """Weights a module represents (a quantized weight counts as its elements)."""
    if hasattr(module, "num_params"):
        return module.num_params()
    return sum(p.numel() for p in module.parameters())


def model_params(model: nn.Module) -> int:
    """Weights of the whole model, compressed linears counted by what they represent
    and a tied table once."""
    from ..ops import CompressedLinear, Projection

    count, seen = 0, set()
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            count += module.num_params()  # includes a private V
            if module.shared_name is None and module.V is not None:
                seen.add(id(module.V))
        elif isinstance(module, Projection) and id(module) not in seen:
            seen.add(id(module))
            count += module.V.numel()
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                count += p.numel()
    return count


@torch.no_grad()
def output_error(reference: torch.Tensor, approx: torch.Tensor, xtx: torch.Tensor | None) -> float | None:
    """Relative calibration output error ||(W - W')Xᵀ||² / ||W Xᵀ||² (None without statistics)."""
    if xtx is None:
        return None
    # float32 products summed in float64 (float64 products cost a 14336-wide
    # layer ~2x the time for digits a report does not show), in row chunks (a
    # 150k-row output projection's products would be two more copies of it)
    h = xtx.float()
    num = den = torch.zeros((), dtype=torch.float64, device=h.device)
    for rows in row_chunks(*reference.shape):
        w = reference[rows].float()
        delta = w - approx[rows].float()
        num = num + (delta @ h).mul_(delta).sum(dtype=torch.float64)
        den = den + (w @ h).mul_(w).sum(dtype=torch.float64)
    return float(num / den.clamp_min(1e-30))


@dataclass
class LayerReport:
    name: str
    step: str
    operator: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    calib_error: float | None
    seconds: float

    @classmethod
    def compare(cls, name, before: nn.Module, after: nn.Module, error, seconds, step) -> "LayerReport":
        return cls(
            name=name,
            step=step,
            operator=after.extra_repr() if hasattr(after, "extra_repr") else type(after).__name__,
            params_before=module_params(before),
            params_after=module_params(after),
            bytes_before=module_bytes(before),
            bytes_after=module_bytes(after),
            calib_error=error,
            seconds=round(seconds, 4),
        )

    def to_dict(self) -> dict:
        return asdict(self)
