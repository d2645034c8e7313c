"""What the portable llama.cpp build costs: prefill and decode of the same
GGUF with the installed library (x86-64-v3, no AVX-512/AMX, ggml's own
thread pool; scripts/install-llama-cpp-python.sh) and with another build of
the same llama-cpp-python version, e.g. one compiled with native flags:

    CMAKE_ARGS= pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python \\
        llama-cpp-python==0.3.36 -w /tmp/native && (cd /tmp/native && unzip -q *.whl)
    python benchmarks/llama_cpp_build.py --other-lib /tmp/native/llama_cpp/lib

Each measurement is a fresh process (LLAMA_CPP_LIB_PATH selects the library);
the two builds alternate, and the medians and their ratio come from one run,
next to the memory-bandwidth bound of decode.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time
import llama_cpp
path, threads, prompt_tokens, new_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=path, n_ctx=prompt_tokens + new_tokens + 8, n_batch=512, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
prompt = [(7 * i) % 1000 + 100 for i in range(prompt_tokens)]
llm.eval(prompt[:8]); llm.reset()  # warm-up
started = time.perf_counter(); llm.eval(prompt); prefill = time.perf_counter() - started
token, started = 100, time.perf_counter()
for _ in range(new_tokens):
    llm.eval([token])
decode = new_tokens / (time.perf_counter() - started)
info = llama_cpp.llama_print_system_info().decode().strip()
print(json.dumps({"prefill_s": prefill, "decode_tok_s": decode, "system_info": info}))
"""


def measure(model: Path, lib: str | None, args) -> dict:
    env = dict(os.environ)
    env.pop("LLAMA_CPP_LIB_PATH", None)
    if lib:
        env["LLAMA_CPP_LIB_PATH"] = lib
    command = [sys.executable, "-c", WORKER, str(model), str(args.threads), str(args.prompt_tokens), str(args.new_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other-lib", required=True, help="llama_cpp/lib directory of the build to compare with")
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M Q4_1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    from factorport.loading import embedded_gguf
    from factorport.validators.bandwidth import measure_bandwidth

    model = Path(args.model) if args.model else embedded_gguf()
    bandwidth = measure_bandwidth(threads=args.threads)
    bound = bandwidth / model.stat().st_size  # every weight read once per token (an upper bound on bytes)
    builds = {"installed (portable)": None, "other": args.other_lib}
    runs: dict[str, list[dict]] = {name: [] for name in builds}
    for i in range(args.repeats):
        for name, lib in builds.items():
            runs[name].append(measure(model, lib, args))
            print(f"repeat {i + 1}/{args.repeats} {name}: decode {runs[name][-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr)
    print(f"model {model.name} ({model.stat().st_size / 1e6:.1f} MB), {args.threads} threads, bandwidth {bandwidth / 1e9:.1f} GB/s, "
          f"decode bound {bound:.0f} tok/s; median of {args.repeats}, builds alternating")
    print("| build | llama.cpp reports | prefill s | decode tok/s | of bound |")
    print("|---|---|---|---|---|")
    medians = {}
    for name, results in runs.items():
        prefill = statistics.median(r["prefill_s"] for r in results)
        decode = statistics.median(r["decode_tok_s"] for r in results)
        medians[name] = (prefill, decode)
        features = results[0]["system_info"].replace("CPU : ", "").replace(" = 1", "").replace(" |", "")
        print(f"| {name} | {features} | {prefill:.3f} | {decode:.1f} | {decode / bound:.0%} |")
    (p0, d0), (p1, d1) = medians.values()
    print(f"portable / other: prefill time {p0 / p1:.2f}x, decode speed {d0 / d1:.2f}x")


if __name__ == "__main__":
    main()
