"""bench knows when the machine is busy, and puts every figure next to its
ratio to the anchors of the same run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import factorport
from factorport.validators.bench import RUNNABLE_FRACTION, SPREAD_LIMIT, anchor_ratios, machine_load, usable_cores
from factorport.validators.report import bench_markdown
from tiny_outputs import TEXT, tiny_output


def _probe(loadavg: float, others: float | None) -> dict:
    return {"loadavg": [loadavg, loadavg, loadavg], "runnable_others": others}


def test_machine_load_names_each_reason():
    quiet = _probe(0.1, 0)
    assert machine_load(quiet, quiet, 0.02, cores=8) == []
    busy = _probe(0.1, RUNNABLE_FRACTION * 8 + 1)
    assert machine_load(busy, quiet, 0.02, cores=8) == ["3 other tasks runnable before the run on 8 cores"]
    assert machine_load(_probe(7.5, 0), quiet, 0.02, cores=8) == ["1-minute load average 7.5 before the run on 8 cores"]
    assert machine_load(quiet, quiet, SPREAD_LIMIT + 0.1, cores=8) == ["bandwidth passes spread 30% (median vs best)"]
    assert machine_load(_probe(0.1, None), _probe(0.1, None), 0.0, cores=8) == []  # no /proc: no claim


def _run(label: str, backend: str, anchor: bool, prefill: float, decode: float) -> dict:
    return {
        "label": label, "backend": backend, "anchor": anchor, "note": "", "disk_bytes": 1e6, "bytes_read_per_token": 1e6,
        "load_seconds": 0.1, "prefill_seconds": {"median": prefill, "min": prefill, "max": prefill},
        "decode_tokens_per_s": {"median": decode, "min": decode, "max": decode}, "bound_tokens_per_s": 100.0,
        "fraction_of_bound": decode / 100, "peak_rss_bytes": 2e8, "baseline_rss_bytes": 1e8,
    }


def test_every_figure_carries_its_ratio_to_the_anchors_of_its_backend():
    runs = [
        _run("ours", "llama.cpp", False, prefill=0.2, decode=60.0),
        _run("ours (onnx)", "onnxruntime", False, prefill=0.3, decode=30.0),
        _run("llama.cpp Q4_0", "llama.cpp", True, prefill=0.4, decode=40.0),
        _run("optimum fp32", "onnxruntime", True, prefill=0.6, decode=10.0),
    ]
    anchor_ratios(runs)
    assert runs[0]["vs_anchors"] == {"llama.cpp Q4_0": {"decode": 1.5, "prefill": 0.5}}
    assert runs[1]["vs_anchors"] == {"optimum fp32": {"decode": 3.0, "prefill": 0.5}}
    assert "vs_anchors" not in runs[2]
    machine = {"bandwidth_bytes_per_s": 1e10, "cores": 2, "bandwidth_spread": 0.01, "loaded": False, "loaded_reasons": [],
               "load_before": _probe(0.1, 0), "load_after": _probe(0.2, 0)}
    markdown = bench_markdown({"machine": machine, "settings": {"prompt_tokens": 8, "new_tokens": 2, "repeats": 1}, "runs": runs})
    assert "60.0 (60.0–60.0); 1.50x llama.cpp Q4_0" in markdown and "0.200 (0.200–0.200); 0.50x llama.cpp Q4_0" in markdown
    assert "30.0 (30.0–30.0); 3.00x optimum fp32" in markdown
    assert "loaded machine" not in markdown


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return tiny_output(tmp_path_factory.mktemp("bench"), native=False)


@pytest.mark.skipif(not Path("/proc/loadavg").is_file(), reason="runnable tasks are read from /proc/loadavg")
def test_a_busy_machine_is_flagged_in_bench_md(output):
    # one busy loop per core: at any instant that many other tasks are runnable
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable_cores())]
    try:
        time.sleep(1.0)  # all started and spinning
        result = factorport.bench(
            output, backends=["torch"], anchors=False, text=TEXT, prompt_tokens=16, new_tokens=4, repeats=1,
            progress=False, perplexity_windows=0, bandwidth_repeats=3,
        )
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    assert result["passed"], result["runs"]
    machine = result["machine"]
    assert machine["loaded"] and machine["load_before"]["runnable_others"] >= len(loops)
    assert len(machine["bandwidth_passes_bytes_per_s"]) == 3 and len(machine["load_before"]["loadavg"]) == 3
    markdown = (output / "report" / "bench.md").read_text()
    assert "**Taken on a loaded machine**" in markdown and "other tasks runnable before the run" in markdown
