"""Convert the embedded SmolLM2-135M with every preset and print, per preset:
convert seconds (calibration included), linear-layer parameters and bytes
against the dense model, and perplexity on WikiText-2 test next to dense.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/presets.py [--presets a,b] [--windows 40]

Calibration: WikiText-2 validation (tokenized release), 128 x 512 tokens by
default; perplexity: the first N windows of 512 tokens of wiki.test.raw.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import factorport
from factorport.formats.summary import inspect_artifact
from factorport.recipe import presets

ORDER = ["svd-90", "svd-90-uniform", "svd-90-plain", "w4-rtn", "w4-gptq", "w8-rtn"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=",".join(p for p in ORDER if p in presets()))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()

    dense_model, tokenizer = factorport.api.load_any(None)
    dense_ppl = factorport.perplexity(dense_model, tokenizer, windows=args.windows)
    arch_linears = [
        m for n, m in dense_model.named_modules() if n.startswith("model.layers.") and hasattr(m, "weight") and m.weight.dim() == 2
    ]
    dense_linear_params = sum(m.weight.numel() for m in arch_linears)
    del dense_model

    rows = [{"preset": "dense (fp32)", "convert_s": 0.0, "linear_params_ratio": 1.0, "bytes": None, "ppl": dense_ppl}]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.presets.split(","):
            out = Path(tmp) / name
            started = time.perf_counter()
            factorport.convert(None, recipe=name, output=out, samples=args.calib_samples)
            seconds = time.perf_counter() - started
            summary = inspect_artifact(out)
            report = json.loads((out / "report" / "convert.json").read_text())
            # parameters of the decoder linears after conversion (dense ones unchanged)
            changed = {r["name"]: r for r in report["layers"] if r["name"] != "lm_head"}
            after = dense_linear_params - sum(r["params_before"] - r["params_after"] for r in changed.values())
            model, tok = factorport.load(out)
            ppl = factorport.perplexity(model, tok, windows=args.windows)
            rows.append(
                {
                    "preset": name,
                    "convert_s": round(seconds, 1),
                    "calib_s": (report["calibration"] or {}).get("seconds"),
                    "linear_params_ratio": after / dense_linear_params,
                    "bytes": summary["totals"]["total_bytes"],
                    "ppl": ppl,
                }
            )
            print(f"{name}: {seconds:.1f} s, ppl {ppl:.3f}", flush=True)

    print()
    print(f"{'preset':<16} {'convert s':>9} {'calib s':>8} {'linear params':>13} {'tensor MB':>9} {'ppl':>8} {'x dense':>8}")
    for r in rows:
        size = "-" if r["bytes"] is None else f"{r['bytes'] / 1e6:.1f}"
        calib = r.get("calib_s")
        print(
            f"{r['preset']:<16} {r['convert_s']:>9.1f} {('-' if calib is None else f'{calib:.1f}'):>8} "
            f"{r['linear_params_ratio']:>12.1%} {size:>9} {r['ppl']:>8.3f} {r['ppl'] / dense_ppl:>7.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
