"""onnxruntime speed of factorport's ONNX exports against the baselines a
user would otherwise pick, measured in one run on this machine:

* Optimum's fp32 export of the dense model (the embedded SmolLM2-135M);
* onnxruntime's own `MatMulNBitsQuantizer` RTN int4 (symmetric, block 32)
  applied to that export (it leaves the tied lm_head in fp32);
* with `--runtime onnxruntime-genai`: onnxruntime-genai's model builder,
  `-p int4 -e cpu`, for each `--builder-algorithms` (default, k_quant: its
  `algo_config`), built in its own cached environment (anchors.genai_builder_int4).

Every artifact runs in the one `--runtime`: onnxruntime (factorport's
onnxruntime backend) or onnxruntime-genai (og.Model / og.Generator, which
runs each graph's MatMulNBits at the accuracy_level written in it). For
each: decode tokens/s (median over repeats of greedy decoding with the KV
cache) next to its bound = measured read bandwidth / weight bytes read per
token, prefill seconds for N tokens (median), and perplexity on the first
few 512-token windows of WikiText-2 test, the same windows for every
artifact (cut by the original model's tokenizer). Last, which artifacts
dominate each builder output: at most its bytes, at least its decode
tokens/s, lower perplexity.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/onnx_speed.py \
        glowq-w4=OUT/glowq-w4 svd-90=OUT/svd-90 gqsa-w4s50=OUT/gqsa gqsa-dense=OUT/gqsa-dense \
        [--runtime onnxruntime-genai] [--accuracy-level 0] [--threads 2] [--windows 4] [--repeats 5] [--json F]

Each artifact is `label=path` where path is a factorport output (with onnx/)
or an onnx directory. Baselines are built once and cached (anchors cache;
the RTN one under --work, default ~/.cache/factorport/anchors/.../ort-rtn-int4-b32).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from factorport.api import DEFAULT_TEXT
from factorport.loading import saved_tokenizer
from factorport.validators import anchors
from factorport.validators.backends.onnxruntime_backend import OnnxruntimeBackend
from factorport.validators.bandwidth import bytes_read_per_token, measure_bandwidth, weight_file_bytes
from factorport.validators.perplexity import perplexity, text_windows

PROMPT_TOKENS = 32


def rtn_int4(fp32_dir: Path, target: Path, block_size: int = 32) -> Path:
    """onnxruntime's RTN int4 (symmetric, `block_size`) of Optimum's fp32 export."""
    if (target / "model.onnx").is_file():
        return target
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    print(f"building onnxruntime RTN int4 b{block_size} in {target}")
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_dir / "model.onnx")), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=False)
    for item in fp32_dir.iterdir():
        if item.is_file() and not item.name.startswith("model.onnx"):
            shutil.copy(item, tmp / item.name)
    tmp.rename(target)
    return target


class OriginalTokens:
    """The original model's tokenizer, cutting the same windows for every artifact."""

    def __init__(self) -> None:
        from factorport.loading import default_model_dir
        from factorport.validators.backends import hf_text_start

        self.tokenizer = saved_tokenizer(str(default_model_dir()))
        self.start = hf_text_start(self.tokenizer)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def text_start(self) -> list[int]:
        return list(self.start)


def onnx_dir(path: Path) -> Path:
    return path / "onnx" if (path / "onnx" / "model.onnx").is_file() else path


def open_runtime(directory: Path, args, factorport_wrote: bool):
    if args.runtime == "onnxruntime":
        return OnnxruntimeBackend.open(directory, threads=args.threads, accuracy_level=args.accuracy_level)
    from factorport.validators.backends.genai_backend import GenaiBackend

    # the builder's graph has operators factorport's checks refuse: og's own checks only
    return GenaiBackend.open(directory, threads=args.threads, checked=factorport_wrote)


