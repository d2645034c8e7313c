"""`factorport demo` (what `make demo` runs): the whole pipeline on the
embedded SmolLM2-135M — convert with a GlowQ recipe to all three formats,
validate every artifact against the torch reference, bench every runtime next
to its anchors, and say where the report is."""

from __future__ import annotations

import time
from pathlib import Path

from .api import DEFAULT_TEXT, convert
from .validators.bench import BenchConfig, bench, targets_for
from .validators.report import bench_markdown, write_bench_reports, write_validation_reports
from .validators.validate import ValidateConfig, validate

DEMO_RECIPE = "glowq-demo"
FORMATS = ("safetensors", "onnx", "gguf")


def run_demo(output: str | Path = "demo-out", force: bool = False, repeats: int = 3, progress: bool = True) -> dict:
    output = Path(output)
    started = time.perf_counter()

    def stage(text: str) -> None:
        if progress:
            print(f"\n== factorport demo [{time.perf_counter() - started:6.0f} s] {text}", flush=True)

    stage(f"convert the embedded SmolLM2-135M with {DEMO_RECIPE} to {', '.join(FORMATS)}")
    convert(None, recipe=DEMO_RECIPE, output=output, force=force, progress=progress, formats=FORMATS)
    report = output / "report"

    stage("validate every artifact against the torch reference")
    validation = validate(output, ValidateConfig(text=DEFAULT_TEXT, backends=["onnxruntime", "onnxruntime-int8", "llama.cpp"], progress=progress))
    write_validation_reports(validation, report)

    stage("bench every runtime (each in a fresh process) next to Optimum fp32 and llama.cpp's own quantization")
    config = BenchConfig(text=DEFAULT_TEXT, repeats=repeats, progress=progress)
    measured = bench(targets_for(output, ["onnxruntime", "onnxruntime-int8", "llama.cpp"], True, None, progress), config)
    write_bench_reports(measured, report)

    stage("done")
    if progress:
        print(bench_markdown(measured))
        print(f"validation {'PASSED' if validation['passed'] else 'FAILED'}: {report / 'validation.md'}")
        for failure in validation["failures"]:
            print(f"  {failure}")
        print(f"benchmark: {report / 'bench.md'}; plots: {report / 'plots'}")
    return {"validation": validation, "bench": measured, "seconds": time.perf_counter() - started}
