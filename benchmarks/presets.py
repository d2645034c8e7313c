"""Convert an embedded model (SmolLM2-135M by default) with every preset, in each calibration
mode (sequential: each layer fitted to what the compressed layers before it
produce; parallel: every layer's statistics from the dense model; asymmetric:
sequential inputs aimed at the dense model's outputs), and print,
per preset: linear-layer parameters and bytes against the dense model,
perplexity on WikiText-2 test per mode next to dense, and convert seconds.
A recipe that needs the whole model at once runs once ("whole model").

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/presets.py [--model gemma3-270m] [--presets a,b] [--modes sequential,parallel] [--windows 40]

Calibration: WikiText-2 validation (tokenized release), 128 x 512 tokens by
default; perplexity: the first N windows of 512 tokens of wiki.test.raw.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import factorport
from factorport.formats.summary import inspect_artifact
from factorport.converters.calibration import MODES
from factorport.recipe import presets

ORDER = ["svd-90", "svd-90-uniform", "svd-90-plain", "w4-rtn", "w4-gptq", "w8-rtn", "glowq-w4", "eora-w4"]


def convert_and_score(name: str, mode: str, out: Path, args, dense_linear_params: int) -> dict:
    started = time.perf_counter()
    factorport.convert(args.model, recipe=name, output=out, samples=args.calib_samples, mode=mode, progress=False)
    seconds = time.perf_counter() - started
    summary = inspect_artifact(out)
    report = json.loads((out / "report" / "convert.json").read_text())
    # parameters of the decoder linears after conversion (dense ones unchanged)
    changed = {r["name"]: r for r in report["layers"] if r["name"] != "lm_head"}
    after = dense_linear_params - sum(r["params_before"] - r["params_after"] for r in changed.values())
    model, tok = factorport.load(out)
    ppl = factorport.perplexity(model, tok, windows=args.windows, progress=False)
    calibration = report["calibration"] or {}
    print(f"{name} ({calibration.get('mode', mode)}): {seconds:.1f} s, ppl {ppl:.3f}", flush=True)
    return {
        "convert_s": round(seconds, 1),
        "mode": calibration.get("mode"),
        "linear_params_ratio": after / dense_linear_params,
        "bytes": summary["totals"]["total_bytes"],
        "ppl": ppl,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an embedded model's name, a Hugging Face directory or a .gguf (default: the embedded SmolLM2-135M)")
    parser.add_argument("--presets", default=",".join(p for p in ORDER if p in presets()))
    parser.add_argument("--modes", default=",".join(MODES), help="calibration modes to run each preset in")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()
    modes = args.modes.split(",")

    dense_model, tokenizer = factorport.api.load_any(args.model)
    dense_ppl = factorport.perplexity(dense_model, tokenizer, windows=args.windows, progress=False)
    arch_linears = [
        m for n, m in dense_model.named_modules() if n.startswith("model.layers.") and hasattr(m, "weight") and m.weight.dim() == 2
    ]
    dense_linear_params = sum(m.weight.numel() for m in arch_linears)
    del dense_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            row = {"preset": name, "modes": {}}
            for mode in modes:
                result = convert_and_score(name, mode, Path(tmp) / f"{name}-{mode}", args, dense_linear_params)
                row["modes"][mode] = result
                shutil.rmtree(Path(tmp) / f"{name}-{mode}")
                if result["mode"] and result["mode"] not in MODES:  # a whole-model recipe: one mode only
                    break
            rows.append(row)

    print(f"\ndense (fp32): perplexity {dense_ppl:.3f} ({args.windows} windows of 512 tokens of wiki.test.raw)")
    print(f"calibration {args.calib_samples} x 512 of wiki.valid.tokens; perplexity (x dense) per calibration mode\n")
    header = "".join(f" {mode:>20}" for mode in modes)
    print(f"{'preset':<16} {'linear params':>13} {'tensor MB':>9}{header} {'convert s':>10}")
    for r in rows:
        first = next(iter(r["modes"].values()))
        cells = ""
        for mode in modes:
            m = r["modes"].get(mode)
            cell = "(whole model)" if m is None else f"{m['ppl']:.3f} ({m['ppl'] / dense_ppl:.3f}x)"
            cells += f" {cell:>20}"
        seconds = "/".join(f"{m['convert_s']:.0f}" for m in r["modes"].values())
        print(f"{r['preset']:<16} {first['linear_params_ratio']:>12.1%} {first['bytes'] / 1e6:>9.1f}{cells} {seconds:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"dense_ppl": dense_ppl, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
