"""`factorport bench`: load time, prefill latency, decode speed and peak
memory of every artifact on its runtime, each in a fresh process so that
memory figures do not mix, next to the anchors a user would otherwise pick
and to each decode figure's memory-bandwidth bound.

The worker (`python -m factorport.validators.bench ...`) opens one artifact,
runs `repeats` x (prefill `prompt_tokens`, decode `new_tokens` greedily) and
prints one JSON line; the parent collects medians and ranges, each figure's
ratio to the anchors of the same backend measured in the same run (ratios
survive a busy machine better than absolute figures), and whether the machine
was busy: load averages and runnable tasks before and after, and the spread
of the bandwidth passes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..errors import FactorportError
from .bandwidth import bandwidth_passes, bytes_read_per_token, spread, weight_file_bytes

SCHEMA_VERSION = "factorport.bench/1"

# A machine is "loaded" when, outside this benchmark, more tasks are runnable
# than this share of its cores (each competes with the runtime's threads),
# when the 1-minute load average before the run exceeds this share of the
# cores (it lags: it also counts work that just ended, ours included), or when
# the bandwidth passes spread (1 - median / best) by more than this.
RUNNABLE_FRACTION = 0.25
LOADAVG_FRACTION = 0.75
SPREAD_LIMIT = 0.2


@dataclass
class BenchConfig:
    text: Path
    prompt_tokens: int = 512
    new_tokens: int = 64
    repeats: int = 5
    perplexity_windows: int = 4  # quality of each target, for the size/quality picture
    threads: int | None = None
    progress: bool = True
    bandwidth_repeats: int = 15
    timeout: float | None = None  # seconds one worker may take; None: no limit


@dataclass
class Target:
    """One thing to time: `artifact` is the directory `backend` opens."""

    label: str
    backend: str
    artifact: Path
    options: dict = field(default_factory=dict)
    anchor: bool = False
    note: str = ""


def peak_rss_bytes() -> int:
    """This process's resident high-water mark. VmHWM, not getrusage's
    ru_maxrss, which a child inherits from its parent across exec on Linux."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(target: Target, config: BenchConfig) -> dict:
    from ..errors import exit_description

    command = [
        sys.executable, "-m", "factorport.validators.bench",
        "--backend", target.backend, "--artifact", str(target.artifact),
        "--options", json.dumps({**target.options, **({"threads": config.threads} if config.threads else {})}),
        "--text", str(config.text), "--prompt-tokens", str(config.prompt_tokens),
        "--new-tokens", str(config.new_tokens), "--repeats", str(config.repeats),
        "--perplexity-windows", str(config.perplexity_windows),
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=config.timeout)
    except subprocess.TimeoutExpired:  # run() has killed the worker
        return {"error": f"no answer in {config.timeout:g} s; killed"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"worker {exit_description(done.returncode)}: {tail}"}
    return json.loads(lines[-1])


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def runnable_others(samples: int = 10, interval: float = 0.02) -> float | None:
    """Median number of runnable tasks besides the one reading, from the
    fourth field of /proc/loadavg: an instant count, where the load averages
    lag by a minute. None where there is no /proc."""
    path = Path("/proc/loadavg")
    if not path.is_file():
        return None
    counts = []
    for _ in range(samples):
        counts.append(int(path.read_text().split()[3].split("/")[0]) - 1)
        time.sleep(interval)
    return float(statistics.median(counts))


def load_probe() -> dict:
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "runnable_others": runnable_others()}


def machine_load(before: dict, after: dict, bandwidth_spread: float, cores: int) -> list[str]:
    """Why figures taken between these two probes are not the machine's own
    (empty when nothing says the machine was busy)."""
    reasons = []
    for when, probe in (("before", before), ("after", after)):
        others = probe.get("runnable_others")
        if others is not None and others > RUNNABLE_FRACTION * cores:
            reasons.append(f"{others:g} other tasks runnable {when} the run on {cores} cores")
    if before["loadavg"][0] > LOADAVG_FRACTION * cores:
        reasons.append(f"1-minute load average {before['loadavg'][0]:g} before the run on {cores} cores")
    if bandwidth_spread > SPREAD_LIMIT:
        reasons.append(f"bandwidth passes spread {bandwidth_spread:.0%} (median vs best)")
    return reasons


