"""`factorport demo` (what `make demo` runs): the whole pipeline on the
embedded SmolLM2-135M — convert with a GlowQ recipe to all three formats,
validate every artifact against the torch reference, bench every runtime next
to its anchors, and say where the report is."""

from __future__ import annotations

import time
from pathlib import Path

from .api import bench, convert, validate
from .validators.report import bench_markdown

DEMO_RECIPE = "glowq-demo"
FORMATS = ("safetensors", "onnx", "gguf")
BACKENDS = ("onnxruntime", "onnxruntime-int8", "llama.cpp")


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
    validation = validate(output, backends=BACKENDS, progress=progress)

    stage("bench every runtime (each in a fresh process) next to Optimum fp32 and llama.cpp's own quantization")
    measured = bench(output, backends=BACKENDS, anchors=True, against=None, repeats=repeats, progress=progress)

    stage("done")
    if progress:
        print(bench_markdown(measured))
        print(f"validation {'PASSED' if validation['passed'] else 'FAILED'}: {report / 'validation.md'}")
        for failure in validation["failures"]:
            print(f"  {failure}")
        print(f"benchmark: {report / 'bench.md'}; plots: {report / 'plots'}")
    return {"validation": validation, "bench": measured, "seconds": time.perf_counter() - started}
