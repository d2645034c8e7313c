"""factorport's llama.cpp artifacts at llama.cpp's bytes against llama.cpp's
quantization, without and with the importance matrix `llama-imatrix`
computes on the same calibration text (the strongest llama.cpp baseline), on
SmolLM2-135M, measured in one run.

For each llama.cpp type T: llama.cpp's files (`llama-quantize [--imatrix]` of
the reference F32 GGUF) and factorport's model.gguf + adapter.gguf from the
recipe `llamacpp: {bytes: N}`, N what keeps the two files within the
bytes of llama.cpp's imatrix file of T: per-tensor llama.cpp types (quantized by
llama.cpp with factorport's importance matrix) and LoRA correction ranks,
chosen by calibration output error per byte. Perplexity by factorport's llama.cpp backend on the first `--windows`
windows of 512 tokens of wiki.test.raw, tokenized by llama.cpp; for every
llama.cpp file also by `llama-perplexity` itself (`-c 512 --chunks
--windows`, the second half of each chunk) next to factorport's scoring of
the same tokens, which must agree within 0.5%. Then decode tokens/s of each
factorport artifact (model + adapter) against llama.cpp's imatrix file of the
same type (median of repeats, the llama.cpp backend), next to the bound:
memory bandwidth / bytes of weights per token.

    .venv/bin/python benchmarks/gguf_vs_llamacpp.py [--types Q4_0 --calib-samples 32 --windows 10]
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
import factorport
from factorport.converters import CalibrationConfig, apply, calibrate
from factorport.formats.gguf import ADAPTER_FILE, MODEL_FILE, export
from factorport.llamacpp.quantize import quantize_file
from factorport.llamacpp.tools import llama_perplexity, run_tool
from factorport.recipe import parse_recipe
from factorport.validators.backends.llamacpp_backend import LlamaCppBackend
from factorport.validators.bandwidth import measure_bandwidth
from factorport.validators.perplexity import llama_perplexity_protocol, perplexity, text_windows

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
TYPES = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "IQ4_XS")
AGREEMENT = 0.005  # llama-perplexity against factorport's scoring of the same tokens
RECIPE = """
name: llamacpp-equal-bytes
steps:
  - llamacpp: {{targets: [linears, lm_head], bytes: {bytes}}}
"""
ADAPTER_HEADER = 4096  # adapter.gguf's header and key/values, beyond its tensors' entries (which the step counts)


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


def check_against_llama_perplexity(directory: Path, windows: int, threads: int) -> float:
    """llama-perplexity's figure for a model.gguf, after checking that
    factorport's scoring of the same chunks agrees with it."""
    text = DATA / "wiki.test.raw"
    theirs = llama_perplexity(directory / MODEL_FILE, text, 512, windows, threads)
    backend = LlamaCppBackend.open(directory, threads=threads, adapter=False)
    try:
        ours = llama_perplexity_protocol(backend, text, windows, 512)
    finally:
        backend.close()
    agree = abs(ours / theirs - 1) <= AGREEMENT
    print(f"  llama-perplexity {theirs:.3f}, factorport on the same tokens {ours:.3f}: {'agree' if agree else 'DISAGREE'} (within {AGREEMENT:.1%})", flush=True)
    if not agree:
        raise SystemExit(f"llama-perplexity and factorport's perplexity of {directory.name} differ by more than {AGREEMENT:.1%}")
    return theirs


def artifact_bytes(directory: Path) -> int:
    return sum((directory / f).stat().st_size for f in (MODEL_FILE, ADAPTER_FILE) if (directory / f).exists())


def llama_imatrix(f32: Path, out: Path, args) -> Path:
    """`llama-imatrix` of the reference on the calibration text, as many chunks of the same length."""
    run_tool("llama-imatrix", ["-m", str(f32), "-f", str(DATA / "wiki.valid.tokens"), "-c", str(args.calib_seq_len),
                               "--chunks", str(args.calib_samples), "-o", str(out), "--no-ppl", "-t", str(args.threads)], timeout=7200)
    return out


def byte_target(theirs: Path, reference: Path) -> int:
    """The tensor bytes that keep model.gguf + adapter.gguf within llama.cpp's
    file: its weight tensors', less what factorport's key/values (those of the
    reference export) take beyond llama.cpp's."""
    def split(path):
        tensors = gguf.GGUFReader(path).tensors
        return sum(int(t.n_bytes) for t in tensors if len(t.shape) == 2), path.stat().st_size - sum(int(t.n_bytes) for t in tensors)

    (weights, their_header), (_, our_header) = split(theirs), split(reference)
    return weights + their_header - our_header - ADAPTER_HEADER


def factorport_artifact(reference, tokenizer, stats, target: int, out: Path) -> list:
    model = copy.deepcopy(reference)
    reports = apply(model, parse_recipe(RECIPE.format(bytes=target)).steps, stats, progress=True)
    out.mkdir(parents=True)
    export(model, tokenizer, out, progress=False, native=False)
    return reports


def chosen(reports) -> str:
    """What the step chose: how many tensors of each type and the corrections' ranks."""
    types = Counter(r.operator.split()[1].rstrip(",") for r in reports)
    ranks = Counter(int(r.operator.rsplit(" ", 1)[1]) for r in reports)
    return " ".join(f"{k}x{v}" for k, v in types.most_common()) + "; ranks " + " ".join(f"{k}x{v}" for k, v in sorted(ranks.items()))