def anchor_ratios(runs: list[dict]) -> None:
    """Each artifact's prefill seconds and decode tokens/s as a ratio to each
    anchor of the same backend measured in the same run (decode > 1 and
    prefill < 1: faster than the anchor)."""
    anchors = [r for r in runs if r["anchor"] and "error" not in r]
    for run in runs:
        if run["anchor"] or "error" in run:
            continue
        run["vs_anchors"] = {
            anchor["label"]: {
                "decode": run["decode_tokens_per_s"]["median"] / anchor["decode_tokens_per_s"]["median"],
                "prefill": run["prefill_seconds"]["median"] / anchor["prefill_seconds"]["median"],
            }
            for anchor in anchors
            if anchor["backend"] == run["backend"]
        }


def bench(targets: list[Target], config: BenchConfig) -> dict:
    cores = usable_cores()
    before = load_probe()
    passes = bandwidth_passes(config.bandwidth_repeats, threads=config.threads)
    bandwidth = max(passes)
    result = {
        "schema": SCHEMA_VERSION,
        "machine": {
            "bandwidth_bytes_per_s": bandwidth,
            "bandwidth_passes_bytes_per_s": passes,
            "bandwidth_spread": spread(passes),
            "threads": config.threads,
            "cores": cores,
            "load_before": before,
        },
        "settings": {"prompt_tokens": config.prompt_tokens, "new_tokens": config.new_tokens, "repeats": config.repeats, "text": str(config.text)},
        "runs": [],
    }
    for target in tqdm(targets, desc="bench", unit="artifact", disable=not config.progress):
        if config.progress:
            tqdm.write(f"bench: {target.label} ({target.backend})")
        started = time.perf_counter()
        measured = run_worker(target, config)
        read = bytes_read_per_token(target.artifact)
        run = {
            "label": target.label,
            "backend": target.backend,
            "artifact": str(target.artifact),
            "anchor": target.anchor,
            "note": target.note,
            "options": target.options,
            "disk_bytes": weight_file_bytes(target.artifact),
            "bytes_read_per_token": read,
            "bound_tokens_per_s": bandwidth / read,
            "wall_seconds": time.perf_counter() - started,
            **measured,
        }
        if "decode_tokens_per_s" in run:
            run["fraction_of_bound"] = run["decode_tokens_per_s"]["median"] / run["bound_tokens_per_s"]
        result["runs"].append(run)
    anchor_ratios(result["runs"])
    machine = result["machine"]
    machine["load_after"] = load_probe()
    machine["loaded_reasons"] = machine_load(before, machine["load_after"], machine["bandwidth_spread"], cores)
    machine["loaded"] = bool(machine["loaded_reasons"])
    result["passed"] = all("error" not in run for run in result["runs"])
    return result


