"""onnxruntime speed of factorport's ONNX exports against the two baselines a
user would otherwise pick, measured in one run on this machine:

* Optimum's fp32 export of the dense model (the embedded SmolLM2-135M);
* onnxruntime's own `MatMulNBitsQuantizer` RTN int4 (symmetric, block 32)
  applied to that export (it leaves the tied lm_head in fp32).

For each: decode tokens/s (median over repeats of greedy decoding with the KV
cache) next to its bound = measured read bandwidth / weight bytes read per
token, prefill seconds for N tokens (median), and perplexity on the first few
512-token windows of WikiText-2 test.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/onnx_speed.py \
        glowq-w4=OUT/glowq-w4 svd-90=OUT/svd-90 gqsa-w4s50=OUT/gqsa gqsa-dense=OUT/gqsa-dense \
        [--accuracy-level 0] [--threads 2] [--windows 4] [--repeats 5] [--json F]

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

from factorport.api import DEFAULT_TEXT, backend_perplexity
from factorport.validators import anchors
from factorport.validators.backends.onnxruntime_backend import OnnxruntimeBackend
from factorport.validators.bandwidth import bytes_read_per_token, measure_bandwidth, weight_file_bytes

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


def onnx_dir(path: Path) -> Path:
    return path / "onnx" if (path / "onnx" / "model.onnx").is_file() else path


def measure(label: str, directory: Path, args, bandwidth: float) -> dict:
    backend = OnnxruntimeBackend.open(directory, threads=args.threads, accuracy_level=args.accuracy_level)
    text_ids = backend.tokenize(Path(args.text).read_text()[:200_000])
    prompt = text_ids[:PROMPT_TOKENS]
    prefill_ids = text_ids[: args.prefill]
    backend.generate(prompt, 4)  # warm-up
    decode = [backend.generate(prompt, args.decode_tokens).decode_tokens_per_second for _ in range(args.repeats)]
    prefill = [backend.generate(prefill_ids, 1).prefill_seconds for _ in range(max(1, args.repeats // 2))]
    ppl = backend_perplexity(backend, args.text, args.windows, 512, progress=False)
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
    parser.add_argument("--accuracy-level", type=int, default=0, choices=(0, 1, 2, 3, 4))
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
    targets: list[tuple[str, Path]] = []
    if not args.no_baselines:
        fp32 = anchors.optimum_fp32(None)
        targets.append(("optimum-fp32", fp32))
        targets.append(("ort-rtn-int4-b32", rtn_int4(fp32, (args.work or fp32.parent) / "ort-rtn-int4-b32")))
    for item in args.artifacts:
        label, _, path = item.rpartition("=")
        targets.append((label or Path(path).name, onnx_dir(Path(path))))

    rows = []
    for label, directory in targets:
        started = time.perf_counter()
        rows.append(measure(label, directory, args, bandwidth))
        print(f"  measured {label} in {time.perf_counter() - started:.0f} s", flush=True)

    base = {r["artifact"]: r["decode_tok_s"] for r in rows}
    print(f"\naccuracy_level={args.accuracy_level} threads={args.threads or 'default'} ppl windows={args.windows}")
    header = f"{'artifact':<20}{'file MB':>9}{'read MB/tok':>12}{'bound tok/s':>12}{'decode tok/s':>13}{'min-max':>12}{'x fp32':>8}{'x rtn4':>8}{'prefill s':>10}{'ppl':>9}"
    print(header)
    for r in rows:
        x_fp32 = r["decode_tok_s"] / base["optimum-fp32"] if "optimum-fp32" in base else float("nan")
        x_rtn = r["decode_tok_s"] / base["ort-rtn-int4-b32"] if "ort-rtn-int4-b32" in base else float("nan")
        r["x_fp32"], r["x_rtn4"] = x_fp32, x_rtn
        spread = f"{min(r['decode_runs']):.1f}-{max(r['decode_runs']):.1f}"
        print(
            f"{r['artifact']:<20}{r['file_mb']:>9.1f}{r['read_mb_per_token']:>12.1f}{r['bound_tok_s']:>12.1f}"
            f"{r['decode_tok_s']:>13.1f}{spread:>12}{x_fp32:>8.2f}{x_rtn:>8.2f}{r['prefill_s']:>10.2f}{r['ppl']:>9.3f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_bytes_s": bandwidth, "args": vars(args) | {"work": str(args.work)}, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
