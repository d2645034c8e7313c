"""`budget`: one byte budget spread over bit widths and correction ranks
(LQ-LoRA-style mixed allocation).

For every unit (an input group when corrections are shared, else one linear)
and every bit width in `bits`, the step quantizes the unit (GPTQ or RTN) and
takes the whitened SVD of its error, which gives the calibration output error
left after a correction of any rank. Each unit then has a menu of
(bytes, error) options — bit width x correction rank. The solver keeps each
unit's lower convex hull and, starting from the cheapest option everywhere,
repeatedly buys the upgrade with the largest error reduction per byte that
still fits (greedy on convex hulls: optimal for the relaxed problem).
Errors are relative to each unit's output energy ‖W·Xᵀ‖².

The budget is `bytes` for the whole model's tensors or `bits_per_weight`
over the targeted weights (int4 g64 with float16 scales is 4.25).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..ops import CompressedLinear, QuantizedBase, QuantSpec
from .calibration import CalibrationStats
from .lowrank import Allocation, attach_projection, input_transform, member_rows, stacked_error_svd, truncate, unit_name, units_of
from .quantize import InverseHessian, QuantizeConfig, gptq
from .report import LayerReport, module_bytes, output_error
from .targets import compressible_linears, replace_linear

METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class BudgetConfig:
    targets: tuple[str, ...] = ("linears", "lm_head")
    bytes: float | None = None  # whole-model tensor bytes
    bits_per_weight: float | None = None  # over the targeted weights
    bits: tuple[int, ...] = (4, 8)
    group_size: int = 64
    symmetric: bool = True
    method: str = "gptq"
    sink_weight: float = 32.0  # for GPTQ (see QuantizeConfig)
    clip_search: bool = False  # for GPTQ (see QuantizeConfig)
    correction_ranks: tuple[int, ...] = (0, 16, 32, 64)
    shared: bool = True  # corrections: one V per input group (GlowQ)
    balance_members: bool = False  # see CorrectConfig.balance_members
    factor_dtype: str = "float16"


@dataclass
class Option:
    base: int | str  # the base's bit width (budget) or llama.cpp type (llamacpp)
    rank: int
    bytes: float
    error: float


def check_budget(model, config: BudgetConfig) -> None:
    if (config.bytes is None) == (config.bits_per_weight is None):
        raise ValueError("give exactly one of bytes, bits_per_weight")
    for bits in config.bits:
        spec = QuantSpec(bits, config.group_size, config.symmetric)
        for name in compressible_linears(model, config.targets):
            module = model.get_submodule(name)
            if not isinstance(module, torch.nn.Linear):
                raise ValueError(f"{name} is already compressed; budget starts from dense linears")
            spec.check_fits(module.in_features, name)


def _quantize(weight, spec: QuantSpec, config: BudgetConfig, hinv: InverseHessian | None) -> QuantizedBase:
    if config.method == "gptq":  # with the quantize step's GPTQ defaults
        return gptq(weight, hinv, spec, QuantizeConfig.block_size, config.clip_search)
    return QuantizedBase.from_weight(weight, spec)


def lower_hull(options: list[Option]) -> list[Option]:
    """Lower convex hull of (bytes, error), cheapest first."""
    hull: list[Option] = []
    for opt in sorted(options, key=lambda o: (o.bytes, o.error)):
        if hull and opt.error >= hull[-1].error:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> opt
            if (b.error - a.error) * (opt.bytes - a.bytes) >= (opt.error - a.error) * (b.bytes - a.bytes):
                hull.pop()
            else:
                break
        hull.append(opt)
    return hull


def choose_options(hulls: dict, total: float) -> dict:
    """One option per unit from each unit's lower hull, within `total` bytes."""
    choice = {unit: 0 for unit in hulls}
    spent = sum(h[0].bytes for h in hulls.values())
    if spent > total:
        raise ValueError(f"the budget ({total:,.0f} bytes for the targets) is below the cheapest option ({spent:,.0f}); raise it")
    heap = []
    position = {unit: i for i, unit in enumerate(hulls)}  # ties go to the earlier unit, run after run

    def push(unit):
        h, i = hulls[unit], choice[unit]
        if i + 1 < len(h):
            cost = h[i + 1].bytes - h[i].bytes
            gain = h[i].error - h[i + 1].error
            heapq.heappush(heap, (-gain / max(cost, 1e-9), position[unit], unit, cost))

    for unit in hulls:
        push(unit)
    while heap:
        _, _, unit, cost = heapq.heappop(heap)
        if spent + cost > total:
            continue
        spent += cost
        choice[unit] += 1
        push(unit)
    return {unit: hulls[unit][i] for unit, i in choice.items()}


