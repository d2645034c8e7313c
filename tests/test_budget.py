"""`budget`: one byte budget over bit widths and correction ranks."""

from __future__ import annotations

import pytest
import torch

from factorport.converters import BudgetConfig, apply
from factorport.converters.budget import Option, choose_options, lower_hull
from factorport.converters.report import module_bytes
from factorport.errors import FactorportError
from factorport.formats import safetensors_dir
from factorport.ops import CompressedLinear
from factorport.recipe import parse_recipe


def _bytes(model) -> int:
    return module_bytes(model)


def test_hull_drops_dominated_and_concave_points():
    points = [Option(4, 0, 10, 1.0), Option(4, 8, 12, 0.9), Option(8, 0, 20, 0.2), Option(4, 16, 14, 0.95), Option(8, 8, 30, 0.19)]
    hull = lower_hull(points)
    assert [(o.base, o.rank) for o in hull] == [(4, 0), (8, 0), (8, 8)]  # (4,8) lies above the 10->20 segment


def test_choose_buys_best_error_per_byte_within_budget():
    hulls = {
        "a": [Option(4, 0, 10, 1.0), Option(8, 0, 20, 0.1)],  # 0.09 per byte
        "b": [Option(4, 0, 10, 1.0), Option(8, 0, 20, 0.8)],  # 0.02 per byte
    }
    chosen = choose_options(hulls, total=30)
    assert chosen["a"].base == 8 and chosen["b"].base == 4
    with pytest.raises(ValueError, match="below the cheapest"):
        choose_options(hulls, total=15)


@pytest.mark.parametrize("bpw", [4.5, 6.0])
def test_bits_per_weight_budget_is_respected(llama, stats_for, bpw):
    stats = stats_for(llama)
    names = [n for n, m in llama.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    weights = sum(llama.get_submodule(n).weight.numel() for n in names)
    apply(llama, [("budget", BudgetConfig(targets=("linears",), bits_per_weight=bpw, correction_ranks=(0, 4, 8)))], stats, progress=False)
    spent = sum(module_bytes(llama.get_submodule(n)) for n in names)
    spent += sum(module_bytes(m) for n, m in llama.named_modules() if n.rpartition(".")[2].startswith("shared_"))
    assert spent <= bpw / 8 * weights
    assert spent > 0.8 * 4.25 / 8 * weights  # at least int4 everywhere


def test_more_bytes_buy_lower_error(llama, stats_for, make_model):
    stats = stats_for(llama)
    errors = []
    for bpw in (4.5, 7.0):
        model = make_model("llama")
        reports = apply(model, [("budget", BudgetConfig(targets=("linears",), bits_per_weight=bpw, method="rtn"))], stats, progress=False)
        errors.append(sum(r.calib_error for r in reports if r.calib_error is not None))
    assert errors[1] < errors[0]


def test_whole_model_bytes_budget_and_round_trip(llama, stats_for, input_ids, tmp_path):
    stats = stats_for(llama)
    budget = int(0.45 * _bytes(llama))
    apply(llama, [("budget", BudgetConfig(bytes=budget, group_size=32, correction_ranks=(0, 8)))], stats, progress=False)
    assert isinstance(llama.lm_head, CompressedLinear)
    with torch.no_grad():
        before = llama(input_ids).logits
    safetensors_dir.save(llama, None, tmp_path)
    stored = sum(t.numel() * t.element_size() for t in safetensors_dir.read_tensors(tmp_path).values())
    assert stored <= budget
    loaded, _ = safetensors_dir.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, before)


def test_budget_recipe_fields_and_errors(llama, stats_for):
    recipe = parse_recipe("steps:\n  - budget: {bits_per_weight: 5, bits: [4, 8], correction_ranks: [0, 16]}\n")
    (_, cfg), = recipe.steps
    assert cfg.bits == (4, 8) and cfg.correction_ranks == (0, 16) and recipe.needs_calibration
    with pytest.raises(FactorportError, match="bits.*3"):
        parse_recipe("steps:\n  - budget: {bytes: 1000, bits: [3, 4]}\n")
    with pytest.raises(FactorportError, match="exactly one of bytes, bits_per_weight"):
        apply(llama, [("budget", BudgetConfig())], stats_for(llama), progress=False)
