"""factorport's llama.cpp artifacts (llama.cpp's own quantization + a LoRA
adapter correcting its error) against llama.cpp's quantization alone, on
SmolLM2-135M, measured in one run.

For each llama.cpp type T: llama.cpp's file (llama_model_quantize of the
reference F32 GGUF) and factorport's model.gguf + adapter.gguf, whose base is
llama.cpp's quantization to a type B (T itself by default; `--search` also
tries cheaper bases) and whose adapter fills what is left of a budget of
1.05 x llama.cpp's bytes. Perplexity through llama.cpp on the first
`--windows` windows of 512 tokens of wiki.test.raw, tokenized by llama.cpp.
Then decode tokens/s of model + adapter vs the same base alone (median of
repeats), next to the bound: memory bandwidth / bytes of weights per token.

    .venv/bin/python benchmarks/gguf_vs_llamacpp.py [--calib-samples 128 --calib-seq-len 512]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gguf
import numpy as np

import factorport
from factorport.converters import CalibrationConfig, apply, calibrate
from factorport.formats.gguf import ADAPTER_FILE, MODEL_FILE, export
from factorport.llamacpp.quantize import quantize_file
from factorport.recipe import parse_recipe
from factorport.validators.backends.llamacpp_backend import LlamaCppBackend
from factorport.validators.bandwidth import measure_bandwidth
from factorport.validators.perplexity import perplexity, text_windows

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
TYPES = ("Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M")
CHEAPER = {"Q4_K_M": ("Q4_0",), "Q5_K_M": ("Q4_K_M",), "Q4_0": ("Q3_K_M",)}
SIZE_LIMIT = 1.05
ADAPTER_OVERHEAD = 64_000  # GGUF header, names and alignment of ~420 adapter tensors (bytes)
RECIPE = """
name: glowq-llamacpp
steps:
  - llamacpp: {{targets: [linears, lm_head], type: {base}}}
  - correct: {{targets: [{targets}], shared: false, ranks: {{budget: {{added_bytes: {budget}}}, multiple: {multiple}}}}}
"""


def tensor_types(path: Path) -> str:
    counts = Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2 or t.tensor_type.name != "F32")
    return " ".join(f"{k}x{v}" for k, v in counts.most_common())


def llamacpp_perplexity(directory: Path, windows: int, threads: int, adapter: bool = True) -> float:
    backend = LlamaCppBackend.open(directory, threads=threads, adapter=adapter)
    try:
        ids = text_windows(backend, DATA / "wiki.test.raw", windows, 512)
        return perplexity(backend.logits, ids, progress=False)
    finally:
        backend.close()


def artifact_bytes(directory: Path) -> int:
    return sum((directory / f).stat().st_size for f in (MODEL_FILE, ADAPTER_FILE) if (directory / f).exists())


def factorport_artifact(reference, tokenizer, stats, base: str, budget: int, out: Path, targets: str, multiple: int) -> dict:
    model = copy.deepcopy(reference)
    recipe = parse_recipe(RECIPE.format(base=base, budget=float(budget), targets=targets, multiple=multiple))
    apply(model, recipe.steps, stats, progress=False)
    out.mkdir(parents=True)
    export(model, tokenizer, out, progress=False, native=False)
    return {"recipe": f"llamacpp {base} + EoRA adapter (budget {budget / 1e6:.2f} MB, ranks in steps of {multiple})"}


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two GGUF files hold the same tensors, byte for byte (metadata aside)."""
    ta = {t.name: (t.tensor_type, np.array(t.data).tobytes()) for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: (t.tensor_type, np.array(t.data).tobytes()) for t in gguf.GGUFReader(b).tensors}
    return ta == tb


def decode_speed(directory: Path, adapter: bool, threads: int, tokens: int, repeats: int) -> float:
    backend = LlamaCppBackend.open(directory, threads=threads, adapter=adapter)
    try:
        prompt = backend.tokenize("The history of the city begins in the early middle ages, when")
        rates = [backend.generate(prompt, tokens).decode_tokens_per_second for _ in range(repeats)]
    finally:
        backend.close()
    return statistics.median(rates)


