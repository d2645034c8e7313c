"""factorport's llama.cpp artifacts (llama.cpp's own quantization with
factorport's importance matrix + a LoRA adapter correcting what remains)
against llama.cpp's quantization, without and with the importance matrix
`llama-imatrix` computes on the same calibration text (the strongest
llama.cpp baseline), on SmolLM2-135M, measured in one run.

For each llama.cpp type T: llama.cpp's files (`llama-quantize [--imatrix]` of
the reference F32 GGUF) and factorport's model.gguf + adapter.gguf, whose base
is llama.cpp's quantization to a type B with factorport's importance matrix
(T itself by default; `--search` also tries cheaper bases) and whose adapter
fills what is left of a budget of `--size-limit` x llama.cpp's bytes.
Perplexity by factorport's llama.cpp backend on the first `--windows` windows
of 512 tokens of wiki.test.raw, tokenized by llama.cpp; for every llama.cpp
file also by `llama-perplexity` itself (`-c 512 --chunks --windows`, the second
half of each chunk) next to factorport's scoring of the same tokens, which must
agree within 0.5%. Then decode tokens/s of model + adapter vs the same base
alone (median of repeats, the backend), next to the bound: memory bandwidth /
bytes of weights per token.

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
from factorport.formats.gguf import ADAPTER_FILE, IMATRIX_FILE, MODEL_FILE, export
from factorport.formats.gguf.imatrix import write_imatrix
from factorport.formats.input_sums import InputSums
from factorport.llamacpp.quantize import quantize_file
from factorport.llamacpp.tools import llama_perplexity, run_tool
from factorport.recipe import parse_recipe
from factorport.validators.backends.llamacpp_backend import LlamaCppBackend
from factorport.validators.bandwidth import measure_bandwidth
from factorport.validators.perplexity import llama_perplexity_protocol, perplexity, text_windows

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
TYPES = ("Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M")
CHEAPER = {"Q4_K_M": ("Q4_0",), "Q5_K_M": ("Q4_K_M",), "Q4_0": ("Q3_K_M",)}
AGREEMENT = 0.005  # llama-perplexity against factorport's scoring of the same tokens
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


def factorport_artifact(reference, tokenizer, stats, base: str, budget: int, out: Path, targets: str, multiple: int) -> dict:
    model = copy.deepcopy(reference)
    recipe = parse_recipe(RECIPE.format(base=base, budget=float(budget), targets=targets, multiple=multiple))
    apply(model, recipe.steps, stats, progress=False)
    out.mkdir(parents=True)
    export(model, tokenizer, out, progress=False, native=False)
    return {"recipe": f"llamacpp {base} (factorport imatrix) + EoRA adapter (budget {budget / 1e6:.2f} MB, ranks in steps of {multiple})"}


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
    p.add_argument("--size-limit", type=float, default=1.05, help="factorport's bytes at most this x llama.cpp's")
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
    f32 = work / "f32" / MODEL_FILE
    print(f"reference F32 GGUF: {f32.stat().st_size / 1e6:.1f} MB; perplexity {llamacpp_perplexity(work / 'f32', args.windows, args.threads):.3f}", flush=True)
    check_against_llama_perplexity(work / "f32", args.windows, args.threads)
    imatrices = {"llama-imatrix": llama_imatrix(f32, work / "llama-imatrix.gguf", args), "factorport": work / IMATRIX_FILE}
    write_imatrix(imatrices["factorport"], reference, InputSums(stats.input_sums(list(stats.key_of)), stats.tokens, args.calib_seq_len, stats.source))

    def llama_quantize(type_name: str, imatrix: str | None) -> Path:
        directory = work / (f"llamacpp-{type_name}" + ("" if imatrix is None else f"-{imatrix}"))
        if not directory.exists():
            directory.mkdir()
            if imatrix is None:
                quantize_file(f32, directory / MODEL_FILE, type_name)
            else:
                run_tool("llama-quantize", ["--imatrix", str(imatrices[imatrix]), str(f32), str(directory / MODEL_FILE), type_name], timeout=1800)
        return directory

    rows, speed_done = [], False
    for type_name in args.types.split(","):
        anchors = {}
        for imatrix in (None, "llama-imatrix"):
            directory = llama_quantize(type_name, imatrix)
            label = f"llama.cpp {type_name}" + (f" + {imatrix}" if imatrix else "")
            print(label, flush=True)
            anchors[imatrix] = (artifact_bytes(directory), llamacpp_perplexity(directory, args.windows, args.threads))
            check_against_llama_perplexity(directory, args.windows, args.threads)
            print(f"  {anchors[imatrix][0] / 1e6:.2f} MB, perplexity {anchors[imatrix][1]:.3f}", flush=True)
        their_bytes = anchors["llama-imatrix"][0]
        best = None
        for base in (type_name,) + (CHEAPER.get(type_name, ()) if args.search else ()):
            base_dir = llama_quantize(base, "factorport")
            budget = int(args.size_limit * their_bytes - artifact_bytes(base_dir) - ADAPTER_OVERHEAD)
            if budget <= 0:
                continue
            ours = work / f"factorport-{type_name}-on-{base}"
            info = factorport_artifact(reference, tokenizer, stats, base, budget, ours, args.targets, args.multiple)
            ours_bytes = artifact_bytes(ours)
            identical = same_tensors(ours / MODEL_FILE, base_dir / MODEL_FILE)
            print(f"  model.gguf holds exactly llama-quantize --imatrix {IMATRIX_FILE}'s {base} tensors: {identical}", flush=True)
            base_ppl = llamacpp_perplexity(ours, args.windows, args.threads, adapter=False)
            ours_ppl = llamacpp_perplexity(ours, args.windows, args.threads)
            print(f"  {type_name}: base {base}: {ours_bytes / 1e6:.2f} MB ({ours_bytes / their_bytes:.3f}x) perplexity {ours_ppl:.3f} (base alone {base_ppl:.3f})", flush=True)
            if ours_bytes <= args.size_limit * their_bytes and (best is None or ours_ppl < best[0]):
                best = (ours_ppl, ours_bytes, ours, info["recipe"], base_ppl)
        rows.append((type_name, anchors, tensor_types(work / f"llamacpp-{type_name}-llama-imatrix" / MODEL_FILE), best))
        if best is not None and not speed_done:
            speed_done = report_decode_speed(type_name, best[2], args)

    print(f"\nSmolLM2-135M, perplexity in llama.cpp on {args.windows} x 512 tokens of wiki.test.raw; calibration {args.calib_samples}x{args.calib_seq_len} "
          f"of wiki.valid.tokens for both importance matrices; factorport at most {args.size_limit:g}x the imatrix file's bytes")
    print("| type | llama.cpp MB | ppl | + llama-imatrix ppl | tensor types held | factorport MB (x) | factorport ppl | its base alone | recipe | beats imatrix |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for type_name, anchors, held, best in rows:
        (plain_bytes, plain_ppl), (their_bytes, their_ppl) = anchors[None], anchors["llama-imatrix"]
        if best is None:
            print(f"| {type_name} | {plain_bytes / 1e6:.2f} | {plain_ppl:.3f} | {their_ppl:.3f} | {held} | – | – | – | – | no |")
            continue
        ppl, ours_bytes, _, recipe, base_ppl = best
        wins = ppl < their_ppl and ours_bytes <= args.size_limit * their_bytes
        print(f"| {type_name} | {plain_bytes / 1e6:.2f} | {plain_ppl:.3f} | {their_ppl:.3f} | {held} | {ours_bytes / 1e6:.2f} ({ours_bytes / their_bytes:.3f}) | "
              f"{ppl:.3f} | {base_ppl:.3f} | {recipe} | {'yes' if wins else 'no'} |")

    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