def decode_speed(directory: Path, adapter: bool, threads: int, tokens: int, repeats: int) -> float:
    backend = LlamaCppBackend.open(directory, threads=threads, adapter=adapter)
    try:
        prompt = backend.tokenize("The history of the city begins in the early middle ages, when")
        rates = [backend.generate(prompt, tokens).decode_tokens_per_second for _ in range(repeats)]
    finally:
        backend.close()
    return statistics.median(rates)


def report_decode_speed(rows, args) -> None:
    """Each factorport artifact (model + adapter) against llama.cpp's imatrix file of the same type."""
    bw = measure_bandwidth(threads=args.threads)
    print(f"\ndecode ({args.threads} threads, {args.decode_tokens} tokens, median of {args.repeats}, llama.cpp backend); bandwidth {bw / 1e9:.1f} GB/s")
    print("| type | llama.cpp + imatrix tok/s (bound) | factorport tok/s (bound) | ratio |")
    print("|---|---|---|---|")
    for type_name, theirs, ours in rows:
        their_speed, our_speed = decode_speed(theirs, False, args.threads, args.decode_tokens, args.repeats), decode_speed(ours, True, args.threads, args.decode_tokens, args.repeats)
        their_bound, our_bound = bw / artifact_bytes(theirs), bw / artifact_bytes(ours)
        print(f"| {type_name} | {their_speed:.1f} ({their_bound:.0f}) | {our_speed:.1f} ({our_bound:.0f}) | {our_speed / their_speed:.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="/tmp/factorport-gguf-bench", help="scratch directory (deleted first)")
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
    f32 = work / "f32" / MODEL_FILE
    print(f"reference F32 GGUF: {f32.stat().st_size / 1e6:.1f} MB; perplexity {llamacpp_perplexity(work / 'f32', args.windows, args.threads):.3f}", flush=True)
    check_against_llama_perplexity(work / "f32", args.windows, args.threads)
    imatrix_file = llama_imatrix(f32, work / "llama-imatrix.gguf", args)

    def llama_quantize(type_name: str, imatrix: str | None) -> Path:
        directory = work / (f"llamacpp-{type_name}" + ("" if imatrix is None else f"-{imatrix}"))
        if not directory.exists():
            directory.mkdir()
            if imatrix is None:
                quantize_file(f32, directory / MODEL_FILE, type_name)
            else:
                run_tool("llama-quantize", ["--imatrix", str(imatrix_file), str(f32), str(directory / MODEL_FILE), type_name], timeout=1800)
        return directory

    rows, speeds = [], []
    for type_name in args.types.split(","):
        anchors = {}
        for imatrix in (None, "llama-imatrix"):
            directory = llama_quantize(type_name, imatrix)
            label = f"llama.cpp {type_name}" + (f" + {imatrix}" if imatrix else "")
            print(label, flush=True)
            anchors[imatrix] = (artifact_bytes(directory), llamacpp_perplexity(directory, args.windows, args.threads))
            check_against_llama_perplexity(directory, args.windows, args.threads)
            print(f"  {anchors[imatrix][0] / 1e6:.2f} MB, perplexity {anchors[imatrix][1]:.3f}", flush=True)
        ours = work / f"factorport-{type_name}"
        target = byte_target(llama_quantize(type_name, "llama-imatrix") / MODEL_FILE, f32)
        reports = factorport_artifact(reference, tokenizer, stats, target, ours)
        ours_ppl, ours_bytes = llamacpp_perplexity(ours, args.windows, args.threads), artifact_bytes(ours)
        print(f"  factorport at {type_name}'s bytes: {ours_bytes / 1e6:.2f} MB, perplexity {ours_ppl:.3f}; {chosen(reports)}", flush=True)
        rows.append((type_name, anchors, tensor_types(work / f"llamacpp-{type_name}-llama-imatrix" / MODEL_FILE), (ours_bytes, ours_ppl, chosen(reports))))
        speeds.append((type_name, work / f"llamacpp-{type_name}-llama-imatrix", ours))

    print(f"\nSmolLM2-135M, perplexity in llama.cpp on {args.windows} x 512 tokens of wiki.test.raw; calibration {args.calib_samples}x{args.calib_seq_len} "
          f"of wiki.valid.tokens for both importance matrices; factorport: recipe llamacpp {{bytes: N}}, N to fit the imatrix file (model.gguf + adapter.gguf)")
    print("| type | llama.cpp MB | ppl | + llama-imatrix MB | ppl | tensor types held | factorport MB (x) | ppl | its types; correction ranks | beats imatrix at <= bytes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for type_name, anchors, held, (ours_bytes, ours_ppl, picks) in rows:
        (plain_bytes, plain_ppl), (their_bytes, their_ppl) = anchors[None], anchors["llama-imatrix"]
        wins = ours_ppl < their_ppl and ours_bytes <= their_bytes
        print(f"| {type_name} | {plain_bytes / 1e6:.2f} | {plain_ppl:.3f} | {their_bytes / 1e6:.2f} | {their_ppl:.3f} | {held} | "
              f"{ours_bytes / 1e6:.2f} ({ours_bytes / their_bytes:.3f}) | {ours_ppl:.3f} | {picks} | {'yes' if wins else 'no'} |")
    report_decode_speed(speeds, args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