def targets_for(output: Path, backends: list[str] | None, anchors: bool, model_name: str | None, progress: bool = True) -> list[Target]:
    """Every artifact of a factorport output on its backend, then the anchors:
    Optimum's fp32 ONNX export of the original model, and llama.cpp's own
    quantization of it at the type nearest in size to the GGUF artifact,
    without and (when the output kept its calibration text) with llama-imatrix."""
    from .backends import BACKENDS, available_backends, resolve

    # torch is the reference, not a deployment runtime: timed only when asked for.
    names = backends or [b for b in available_backends(output) if b != "torch"]
    targets = []
    for name in names:
        backend, options = resolve(name)
        artifact = output / BACKENDS[backend].artifact
        if not artifact.is_dir():
            raise FactorportError(f"{output} has no {BACKENDS[backend].artifact}/ artifact for backend {name}")
        targets.append(Target(output.name if name == backend else f"{output.name} ({name})", backend, artifact, options))
    if not anchors:
        return targets
    from . import anchors as anchor_builds

    if "onnxruntime" in names or not backends:
        targets.append(Target("optimum fp32", "onnxruntime", anchor_builds.optimum_fp32(model_name, progress), anchor=True))
    if "llama.cpp" in names or not backends:
        size = weight_file_bytes(output / ("gguf" if (output / "gguf").is_dir() else "safetensors"))
        candidates = {t: anchor_builds.llamacpp_quantized(model_name, t, progress) for t in anchor_builds.LLAMACPP_TYPES}
        nearest = min(candidates, key=lambda t: abs(weight_file_bytes(candidates[t]) - size))
        targets.append(Target(f"llama.cpp {nearest}", "llama.cpp", candidates[nearest], anchor=True, note=f"llama_model_quantize {nearest}, nearest in size"))
        calibration = calibration_text(output)
        if calibration is not None:
            text, chunks, chunk_size = calibration
            imatrix = anchor_builds.llamacpp_imatrix_quantized(model_name, nearest, text, chunks, chunk_size, progress)
            note = f"llama-imatrix on {chunks}x{chunk_size} tokens of {text.name} (the calibration text), llama-quantize --imatrix {nearest}"
            targets.append(Target(f"llama.cpp {nearest} + imatrix", "llama.cpp", imatrix, anchor=True, note=note))
    return targets


def calibration_text(output: Path) -> tuple[Path, int, int] | None:
    """(text file, sequences, tokens each) the output was calibrated on, when
    it kept its calibration statistics and the text is a local file."""
    from ..formats import input_sums

    if not (output / input_sums.FILE).is_file():
        return None
    sums = input_sums.read(output / input_sums.FILE)
    text = Path(sums.source.rsplit(" (", 1)[0])  # "PATH (NxL tokens)", as calibration describes it
    return (text, sums.tokens // sums.seq_len, sums.seq_len) if text.is_file() else None


def _worker(argv: list[str]) -> None:
    """One artifact, one process: the numbers the parent aggregates."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--artifact", required=True)
    parser.add_argument("--options", default="{}")
    parser.add_argument("--text", required=True)
    parser.add_argument("--prompt-tokens", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--repeats", type=int, required=True)
    parser.add_argument("--perplexity-windows", type=int, default=0)
    args = parser.parse_args(argv)

    from .backends import backend_class

    baseline = peak_rss_bytes()  # interpreter + libraries, before the model
    runtime = backend_class(args.backend).open(Path(args.artifact), **json.loads(args.options))
    text = Path(args.text).read_text(encoding="utf-8", errors="replace")[: args.prompt_tokens * 16]
    prompt = runtime.tokenize(text)[: args.prompt_tokens]
    if len(prompt) < args.prompt_tokens:
        raise FactorportError(f"{args.text} holds fewer than {args.prompt_tokens} tokens")
    runtime.generate(prompt[:16], 4)  # warm-up: first-call allocations, thread pools
    prefill, decode = [], []
    for _ in range(args.repeats):
        generation = runtime.generate(prompt, args.new_tokens)
        prefill.append(generation.prefill_seconds)
        decode.append(generation.decode_tokens_per_second)
    quality = None
    if args.perplexity_windows:
        from .perplexity import perplexity, text_windows

        quality = perplexity(runtime.logits, text_windows(runtime, args.text, args.perplexity_windows), progress=False)
    print(json.dumps({
        "perplexity": quality,
        "load_seconds": runtime.load_seconds,
        "prefill_seconds": summarize(prefill),
        "decode_tokens_per_s": summarize(decode),
        "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": baseline,
        "sample": runtime.detokenize(generation.tokens[:24]),
    }))


if __name__ == "__main__":
    try:
        _worker(sys.argv[1:])
    except FactorportError as exc:
        print(f"factorport: error: {exc}", file=sys.stderr)
        sys.exit(2)
