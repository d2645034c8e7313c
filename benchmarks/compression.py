"""Shared factors, corrections, sparsity and budgets on SmolLM2-135M, in one run.

Calibrates once (WikiText-2 validation, 128 x 512 tokens), applies each recipe
to a fresh copy of the model, saves it in the safetensors layout, loads it
back (checking logits bit for bit), and prints per recipe: decoder-linear
bytes as a share of fp16, total tensor bytes, summed calibration output
error of the last step, and perplexity on the first 40 windows of 512 tokens
of WikiText-2 test. Then the comparisons the presets are meant to win.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compression.py [--windows 40] [--calib-samples 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import factorport
from factorport.api import DEFAULT_CALIB
from factorport.converters import CalibrationConfig, apply, calibrate
from factorport.converters.report import module_bytes
from factorport.formats import safetensors_dir
from factorport.recipe import load_recipe


def preset(name: str):
    return load_recipe(name).steps


def bare_base(name: str):
    """A preset without its correction: the base the correction works on."""
    return [(step, config) for step, config in preset(name) if step != "correct"]


def magnitude_blocks(name: str):
    """A sparsify preset with the blocks chosen by |W| instead of Wanda's score."""
    return [(step, replace(config, method="magnitude") if step == "sparsify" else config) for step, config in preset(name)]


RECIPES = {
    "int4 base (glowq's, no correction)": lambda: bare_base("glowq-w4"),
    "glowq-w4": lambda: preset("glowq-w4"),
    "eora-w4": lambda: preset("eora-w4"),
    "glowq-s-w4": lambda: preset("glowq-s-w4"),
    "gqsa-w4s50": lambda: preset("gqsa-w4s50"),
    "magnitude blocks w4s50": lambda: magnitude_blocks("gqsa-w4s50"),
    "lost-s50-r64": lambda: preset("lost-s50-r64"),
    "budget-100mb": lambda: preset("budget-100mb"),
    "w4-gptq": lambda: preset("w4-gptq"),
}


def decoder_linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if n.startswith("model.layers.") and n.count(".") == 4 and hasattr(m, "in_features")]


def comparisons(rows: dict, dense_ppl: float) -> list[str]:
    """The acceptance comparisons, one line each, for the rows that ran."""
    lines = []
    base, glowq, eora, glowq_s = (rows.get(k) for k in ("int4 base (glowq's, no correction)", "glowq-w4", "eora-w4", "glowq-s-w4"))
    if glowq:
        lines.append(
            f"glowq-w4: perplexity {glowq['ppl'] / dense_ppl:.3f}x dense (limit 1.08x), "
            f"decoder-linear bytes {glowq['linear_bytes_vs_fp16']:.1%} of fp16 (limit 35%)"
        )
    if glowq and eora:
        lines.append(
            f"glowq-w4 vs eora-w4 ({glowq['total_bytes'] / 1e6:.1f} vs {eora['total_bytes'] / 1e6:.1f} MB): "
            f"calibration error {glowq['calib_error']:.4f} vs {eora['calib_error']:.4f}, "
            f"perplexity {glowq['ppl']:.3f} vs {eora['ppl']:.3f}"
        )
    if base and glowq and glowq_s:
        recovered = (base["ppl"] - glowq_s["ppl"]) / (base["ppl"] - glowq["ppl"])
        lines.append(f"glowq-s-w4 recovers {recovered:.0%} of glowq-w4's perplexity gain over the bare int4 base (at least 60%)")
    gqsa, magnitude = rows.get("gqsa-w4s50"), rows.get("magnitude blocks w4s50")
    if gqsa and magnitude:
        lines.append(f"gqsa-w4s50 (Wanda) vs magnitude blocks at the same density: perplexity {gqsa['ppl']:.1f} vs {magnitude['ppl']:.1f}")
    small = {k: v for k, v in rows.items() if v["total_bytes"] <= 100e6}
    if small:
        best = min(small, key=lambda k: small[k]["ppl"])
        lines.append(f"best perplexity at or under 100 MB: {best} ({small[best]['ppl']:.3f}) of {', '.join(sorted(small))}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--only", help="comma-separated recipe names")
    parser.add_argument("--json")
    args = parser.parse_args()

    model, tokenizer = factorport.api.load_any(None)
    names = decoder_linear_names(model)
    fp16_bytes = 2 * sum(model.get_submodule(n).weight.numel() for n in names)
    dense_ppl = factorport.perplexity(model, tokenizer, windows=args.windows)
    stats = calibrate(model, tokenizer, CalibrationConfig(str(DEFAULT_CALIB), args.calib_samples, 512))
    window = torch.tensor(tokenizer((DEFAULT_CALIB.parent / "wiki.test.raw").read_text()[:20000], add_special_tokens=False)["input_ids"][:256]).unsqueeze(0)

    rows = {}
    selected = args.only.split(",") if args.only else list(RECIPES)
    for label in selected:
        steps = RECIPES[label]()
        model, _ = factorport.api.load_any(None)
        reports = apply(model, steps, stats)
        last = steps[-1][0] if steps[-1][1].targets != ("lm_head",) else steps[-2][0]
        error = sum(r.calib_error for r in reports if r.step == last and r.calib_error is not None and r.name != "lm_head")
        shared = sum(module_bytes(m) for n, m in model.named_modules() if n.rpartition(".")[2].startswith("shared_"))
        linear_bytes = sum(module_bytes(model.get_submodule(n)) for n in names) + shared
        with torch.inference_mode():
            before = model(window).logits
        with tempfile.TemporaryDirectory() as tmp:
            safetensors_dir.save(model, tokenizer, Path(tmp))
            total = sum(t.numel() * t.element_size() for t in safetensors_dir.read_tensors(Path(tmp)).values())
            loaded, _ = safetensors_dir.load(Path(tmp))
        with torch.inference_mode():
            exact = torch.equal(loaded(window).logits, before)
        ppl = factorport.perplexity(loaded, tokenizer, windows=args.windows)
        rows[label] = {
            "linear_bytes_vs_fp16": linear_bytes / fp16_bytes,
            "total_bytes": total,
            "calib_error": error,
            "ppl": ppl,
            "bit_exact_reload": exact,
        }
        print(f"{label}: ppl {ppl:.3f}, linear bytes {linear_bytes / fp16_bytes:.1%} of fp16, total {total / 1e6:.1f} MB, reload exact {exact}", flush=True)

    print(f"\ndense fp32 perplexity: {dense_ppl:.3f}")
    print(f"{'recipe':<36} {'lin/fp16':>8} {'total MB':>9} {'calib err':>10} {'ppl':>8} {'x dense':>8} {'exact':>6}")
    for label, r in rows.items():
        print(
            f"{label:<36} {r['linear_bytes_vs_fp16']:>8.1%} {r['total_bytes'] / 1e6:>9.1f} {r['calib_error']:>10.4f} "
            f"{r['ppl']:>8.3f} {r['ppl'] / dense_ppl:>7.3f}x {str(r['bit_exact_reload']):>6}"
        )
    print()
    for line in comparisons(rows, dense_ppl):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"dense_ppl": dense_ppl, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
