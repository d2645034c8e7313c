"""recipe: presets parse and convert a tiny model that reloads bit for bit;
every malformed recipe is a FactorportError that names the bad field."""

from __future__ import annotations

import textwrap

import pytest
from conftest import TINY, assert_reload_bit_exact

from factorport.converters import STEPS, apply
from factorport.converters.ranks import RankPolicy
from factorport.errors import FactorportError
from factorport.ops import CompressedLinear
from factorport.recipe import PRESET_DIR, load_recipe, parse_recipe, presets


def _parse(text: str):
    return parse_recipe(textwrap.dedent(text), "t")


def test_presets_listed():
    names = presets()
    assert names == sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert {"w4-rtn", "w4-gptq", "w8-rtn", "svd-90"} <= set(names)


@pytest.mark.parametrize("name", presets())
def test_every_preset_parses(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.steps
    assert recipe.text == (PRESET_DIR / f"{name}.yaml").read_text()
    for kind, config in recipe.steps:
        assert isinstance(config, STEPS[kind].config)
        if kind == "quantize":
            assert config.spec.bits in (4, 8)
        elif hasattr(config, "ranks"):
            policy = config.ranks
            set_ = [k for k in ("rank", "ratio", "energy") if getattr(policy, k) is not None]
            assert len(set_) + bool(policy.budget) == 1


def test_preset_contents():
    gptq = load_recipe("w4-gptq")
    (kind, cfg), = gptq.steps
    assert kind == "quantize" and cfg.method == "gptq" and cfg.bits == 4 and cfg.group_size == 64 and cfg.symmetric
    assert gptq.needs_calibration
    assert not load_recipe("w4-rtn").needs_calibration
    w8 = load_recipe("w8-rtn").steps[0][1]
    assert w8.bits == 8 and w8.targets == ("linears", "lm_head")
    svd = load_recipe("svd-90").steps[0][1]
    assert svd.method == "whitened" and svd.ranks.budget == {"params_ratio": 0.9}
    assert load_recipe("svd-90").needs_calibration
    assert not load_recipe("svd-90-plain").needs_calibration


def test_load_recipe_by_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("steps:\n  - quantize: {bits: 8, group_size: 32, symmetric: false}\n")
    recipe = load_recipe(str(path))
    assert recipe.name == "mine"
    (_, cfg), = recipe.steps
    assert (cfg.bits, cfg.group_size, cfg.symmetric, cfg.method) == (8, 32, False, "rtn")


def test_full_recipe_fields():
    recipe = _parse(
        """
        name: mixed
        description: both steps
        calibration: {samples: 4, seq_len: 64}
        steps:
          - factorize:
              targets: "model.layers.*.mlp.*"
              method: asvd
              asvd_alpha: 1
              factor_dtype: float16
              ranks: {energy: 0.95, multiple: 8, weighting: absolute}
          - quantize: {method: gptq, bits: 4, group_size: 32, symmetric: false, damping: 0.05, sink_weight: 8}
        """
    )
    assert recipe.name == "mixed" and recipe.description == "both steps"
    assert recipe.calibration == {"samples": 4, "seq_len": 64}
    (k1, f), (k2, q) = recipe.steps
    assert f.targets == ("model.layers.*.mlp.*",)  # one pattern becomes a tuple
    assert f.asvd_alpha == 1.0 and f.factor_dtype == "float16"
    assert f.ranks == RankPolicy(energy=0.95, multiple=8, weighting="absolute")
    assert q.damping == 0.05 and q.symmetric is False and q.sink_weight == 8.0


def test_unknown_preset_lists_presets():
    with pytest.raises(FactorportError) as info:
        load_recipe("no-such-recipe")
    msg = str(info.value)
    assert "no-such-recipe" in msg
    for name in presets():
        assert name in msg


def test_missing_recipe_file():
    with pytest.raises(FactorportError, match="does not exist"):
        load_recipe("/nonexistent/dir/r.yaml")


BAD = {
    "unknown step": (
        "steps:\n  - prune: {sparsity: 0.5}\n",
        ["steps[0]", "unknown step 'prune'", "factorize", "quantize"],
    ),
    "unknown top-level field": (
        "stepz: []\nsteps:\n  - quantize: {}\n",
        ["unknown field 'stepz'"],
    ),
    "unknown step field": (
        "steps:\n  - quantize: {bitz: 4}\n",
        ["steps[0].quantize", "unknown field 'bitz'"],
    ),
    "bits 3": (
        "steps:\n  - quantize: {bits: 3}\n",
        ["steps[0].quantize.bits", "3", "4, 8"],
    ),
    "group 48": (
        "steps:\n  - quantize: {group_size: 48}\n",
        ["quantize.group_size", "48"],
    ),
    "method foo": (
        "steps:\n  - quantize: {method: foo}\n",
        ["quantize.method", "'foo'", "rtn", "gptq"],
    ),
    "factorize method foo": (
        "steps:\n  - factorize: {method: foo, ranks: {rank: 4}}\n",
        ["factorize.method", "'foo'", "whitened"],
    ),
    "two rank policies": (
        "steps:\n  - factorize: {ranks: {rank: 8, ratio: 0.5}}\n",
        ["factorize.ranks", "exactly one", "rank", "ratio"],
    ),
    "no rank policy": (
        "steps:\n  - factorize: {ranks: {multiple: 8}}\n",
        ["factorize.ranks", "exactly one"],
    ),
    "params_ratio 1.5": (
        "steps:\n  - factorize: {ranks: {budget: {params_ratio: 1.5}}}\n",
        ["ranks.budget.params_ratio", "1.5"],
    ),
    "unknown budget key": (
        "steps:\n  - factorize: {ranks: {budget: {flops: 3}}}\n",
        ["ranks.budget", "params_ratio"],
    ),
    "ratio 0": (
        "steps:\n  - factorize: {ranks: {ratio: 0}}\n",
        ["ranks.ratio", "(0, 1]"],
    ),
    "rank 0": (
        "steps:\n  - factorize: {ranks: {rank: 0}}\n",
        ["ranks.rank", "at least 1"],
    ),
    "rank string": (
        "steps:\n  - factorize: {ranks: {rank: big}}\n",
        ["ranks.rank", "int", "'big'"],
    ),
    "weighting": (
        "steps:\n  - factorize: {ranks: {ratio: 0.5, weighting: loud}}\n",
        ["ranks.weighting", "'loud'"],
    ),
    "bits is a bool": (
        "steps:\n  - quantize: {bits: true}\n",
        ["quantize.bits", "int"],
    ),
    "symmetric is a string": (
        "steps:\n  - quantize: {symmetric: maybe}\n",
        ["quantize.symmetric", "bool"],
    ),
    "targets not strings": (
        "steps:\n  - quantize: {targets: [1, 2]}\n",
        ["quantize.targets", "patterns"],
    ),
    "factor dtype": (
        "steps:\n  - factorize: {factor_dtype: int8, ranks: {rank: 2}}\n",
        ["factorize.factor_dtype", "'int8'", "float16"],
    ),
    "invalid yaml": (
        "steps:\n  - quantize: {bits: 4\n  oops: [\n",
        ["not valid YAML", "line"],
    ),
    "steps not a list": (
        "steps: {quantize: {bits: 4}}\n",
        ["steps", "non-empty list"],
    ),
    "steps empty": (
        "steps: []\n",
        ["steps", "non-empty list"],
    ),
    "no steps": (
        "name: x\n",
        ["steps", "non-empty list"],
    ),
    "step with two keys": (
        "steps:\n  - {quantize: {}, factorize: {}}\n",
        ["steps[0]", "one mapping"],
    ),
    "not a mapping": (
        "- quantize: {}\n",
        ["expected a mapping"],
    ),
    "calibration field": (
        "calibration: {samplez: 3}\nsteps:\n  - quantize: {}\n",
        ["calibration", "unknown field 'samplez'"],
    ),
    "calibration type": (
        "calibration: {samples: many}\nsteps:\n  - quantize: {}\n",
        ["calibration.samples", "int"],
    ),
    "step options not a mapping": (
        "steps:\n  - quantize: [4]\n",
        ["steps[0].quantize", "mapping"],
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_malformed_recipe_names_the_field(case):
    text, needles = BAD[case]
    with pytest.raises(FactorportError) as info:
        parse_recipe(text, "bad")
    msg = str(info.value)
    assert "recipe" in msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


def test_error_names_the_recipe():
    with pytest.raises(FactorportError, match="recipe my-recipe"):
        parse_recipe("name: my-recipe\nsteps:\n  - quantize: {bits: 3}\n")


def test_second_step_index_is_reported():
    with pytest.raises(FactorportError, match=r"steps\[1\]\.quantize\.bits"):
        parse_recipe("steps:\n  - quantize: {bits: 4}\n  - quantize: {bits: 5}\n")


@pytest.mark.parametrize("value", [0, -8])
def test_multiple_must_be_positive(value):
    with pytest.raises(FactorportError, match="multiple"):
        parse_recipe(f"steps:\n  - factorize: {{ranks: {{ratio: 0.5, multiple: {value}}}}}\n")


@pytest.mark.parametrize("name", presets())
def test_every_preset_converts_and_reloads_bit_exact(name, make_model, stats_for, input_ids, tmp_path):
    # lost-s50-r64's rank 64 needs k/v projections 64 wide: one kv head per head
    wide_kv = {"num_key_value_heads": TINY["num_attention_heads"]} if name == "lost-s50-r64" else {}
    model = make_model("llama", **wide_kv)
    apply(model, load_recipe(name).steps, stats_for(model), progress=False)
    assert any(isinstance(m, CompressedLinear) for m in model.modules())
    assert_reload_bit_exact(model, input_ids, tmp_path)
