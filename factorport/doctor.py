"""`factorport doctor`: what this host runs and whether each backend works on it.

Prints the versions of the runtimes, the CPU's feature flags, the
instruction sets each native library was built for (llama.cpp) or picks at
run time (torch, onnxruntime), and the result of a smoke test per backend:
a tiny random Llama (int4 with a shared low-rank correction), exported to every format and scored by
every backend (native ones in child processes), compared with torch.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import FactorportError, exit_description
from .formats.manifest import package_versions
from . import hostcpu
from .llamacpp import tools

SMOKE_TOP1 = 0.9  # llama.cpp rounds activations to 8 bits: not every argmax survives on random weights


def llama_cpp_build() -> dict:
    """llama.cpp's own report of the CPU features it was compiled with, read
    in a child process: loading the library on a CPU it does not fit may
    crash, and that must not take doctor down."""
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {"error": f"{exit_description(done.returncode)}: {lines[-1] if lines else 'no output'}"}
    features = {}
    for item in done.stdout.replace("\n", "|").split("|"):
        key, sep, value = item.rpartition("=")
        if sep and value.strip() in ("0", "1"):
            features[key.strip().split(":")[-1].strip()] = value.strip() == "1"
    return {"compiled_with": sorted(k for k, on in features.items() if on), "features": features}


def host_report() -> dict:
    import torch

    flags = hostcpu.cpu_flags()
    report = {
        "versions": package_versions(),
        "cpu": {
            "model": hostcpu.cpu_model(),
            "flags": None if flags is None else {f: f in flags for f in hostcpu.REPORTED_FLAGS},
        },
        "torch": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cuda": torch.cuda.is_available()},
    }
    try:
        import onnxruntime

        report["onnxruntime"] = {"providers": onnxruntime.get_available_providers()}
    except ImportError as exc:  # pragma: no cover - a dependency
        report["onnxruntime"] = {"error": str(exc)}
    llama = {"libraries": [str(p) for p in hostcpu.llama_cpp_libraries()], "needs": list(hostcpu.LLAMA_CPP_X86_FEATURES)}
    llama["missing_on_this_cpu"] = hostcpu.missing_llama_cpp_features()
    llama.update(llama_cpp_build() if not llama["missing_on_this_cpu"] else {"error": "not loaded: the CPU lacks what it needs"})
    report["llama.cpp"] = llama
    report["llama.cpp tools"] = llama_cpp_tools() if not llama["missing_on_this_cpu"] else {"error": "not run: the CPU lacks what they need"}
    return report


def llama_cpp_tools() -> dict:
    """Where llama.cpp's own programs are, what they were built from and the version they report."""
    found = {}
    for name in tools.TOOLS:
        try:
            found[name] = str(tools.tool(name))
        except FactorportError:
            found[name] = None
    report = {"paths": found, "build": tools.build_info()}
    if not all(found.values()):
        report["error"] = f"not built: {', '.join(n for n, p in found.items() if p is None)} (run `make .venv/.installed`)"
        return report
    try:
        report["version"] = tools.version()
    except FactorportError as exc:
        report["error"] = str(exc)
    return report


def smoke_tests(progress: bool = True) -> dict[str, dict]:
    """{backend: {"passed", "detail"}} for torch, onnxruntime and llama.cpp."""
    import torch

    from .tiny import build_output
    from .validators.backends import open_backend

    results = {}
    with tempfile.TemporaryDirectory(prefix="factorport-doctor-") as tmp:
        out = Path(tmp)
        if progress:
            print("doctor: exporting a tiny model to every format", file=sys.stderr)
        model = build_output(out)
        ids = torch.arange(1, 33) % 128
        with torch.no_grad():
            expected = model(ids.reshape(1, -1)).logits[0]
        for backend in ("torch", "onnxruntime", "llama.cpp"):
            if progress:
                print(f"doctor: smoke test of {backend}", file=sys.stderr)
            try:
                runtime = open_backend(backend, out)
                try:
                    logits = runtime.logits(ids)
                finally:
                    getattr(runtime, "close", lambda: None)()
            except FactorportError as exc:
                results[backend] = {"passed": False, "detail": str(exc)}
                continue
            top1 = float((logits.argmax(-1) == expected.argmax(-1)).float().mean())
            rel = float((logits - expected).abs().max() / expected.abs().max())
            passed = bool(torch.isfinite(logits).all()) and top1 >= SMOKE_TOP1
            results[backend] = {"passed": passed, "detail": f"top-1 agreement with torch {top1:.0%}, max |diff| {rel:.1e} of the largest logit"}
    return results


def doctor(smoke: bool = True, progress: bool = True) -> dict:
    report = host_report()
    if smoke:
        report["smoke"] = smoke_tests(progress)
    report["passed"] = all(r["passed"] for r in report.get("smoke", {}).values()) and not any("error" in report[k] for k in ("llama.cpp", "llama.cpp tools"))
    return report


def doctor_text(report: dict) -> str:
    lines = ["versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())]
    cpu = report["cpu"]
    flags = cpu["flags"]
    shown = "unknown" if flags is None else " ".join(f if on else f"-{f}" for f, on in flags.items())
    lines.append(f"cpu: {cpu['model']}; flags: {shown}")
    lines.append(f"torch: kernels for {report['torch']['cpu_capability']} (chosen at run time); cuda {'yes' if report['torch']['cuda'] else 'no'}")
    lines.append(f"onnxruntime: {', '.join(report['onnxruntime'].get('providers', [])) or report['onnxruntime'].get('error')} (kernels chosen at run time)")
    llama = report["llama.cpp"]
    built = " ".join(llama.get("compiled_with", [])) or llama.get("error", "")
    lines.append(f"llama.cpp: built for {built}; needs {' '.join(llama['needs'])}"
                 + (f"; this CPU lacks {' '.join(llama['missing_on_this_cpu'])}" if llama["missing_on_this_cpu"] else "; fits this CPU"))
    for path in llama["libraries"]:
        lines.append(f"  {path}")
    kit = report["llama.cpp tools"]
    lines.append(f"llama.cpp tools: {kit.get('error') or kit['version']}; {kit.get('build', {}).get('source', 'build unknown')}")
    for name, path in kit.get("paths", {}).items():
        lines.append(f"  {name}: {path or 'missing'}")
    for backend, result in report.get("smoke", {}).items():
        lines.append(f"smoke test {backend}: {'passed' if result['passed'] else 'FAILED'} ({result['detail']})")
    return "\n".join(lines)