def measure(label: str, directory: Path, args, bandwidth: float, windows, factorport_wrote: bool) -> dict:
    backend = open_runtime(directory, args, factorport_wrote)
    text_ids = [int(i) for i in torch.cat(windows).tolist()]
    prompt = text_ids[:PROMPT_TOKENS]
    prefill_ids = text_ids[: args.prefill]
    backend.generate(prompt, 4)  # warm-up
    decode = [backend.generate(prompt, args.decode_tokens).decode_tokens_per_second for _ in range(args.repeats)]
    prefill = [backend.generate(prefill_ids, 1).prefill_seconds for _ in range(max(1, args.repeats // 2))]
    ppl = perplexity(backend.logits, windows, progress=False)
    weights = bytes_read_per_token(directory)
    row = {
        "artifact": label,
        "file_mb": weight_file_bytes(directory) / 1e6,
        "read_mb_per_token": weights / 1e6,
        "bound_tok_s": bandwidth / weights,
        "decode_tok_s": statistics.median(decode),
        "decode_runs": decode,
        "prefill_s": statistics.median(prefill),
        "load_s": backend.load_seconds,
        "ppl": ppl,
    }
    del backend
    gc.collect()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="*", help="label=path of factorport outputs (or onnx directories)")
    parser.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "onnxruntime-genai"))
    parser.add_argument("--accuracy-level", type=int, default=0, choices=(0, 1, 2, 3, 4),
                        help="onnxruntime only (onnxruntime-genai runs the level each graph carries)")
    parser.add_argument("--builder-algorithms", default="default,k_quant",
                        help="onnxruntime-genai: the model builder's int4 algo_config values to compare with")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--windows", type=int, default=4, help="512-token windows for the perplexity column")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--text", default=str(DEFAULT_TEXT))
    parser.add_argument("--work", type=Path, help="where the RTN int4 baseline is cached")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()

    bandwidth = measure_bandwidth(threads=args.threads)
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s (median of 7 sums over 1 GiB)")
    genai = args.runtime == "onnxruntime-genai"
    targets: list[tuple[str, Path, bool]] = []  # label, directory, written by factorport
    if not args.no_baselines:
        fp32 = anchors.optimum_fp32(None)
        rtn = rtn_int4(fp32, (args.work or fp32.parent) / "ort-rtn-int4-b32")
        targets += [("optimum-fp32", fp32, False), ("ort-rtn-int4-b32", anchors.with_genai_config(rtn), False)]
        if genai:
            targets += [(f"builder-int4-{a}", anchors.genai_builder_int4(None, a), False)
                        for a in args.builder_algorithms.split(",") if a]
    for item in args.artifacts:
        label, _, path = item.rpartition("=")
        targets.append((label or Path(path).name, onnx_dir(Path(path)), True))

    windows = text_windows(OriginalTokens(), args.text, args.windows, 512)
    rows = []
    for label, directory, ours in targets:
        started = time.perf_counter()
        rows.append(measure(label, directory, args, bandwidth, windows, ours) | {"factorport": ours})
        print(f"  measured {label} in {time.perf_counter() - started:.0f} s", flush=True)

    base = {r["artifact"]: r["decode_tok_s"] for r in rows}
    second = "builder-int4-default" if genai else "ort-rtn-int4-b32"  # the int4 a user of this runtime would build
    level = "as written" if genai else args.accuracy_level
    print(f"\nruntime={args.runtime} accuracy_level={level} threads={args.threads or 'default'} ppl windows={len(windows)} x 512")
    header = (f"{'artifact':<24}{'file MB':>9}{'read MB/tok':>12}{'bound tok/s':>12}{'decode tok/s':>13}{'min-max':>12}"
              f"{'x fp32':>8}{'x ' + second.split('-')[0]:>10}{'prefill s':>10}{'ppl':>9}")
    print(header)
    for r in rows:
        r["x_fp32"] = r["decode_tok_s"] / base["optimum-fp32"] if "optimum-fp32" in base else float("nan")
        r[f"x_{second}"] = r["decode_tok_s"] / base[second] if second in base else float("nan")
        spread = f"{min(r['decode_runs']):.1f}-{max(r['decode_runs']):.1f}"
        print(
            f"{r['artifact']:<24}{r['file_mb']:>9.1f}{r['read_mb_per_token']:>12.1f}{r['bound_tok_s']:>12.1f}"
            f"{r['decode_tok_s']:>13.1f}{spread:>12}{r['x_fp32']:>8.2f}{r[f'x_{second}']:>10.2f}{r['prefill_s']:>10.2f}{r['ppl']:>9.3f}"
        )
    for anchor in (r for r in rows if r["artifact"].startswith("builder-int4-")):
        winners = [r["artifact"] for r in rows if r["factorport"] and r["file_mb"] <= anchor["file_mb"]
                   and r["decode_tok_s"] >= anchor["decode_tok_s"] and r["ppl"] < anchor["ppl"]]
        print(f"dominating {anchor['artifact']} (bytes <=, decode >=, ppl <): {', '.join(winners) or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_bytes_s": bandwidth, "args": vars(args) | {"work": str(args.work)}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
