"""How sparse can SmolLM2-135M's decoder linears get, in blocks, and stay
within a perplexity limit? Converts the embedded model once per candidate
(layer by layer, sequential calibration) and prints, per candidate: block
shape, density, whether the kept weights absorb the pruning error
(SparseGPT's sweep, `compensate`), kept-weight format, decoder-linear bytes
against fp16, perplexity and its ratio to dense. Every density in the grid is
also run as unstructured Wanda (1x1, no compensation), the baseline a block
shape has to be compared with.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/sparsity.py \\
        [--grid 1x32:0.7:comp,1x8:0.6] [--limit 1.5] [--windows 40] [--calib-samples 128]

A grid entry is SHAPE:DENSITY[:comp][:w4][:rR]: `comp` compensates, `w4`
stores the kept weights int4 g32, `rR` adds a rank-R low-rank correction of
each linear's error. Calibration: WikiText-2 validation, N x 512 tokens;
perplexity: the first N windows of 512 tokens of wiki.test.raw.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import factorport
from compression import decoder_linear_names  # benchmarks/compression.py
from factorport.recipe import parse_recipe

DEFAULT_GRID = "1x32:0.95,1x32:0.95:comp,1x16:0.95,1x4:0.9,1x4:0.9:comp,1x4:0.9:r16"


def recipe_text(entry: str) -> str:
    shape, density, *flags = entry.split(":")
    rows, cols = shape.split("x")
    options = [f"method: wanda, block_rows: {rows}, block_cols: {cols}, density: {density}"]
    rank = None
    for flag in flags:
        if flag == "comp":
            options.append("compensate: true")
        elif flag == "w4":
            options.append("bits: 4, group_size: 32, symmetric: true")
        elif flag.startswith("r"):
            rank = int(flag[1:])
        else:
            raise SystemExit(f"grid entry '{entry}': unknown flag '{flag}' (comp, w4 or rR)")
    steps = f"  - sparsify: {{targets: [linears], {', '.join(options)}}}\n"
    if rank:
        steps += f"  - correct: {{targets: [linears], shared: false, ranks: {{rank: {rank}}}}}\n"
    return f"name: sparse-{entry.replace(':', '-')}\nsteps:\n{steps}"


def unstructured(entry: str) -> str:
    return f"1x1:{entry.split(':')[1]}"


def run(entry: str, out: Path, args, dense_linear_bytes: int) -> dict:
    recipe = parse_recipe(recipe_text(entry), default_name=entry)
    started = time.perf_counter()
    factorport.convert(None, recipe=recipe, output=out, samples=args.calib_samples, mode="sequential", progress=False)
    seconds = time.perf_counter() - started
    report = json.loads((out / "report" / "convert.json").read_text())
    linear_bytes = sum(r["bytes_after"] for r in report["layers"] if r["name"] != "lm_head")
    model, tok = factorport.load(out)
    ppl = factorport.perplexity(model, tok, windows=args.windows, progress=False)
    print(f"{entry}: {seconds:.0f} s, ppl {ppl:.3f}, decoder-linear bytes {linear_bytes / dense_linear_bytes:.1%} of fp16", flush=True)
    return {"entry": entry, "ppl": ppl, "linear_bytes_vs_fp16": linear_bytes / dense_linear_bytes, "convert_s": round(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default=DEFAULT_GRID)
    parser.add_argument("--limit", type=float, default=1.5, help="perplexity limit, as a multiple of dense")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()

    dense, tokenizer = factorport.api.load_any(None)
    dense_ppl = factorport.perplexity(dense, tokenizer, windows=args.windows, progress=False)
    dense_linear_bytes = 2 * sum(dense.get_submodule(n).weight.numel() for n in decoder_linear_names(dense))
    del dense

    entries = args.grid.split(",")
    for entry in list(entries):
        if unstructured(entry) not in entries:
            entries.append(unstructured(entry))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in entries:
            rows.append(run(entry, Path(tmp) / "out", args, dense_linear_bytes))
            shutil.rmtree(Path(tmp) / "out")
            if args.json:  # after every row: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps({"dense_ppl": dense_ppl, "rows": rows}, indent=2) + "\n")

    limit = args.limit * dense_ppl
    print(f"\ndense (fp32): perplexity {dense_ppl:.3f} ({args.windows} windows); limit {args.limit}x = {limit:.2f}")
    print(f"calibration {args.calib_samples} x 512, sequential\n")
    by_entry = {r["entry"]: r for r in rows}
    print(f"{'candidate':<22} {'bytes/fp16':>10} {'perplexity':>20} {'unstructured Wanda, same density':>34} {'convert s':>9}")
    for r in rows:
        base = by_entry[unstructured(r["entry"])]
        ref = "" if base is r else f"{base['ppl']:.3f} ({base['ppl'] / dense_ppl:.2f}x)"
        print(f"{r['entry']:<22} {r['linear_bytes_vs_fp16']:>10.1%} {r['ppl']:>11.3f} ({r['ppl'] / dense_ppl:.2f}x) {ref:>34} {r['convert_s']:>9}")
    blocked = [r for r in rows if not r["entry"].startswith("1x1:") and r["ppl"] <= limit]
    if blocked:
        best = min(blocked, key=lambda r: (float(r["entry"].split(":")[1]), r["ppl"]))
        print(f"\nsparsest block recipe within {args.limit}x dense: {best['entry']} ({best['ppl']:.3f})")
    else:
        print(f"\nno block recipe in the grid stays within {args.limit}x dense")


if __name__ == "__main__":
    main()