def report_decode_speed(type_name: str, ours: Path, args) -> bool:
    bw = measure_bandwidth(threads=args.threads)
    with_adapter = decode_speed(ours, True, args.threads, args.decode_tokens, args.repeats)
    without = decode_speed(ours, False, args.threads, args.decode_tokens, args.repeats)
    model_bytes = (ours / MODEL_FILE).stat().st_size
    adapter_bytes = (ours / ADAPTER_FILE).stat().st_size
    print(f"decode ({type_name} artifact, {args.threads} threads, {args.decode_tokens} tokens, median of {args.repeats}); bandwidth {bw / 1e9:.1f} GB/s")
    print(f"  base alone:      {without:.1f} tok/s  (bound {bw / model_bytes:.0f} tok/s = bandwidth / {model_bytes / 1e6:.1f} MB)")
    print(f"  base + adapter:  {with_adapter:.1f} tok/s  (bound {bw / (model_bytes + adapter_bytes):.0f} tok/s = bandwidth / {(model_bytes + adapter_bytes) / 1e6:.1f} MB)")
    print(f"  ratio {with_adapter / without:.3f} (target >= 0.8)", flush=True)
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--search", action="store_true", help="also try cheaper llama.cpp bases with a larger adapter")
    p.add_argument("--work", default="/tmp/factorport-gguf-bench", help="scratch directory (deleted first)")
    p.add_argument("--targets", default="linears", help="what the correction may touch (a quick smoke run: 'model.layers.0.*')")
    p.add_argument(
        "--multiple", type=int, default=32,
        help="adapter ranks in steps of this: fewer, larger LoRA pairs (llama.cpp pays per pair at decode)",
    )
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    reference, tokenizer = factorport.api.load_any(None)
    stats = calibrate(reference, tokenizer, CalibrationConfig(str(DATA / "wiki.valid.tokens"), args.calib_samples, args.calib_seq_len), progress=False)
    print(f"calibration {args.calib_samples}x{args.calib_seq_len} of wiki.valid.tokens: {stats.seconds:.0f} s", flush=True)
    (work / "f32").mkdir()
    export(reference, tokenizer, work / "f32", progress=False, gguf_type="F32", native=False)
    print(f"reference F32 GGUF: {(work / 'f32' / MODEL_FILE).stat().st_size / 1e6:.1f} MB; perplexity {llamacpp_perplexity(work / 'f32', args.windows, args.threads):.3f}", flush=True)

    rows, chosen, speed_done = [], {}, False
    for type_name in args.types.split(","):
        theirs = work / f"llamacpp-{type_name}"
        theirs.mkdir()
        quantize_file(work / "f32" / MODEL_FILE, theirs / MODEL_FILE, type_name)
        their_bytes = artifact_bytes(theirs)
        their_ppl = llamacpp_perplexity(theirs, args.windows, args.threads)
        best = None
        for base in (type_name,) + (CHEAPER.get(type_name, ()) if args.search else ()):
            base_dir = work / f"llamacpp-{base}"
            if not base_dir.exists():
                base_dir.mkdir()
                quantize_file(work / "f32" / MODEL_FILE, base_dir / MODEL_FILE, base)
            budget = int(SIZE_LIMIT * their_bytes - artifact_bytes(base_dir) - ADAPTER_OVERHEAD)
            if budget <= 0:
                continue
            ours = work / f"factorport-{type_name}-on-{base}"
            info = factorport_artifact(reference, tokenizer, stats, base, budget, ours, args.targets, args.multiple)
            ours_bytes = artifact_bytes(ours)
            identical = same_tensors(ours / MODEL_FILE, base_dir / MODEL_FILE)
            print(f"  model.gguf holds exactly llama.cpp's {base} tensors: {identical}", flush=True)
            ours_ppl = llamacpp_perplexity(ours, args.windows, args.threads)
            print(f"  {type_name}: base {base}: {ours_bytes / 1e6:.2f} MB ({ours_bytes / their_bytes:.3f}x) perplexity {ours_ppl:.3f}", flush=True)
            candidate = (ours_ppl, ours_bytes, ours, info["recipe"])
            if ours_bytes <= SIZE_LIMIT * their_bytes and (best is None or ours_ppl < best[0]):
                best = candidate
        chosen[type_name] = best
        rows.append((type_name, their_bytes, their_ppl, tensor_types(theirs / MODEL_FILE), best))
        print(f"{type_name}: llama.cpp {their_bytes / 1e6:.2f} MB perplexity {their_ppl:.3f}", flush=True)
        if best is not None and not speed_done:
            speed_done = report_decode_speed(type_name, best[2], args)

    print(f"\nSmolLM2-135M, perplexity in llama.cpp on {args.windows} x 512 tokens of wiki.test.raw; calibration {args.calib_samples}x{args.calib_seq_len}")
    print("| type | llama.cpp MB | llama.cpp ppl | tensor types held | factorport MB (x) | factorport ppl | recipe | adapter MB | wins |")
    print("|---|---|---|---|---|---|---|---|---|")
    for type_name, their_bytes, their_ppl, held, best in rows:
        if best is None:
            print(f"| {type_name} | {their_bytes / 1e6:.2f} | {their_ppl:.3f} | {held} | – | – | – | – | no |")
            continue
        ppl, ours_bytes, ours, recipe = best
        adapter_mb = (ours / ADAPTER_FILE).stat().st_size / 1e6
        wins = ppl < their_ppl and ours_bytes <= SIZE_LIMIT * their_bytes
        print(f"| {type_name} | {their_bytes / 1e6:.2f} | {their_ppl:.3f} | {held} | {ours_bytes / 1e6:.2f} ({ours_bytes / their_bytes:.3f}) | {ppl:.3f} | {recipe} | {adapter_mb:.2f} | {'yes' if wins else 'no'} |")

    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