def _total(model, config: BudgetConfig) -> float:
    """The bytes the targeted linears may take (whole model: the rest is fixed)."""
    names = [n for unit in units_of(model, config.targets, config.shared) for n in unit]
    if config.bytes is not None:
        return config.bytes - (module_bytes(model) - sum(module_bytes(model.get_submodule(n)) for n in names))
    return config.bits_per_weight / 8 * sum(model.get_submodule(n).weight.numel() for n in names)


def _menu(model, unit: tuple[str, ...], config: BudgetConfig, stats: CalibrationStats, bit_widths) -> tuple[dict, list[Option]]:
    """A unit quantized at every bit width with the SVD of its error: {bits: (bases, P, σ, right)} and its options."""
    factor_bytes = torch.empty(0, dtype=getattr(torch, config.factor_dtype)).element_size()
    weights = [model.get_submodule(n).weight.detach() for n in unit]
    whitening = input_transform("whitened", stats.xtx(unit[0]), 0.0, 1e-6)
    outs = sum(w.shape[0] for w in weights)
    options, menu = [], {}
    # one for the unit and every bit width: a unit's members share their input
    hinv = InverseHessian.of(stats.hessian(unit[0], config.sink_weight), QuantizeConfig.damping) if config.method == "gptq" else None
    for bits in bit_widths:
        spec = QuantSpec(bits, config.group_size, config.symmetric)
        bases = [_quantize(w, spec, config, hinv) for w in weights]
        p, s, right, reference = stacked_error_svd(weights, [b.to_dense() for b in bases], whitening, config.balance_members)
        menu[bits] = (bases, p, s, right)
        base_bytes = sum(module_bytes(b) for b in bases)
        energy = (s**2).double()
        for rank in config.correction_ranks:
            if rank > min(outs, weights[0].shape[1]):
                continue
            cost = base_bytes + rank * (outs + weights[0].shape[1]) * factor_bytes
            options.append(Option(bits, rank, cost, float(energy[rank:].sum()) / max(reference, 1e-30)))
    return menu, options


def solve_budget(model, config: BudgetConfig, hulls: list[tuple[str, list[Option]]]) -> dict[str, dict]:
    """Each unit's (bits, rank) under the budget, from every unit's hull (the whole model's)."""
    chosen = choose_options(dict(hulls), _total(model, config))
    return {name: {"bits": opt.base, "rank": opt.rank} for name, opt in chosen.items()}


def budget_(
    model, config: BudgetConfig, stats: CalibrationStats | None, progress: bool = True, allocation: Allocation | None = None
) -> list[LayerReport]:
    """With a scoring `allocation`, only collect each unit's hull; with a
    solved one, quantize each unit at its chosen bit width alone."""
    check_budget(model, config)
    if stats is None:
        raise ValueError("budget needs calibration statistics")
    units = units_of(model, config.targets, config.shared)
    menus = {}
    if allocation is None or allocation.scoring:
        hulls = []
        for unit in tqdm(units, desc=f"budget (int{'/'.join(map(str, config.bits))} x ranks)", unit="unit", disable=not progress):
            menus[unit], options = _menu(model, unit, config, stats, config.bits)
            hulls.append((unit_name(unit), lower_hull(options)))
        if allocation is not None:
            allocation.options += hulls
            return []
        chosen = solve_budget(model, config, hulls)
    else:
        chosen = allocation.chosen

    reports = []
    for unit in tqdm(units, desc="budget (allocated)", unit="unit", disable=not progress or allocation is None):
        started = time.perf_counter()
        pick = chosen[unit_name(unit)]
        bits, rank = pick["bits"], pick["rank"]
        menu = menus.pop(unit) if unit in menus else _menu(model, unit, config, stats, (bits,))[0]
        bases, p, s, right = menu[bits]
        projection = name_of_v = None
        members = [(name, model.get_submodule(name), None) for name in unit]
        if rank:
            u, v = truncate(p, s, right, rank, getattr(torch, config.factor_dtype))
            projection, name_of_v, rows = attach_projection(model, unit, v, "budget")
            reports += rows
            members = list(member_rows(model, unit, u))
        for (name, linear, member_u), base in zip(members, bases):
            new = CompressedLinear(linear.in_features, linear.out_features, base, member_u, projection, name_of_v, linear.bias)
            err = output_error(linear.weight, new.to_dense(), stats.xtx(name))
            replace_linear(model, name, new)
            report = LayerReport.compare(name, linear, new, err, time.perf_counter() - started, step="budget")
            report.operator += f" (int{bits}, correction rank {rank})"
            reports.append(report)
    return reports
