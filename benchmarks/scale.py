"""Memory and time of the layer-by-layer conversion as the model grows.

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
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

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
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(directory)
    return total


def convert(source: Path, output: Path, args) -> dict:
    """`factorport convert` in a child process: its report, peak RSS and wall time."""
    import time

    command = [
        sys.executable, "-m", "factorport.cli", "convert", str(source), "--recipe", args.recipe, "--output", str(output),
        "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len), "--device", "cpu", "--quiet", "--force",
    ]
    started = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"convert of {source} failed (status {status})")
    report = json.loads((output / "report" / "convert.json").read_text())
    compressed = sum(p.stat().st_size for p in (output / "safetensors").glob("*.safetensors"))
    return {"report": report, "peak_rss": usage.ru_maxrss * 1024, "wall": time.perf_counter() - started, "bytes": compressed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--full", action="store_true", help="also the full 32-layer model (16 GB of bfloat16 on disk)")
    parser.add_argument("--recipe", default="w4-gptq")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--workdir", type=Path, default=Path("scale-work"))
    parser.add_argument("--keep", action="store_true", help="keep the random models and outputs")
    args = parser.parse_args()
    counts = args.layers + ([32] if args.full else [])
    rows = []
    for layers in counts:
        source, output = args.workdir / f"random-{layers}", args.workdir / f"out-{layers}"
        shutil.rmtree(source, ignore_errors=True)
        disk = write_random_model(source, layers, args)
        run = convert(source, output, args)
        per_layer = run["report"]["layer_seconds"]
        median = statistics.median(per_layer)
        rows.append({"layers": layers, "disk": disk, **run, "per_layer": per_layer, "median": median,
                     "fixed": run["report"]["seconds"] - sum(per_layer)})
        print(f"{layers} layers: peak RSS {run['peak_rss'] / 2**30:.2f} GiB, {median:.1f} s/layer", flush=True)
        if not args.keep:
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
