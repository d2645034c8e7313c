"""Parity and perplexity of OUTPUT/onnx against the torch compressed reference
(OUTPUT/safetensors), on windows of 512 tokens of WikiText-2 test, at MatMulNBits
accuracy levels 0 (float32 compute) and 4 (int8 activations).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/onnx_parity.py OUT/glowq-w4 [OUT/svd-90 ...] [--windows 8] [--json F]

Per artifact and level: max |logit diff| / max |logit| (worst window), top-1
agreement, mean KL(torch || onnx) per token, and both perplexities over the
same windows (relative difference).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from factorport.api import DEFAULT_TEXT, open_output
from factorport.validators.perplexity import text_windows


def nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    return float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum")), len(ids) - 1


def compare(output: Path, windows: int, levels: list[int], threads: int | None) -> list[dict]:
    reference = open_output(output, "torch")
    ids = text_windows(reference, DEFAULT_TEXT, windows, 512)
    expected = [reference.logits(w) for w in ids]
    torch_nll = sum(nll(e, w)[0] for e, w in zip(expected, ids))
    count = sum(len(w) - 1 for w in ids)
    rows = []
    for level in levels:
        runtime = open_output(output, "onnxruntime", accuracy_level=level, threads=threads)
        worst, agree, kl, onnx_nll = 0.0, 0, 0.0, 0.0
        for e, w in zip(expected, ids):
            got = runtime.logits(w)
            worst = max(worst, float((got - e).abs().max() / e.abs().max()))
            agree += int((got.argmax(-1) == e.argmax(-1)).sum())
            kl += float(F.kl_div(F.log_softmax(got, -1), F.log_softmax(e, -1), log_target=True, reduction="sum"))
            onnx_nll += nll(got, w)[0]
        ppl_torch, ppl_onnx = math.exp(torch_nll / count), math.exp(onnx_nll / count)
        rows.append(
            {
                "artifact": output.name,
                "accuracy_level": level,
                "windows": len(ids),
                "max_rel_diff": worst,
                "top1": agree / sum(len(w) for w in ids),
                "mean_kl": kl / sum(len(w) for w in ids),
                "ppl_torch": ppl_torch,
                "ppl_onnx": ppl_onnx,
                "ppl_rel_diff": ppl_onnx / ppl_torch - 1,
            }
        )
        r = rows[-1]
        print(
            f"{r['artifact']:<16} level {level}: max|diff|/max|logit| {r['max_rel_diff']:.2e}  top-1 {r['top1']:.4f}  "
            f"mean KL {r['mean_kl']:.2e}  ppl torch {ppl_torch:.3f} onnx {ppl_onnx:.3f} ({100 * r['ppl_rel_diff']:+.3f}%)",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+", type=Path, help="factorport outputs holding safetensors/ and onnx/")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--levels", default="0,4")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    rows = [row for output in args.outputs for row in compare(output, args.windows, levels, args.threads)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
