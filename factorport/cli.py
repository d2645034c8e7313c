"""The `factorport` command: argument parsing and printing over the Python API
(factorport/api.py), one `_<command>` function and one parser block each.
Every user error is one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import FactorportError


def _formats(value: str) -> list[str]:
    return [f.strip() for f in value.split(",") if f.strip()]


def _export_options(args) -> dict[str, dict]:
    """Per-format options from the flags (only those the user set)."""
    options: dict[str, dict] = {"onnx": {}, "gguf": {}}
    if args.densify_sparse:
        options["onnx"]["densify_sparse"] = True
    if args.onnx_attention:
        options["onnx"]["attention"] = args.onnx_attention
    if args.onnx_accuracy_level is not None:
        options["onnx"]["accuracy_level"] = args.onnx_accuracy_level
    if args.gguf_type:
        from .formats.gguf.codecs import check_type

        options["gguf"]["gguf_type"] = check_type(args.gguf_type)  # fail before any work
    return options


def _step_options(args) -> dict[str, dict]:
    """Recipe-step fields from convert's flags: the llama.cpp type of a
    `llamacpp` step, and the byte budget of a `correct` step (its adapter)."""
    options: dict[str, dict] = {}
    if args.adapter_budget is not None:
        if args.adapter_budget <= 0:
            raise FactorportError(f"--adapter-budget must be a positive number of MB, got {args.adapter_budget}")
        options["correct"] = {"ranks": {"budget": {"added_bytes": args.adapter_budget * 1e6}}}
    llamacpp = {}
    if args.gguf_type:  # used by a recipe's llamacpp step, if it has one
        llamacpp["type"] = args.gguf_type
    if args.size_of:
        llamacpp.update(size_of=args.size_of, bytes=None)  # each replaces the recipe's target
    if args.bytes is not None:
        if args.bytes <= 0:
            raise FactorportError(f"--bytes must be a positive number of bytes, got {args.bytes}")
        llamacpp.update(bytes=args.bytes, size_of=None)
    if llamacpp:
        options["llamacpp"] = llamacpp
    return options


def _verify(args) -> bool:
    """Whether to check manifest.json; says so on stderr when not."""
    if args.no_verify:
        print("factorport: not checking manifest.json (--no-verify)", file=sys.stderr)
    return not args.no_verify


def _backend_options(args) -> dict:
    options = {"verify": _verify(args), "timeout": args.timeout}
    if args.threads:
        options["threads"] = args.threads
    if args.accuracy_level is not None:
        if args.backend != "onnxruntime":
            raise FactorportError("--accuracy-level applies to --backend onnxruntime only")
        options["accuracy_level"] = args.accuracy_level
    return options


def _convert(args) -> None:
    from .api import convert

    out = convert(
        args.model,
        recipe=args.recipe,
        output=args.output,
        calib=args.calib,
        samples=args.calib_samples,
        seq_len=args.calib_seq_len,
        force=args.force,
        progress=not args.quiet,
        formats=_formats(args.format),
        export_options=_export_options(args),
        step_options=_step_options(args),
        mode=args.calib_mode,
        device=args.device,
        resume=args.resume,
    )
    print(f"factorport: wrote {out} (inspect it with 'factorport inspect {out}')")


def _export(args) -> None:
    from .api import export

    out = export(
        args.path, _formats(args.format), force=args.force, progress=not args.quiet,
        export_options=_export_options(args), verify=_verify(args),
    )
    print(f"factorport: wrote {', '.join(str(out / f) for f in _formats(args.format))}")


def _generate(args) -> None:
    from .api import generate

    print(generate(args.path, args.prompt, args.new_tokens, backend=args.backend, chat=args.chat, **_backend_options(args)))


def _eval(args) -> None:
    from .api import evaluate_report

    result = evaluate_report(
        args.model, args.text, args.windows, backend=args.backend, reference=not args.no_reference,
        progress=not args.quiet, protocol=args.protocol, **_backend_options(args),
    )
    print(f"perplexity ({result['model']}, {args.backend}): {result['perplexity']:.4f}")
    if "dense_perplexity" in result:
        print(f"perplexity (dense {result['dense_name']}): {result['dense_perplexity']:.4f}  ratio {result['ratio']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def _thresholds(items: list[str] | None) -> dict[str, float]:
    thresholds = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            thresholds[key] = float(value)
        except ValueError:
            raise FactorportError(f"--threshold {item!r}: expected METRIC=NUMBER or BACKEND:METRIC=NUMBER") from None
    return thresholds


def _validate(args) -> int:
    from .api import validate

    result = validate(
        args.path,
        backends=_formats(args.backend) if args.backend else None,
        text=args.text,
        windows=args.windows,
        against=args.against,
        thresholds=_thresholds(args.threshold),
        threads=args.threads,
        progress=not args.quiet,
        verify=_verify(args),
        timeout=args.timeout,
        json_path=args.json,
        junit_path=args.junit,
    )
    for label, entry in result["backends"].items():
        print(f"{label}: perplexity {entry.get('perplexity', float('nan')):.4f}  top-1 {entry.get('top1_agreement', float('nan')):.4f}  "
              f"mean KL {entry.get('mean_kl', float('nan')):.2e}  {'passed' if entry['passed'] else 'FAILED'}")
    for failure in result["failures"]:
        print(f"factorport: validation failed: {failure}", file=sys.stderr)
    report = Path(args.path) / "report" / "validation.md"
    print(f"factorport: validation {'passed' if result['passed'] else 'FAILED'}; report in {report}")
    return 0 if result["passed"] else 1


def _bench(args) -> int:
    from .api import bench
    from .validators.report import bench_markdown

    result = bench(
        args.path,
        backends=_formats(args.backend) if args.backend else None,
        anchors=not args.no_anchors,
        against=args.against,
        text=args.text,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        threads=args.threads,
        progress=not args.quiet,
        verify=_verify(args),
        timeout=args.timeout,
        json_path=args.json,
    )
    print(bench_markdown(result))
    for run in result["runs"]:
        if "error" in run:
            print(f"factorport: bench failed: {run['label']} ({run['backend']}): {run['error']}", file=sys.stderr)
    if result["machine"]["loaded"]:
        print(f"factorport: bench ran on a loaded machine ({'; '.join(result['machine']['loaded_reasons'])})", file=sys.stderr)
    return 0 if result["passed"] else 1


def _demo(args) -> int:
    from .demo import run_demo

    result = run_demo(args.output, force=args.force, repeats=args.repeats, progress=not args.quiet)
    return 0 if result["validation"]["passed"] and result["bench"]["passed"] else 1


def _inspect(args) -> None:
    from .formats.summary import format_table, inspect_artifact

    summary = inspect_artifact(args.path)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_table(summary))


def _doctor(args) -> int:
    from .doctor import doctor, doctor_text

    report = doctor(smoke=not args.no_smoke, progress=not args.quiet)
    print(json.dumps(report, indent=2) if args.json else doctor_text(report))
    return 0 if report["passed"] else 1


def _add_format_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    p.add_argument(
        "--format",
        default=default,
        required=default is None,
        help="comma-separated: safetensors (always written), onnx, gguf" + (f" (default {default})" if default else ""),
    )
    p.add_argument("--densify-sparse", action="store_true", help="ONNX: write block-sparse bases as dense weights")
    p.add_argument(
        "--onnx-attention",
        choices=("fused", "traced"),
        help="ONNX: fused = one GroupQueryAttention per layer (default where the model allows), traced = Optimum's trace",
    )
    p.add_argument(
        "--onnx-accuracy-level",
        type=int,
        choices=(0, 1, 2, 3, 4),
        help="ONNX: MatMulNBits accuracy_level written in the graph (0, default: float32 compute, exact; "
        "4: int8 activations, faster, as onnxruntime-genai's builder writes); onnxruntime-genai runs what is written",
    )
    p.add_argument("--gguf-type", help="GGUF: ggml type for tensors without a lossless mapping (e.g. Q8_0, Q4_K_M)")


def _add_verify_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-verify", action="store_true", help="do not check the files' sha256 against manifest.json first")


CALL_TIMEOUT_HELP = "seconds one call of a native runtime may take before its process is killed (default $FACTORPORT_BACKEND_TIMEOUT or 900)"


def _add_timeout_flag(p: argparse.ArgumentParser, help: str = CALL_TIMEOUT_HELP) -> None:
    p.add_argument("--timeout", type=float, metavar="SECONDS", help=help)


def _add_backend_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="torch", help="torch (default), onnxruntime, onnxruntime-genai or llama.cpp")
    _add_verify_flag(p)
    _add_timeout_flag(p)
    p.add_argument("--threads", type=int, help="runtime threads (default: the runtime's own)")
    p.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), help="onnxruntime MatMulNBits: 0 fp32 compute, 4 int8 activations")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="factorport", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="compress a model with a recipe and write the artifact")
    p.add_argument("model", nargs="?", help="HF directory, .gguf file, hub id or embedded model (smollm2-135m-instruct, the default; gemma3-270m)")
    p.add_argument("--recipe", "-r", required=True, help="preset name or recipe YAML path")
    p.add_argument("--output", "-o", required=True, help="output directory")
    p.add_argument("--calib", help="calibration text file or datasets id (default: WikiText-2 validation)")
    p.add_argument("--calib-samples", type=int, help="calibration sequences (default 128)")
    p.add_argument("--calib-seq-len", type=int, help="tokens per calibration sequence (default 512)")
    p.add_argument(
        "--calib-mode", choices=("sequential", "parallel", "asymmetric"),
        help="sequential (default): each layer calibrated on what the compressed layers before it produce; "
        "parallel: every layer on the original model's activations; asymmetric: sequential inputs, "
        "each linear aiming at the original model's outputs",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="where calibration forward passes run (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted conversion from its last finished layer")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--adapter-budget", type=float, metavar="MB", help="bytes (MB) the recipe's correct step may add (the GGUF adapter)")
    bytes_target = p.add_mutually_exclusive_group()
    bytes_target.add_argument("--size-of", metavar="TYPE", help="llamacpp step: per-tensor llama.cpp types and corrections within "
                              "the bytes of llama.cpp's quantization to TYPE (recipe llamacpp-equal-bytes)")
    bytes_target.add_argument("--bytes", type=float, metavar="N", help="llamacpp step: the same within N bytes of tensors")
    _add_format_flags(p, default="safetensors")
    p.set_defaults(run=_convert)

    p = sub.add_parser("export", help="add ONNX / GGUF artifacts to an existing factorport output")
    p.add_argument("path", help="factorport output directory (holds safetensors/)")
    p.add_argument("--force", action="store_true", help="overwrite an existing exported artifact")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _add_verify_flag(p)
    _add_format_flags(p, default=None)
    p.set_defaults(run=_export)

    p = sub.add_parser("eval", help="perplexity (context 512, stride 512) in torch or a backend runtime")
    p.add_argument("model", nargs="?", help="factorport artifact, HF directory, .gguf or hub id")
    _add_backend_flags(p)
    p.add_argument("--text", help="evaluation text (default: WikiText-2 test)")
    p.add_argument("--windows", type=int, default=40, help="windows of 512 tokens (default 40)")
    p.add_argument(
        "--protocol", choices=("windows", "llama-perplexity"), default="windows",
        help="windows (default): every token of each window scored; llama-perplexity: as llama-perplexity -c 512 --chunks WINDOWS "
        "scores, the second half of each chunk (its figure to compare with)",
    )
    p.add_argument("--no-reference", action="store_true", help="skip the dense model's perplexity")
    p.add_argument("--json", help="write the result as JSON to this file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_eval)

    p = sub.add_parser("generate", help="greedy continuation of a prompt by a factorport output")
    p.add_argument("path", help="factorport output directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_backend_flags(p)
    p.set_defaults(run=_generate)

    p = sub.add_parser("validate", help="check every exported artifact against the torch reference")
    p.add_argument("path", help="factorport output directory")
    p.add_argument("--backend", help="comma-separated: onnxruntime, onnxruntime-int8, onnxruntime-genai, llama.cpp (default: every exported artifact)")
    p.add_argument("--text", help="evaluation text (default: WikiText-2 test)")
    p.add_argument("--windows", type=int, default=8, help="windows of 512 tokens (default 8)")
    p.add_argument("--against", help="the original model for the quality table (default: the manifest's source)")
    p.add_argument("--threshold", action="append", metavar="[BACKEND:]METRIC=LIMIT", help="override a threshold (repeatable)")
    p.add_argument("--threads", type=int, help="runtime threads")
    _add_verify_flag(p)
    _add_timeout_flag(p)
    p.add_argument("--json", help="also write the result JSON here")
    p.add_argument("--junit", help="write JUnit XML here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_validate)

    p = sub.add_parser("bench", help="load, prefill, decode speed and memory of every artifact, next to anchors")
    p.add_argument("path", help="factorport output directory")
    p.add_argument("--backend", help="comma-separated: torch, onnxruntime, onnxruntime-int8, onnxruntime-genai, llama.cpp (default: every exported artifact)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, help="runtime threads (default: the runtime's own)")
    p.add_argument("--text", help="prompt and perplexity text (default: WikiText-2 test)")
    p.add_argument("--against", help="the original model the anchors are made from (default: the manifest's source)")
    p.add_argument("--no-anchors", action="store_true", help="skip Optimum fp32 and llama.cpp's own quantization")
    _add_verify_flag(p)
    _add_timeout_flag(p, "seconds one artifact's worker process may take before it is killed (default: no limit)")
    p.add_argument("--json", help="also write the result JSON here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_bench)

    p = sub.add_parser("demo", help="convert the embedded model to every format, validate and bench it")
    p.add_argument("--output", default="demo-out", help="output directory (default demo-out)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.add_argument("--repeats", type=int, default=3, help="bench repeats (default 3)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_demo)

    p = sub.add_parser("inspect", help="per-layer table of a factorport artifact")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("doctor", help="runtime versions, CPU features, what each native library uses, a smoke test per backend")
    p.add_argument("--no-smoke", action="store_true", help="skip the smoke tests (no model is exported or run)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
    except FactorportError as exc:
        print(f"factorport: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("factorport: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
