"""GGUF: files stock llama.cpp runs, plus factorport's own GGUF layout.

`export(model, tokenizer, out_dir)` writes into `out_dir`:

* `model.gguf`   — llama.cpp's architecture, tensor names and metadata; bases
  losslessly in Q4_0 / Q4_1 / Q8_0 (or llama.cpp's own blocks), others
  re-quantized to `gguf_type`;
* `adapter.gguf` — the low-rank terms as a GGUF LoRA adapter (when any);
* `model.factorport.gguf` — every factorport tensor as stored in the
  safetensors layout (factorized and shared tensors stay factorized), which
  factorport loads back exactly; stock llama.cpp does not run it;
* `imatrix.gguf` — with calibration statistics, llama.cpp's importance matrix
  of them, for `llama-quantize --imatrix`.

See docs/gguf.md.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from ...llamacpp.names import gguf_arch
from ..input_sums import InputSums
from . import codecs
from .imatrix import IMATRIX_FILE, write_imatrix
from .model_file import plan_model
from .native import NATIVE_FILE, load_native, write_native
from .writer import write_adapter, write_model

MODEL_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"


def export(
    model, tokenizer, out_dir: Path, *, progress: bool = True, gguf_type: str | None = None, native: bool = True,
    input_sums: InputSums | None = None,
) -> dict:
    """Write the GGUF files of a compressed model into `out_dir` (empty,
    existing); `native=False` skips model.factorport.gguf. With the
    calibration's `input_sums`, also imatrix.gguf (llama.cpp's importance matrix)."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    type_name = codecs.check_type(gguf_type)
    arch = gguf_arch(model.config)
    if progress:
        print(f"factorport: gguf: planning tensors (re-quantized tensors -> {type_name})")
    plan = plan_model(model, type_name)
    # not the family's name when the model has none: llama.cpp reads "phi3" in a name as a Phi-3 vocabulary
    name = getattr(model.config, "_name_or_path", "") or "unnamed"
    tokenizer_how = write_model(out_dir / MODEL_FILE, plan, model, tokenizer, str(name))
    if plan.lora:
        write_adapter(out_dir / ADAPTER_FILE, plan, arch.gguf_arch)
    if progress:
        print(f"factorport: gguf: wrote {MODEL_FILE}" + (f" and {ADAPTER_FILE} ({len(plan.lora) // 2} LoRA pairs)" if plan.lora else ""))
    if native:
        write_native(out_dir / NATIVE_FILE, model, tokenizer)
    imatrix = None
    if input_sums is not None:
        imatrix = {"tensors": write_imatrix(out_dir / IMATRIX_FILE, model, input_sums), "tokens": input_sums.tokens,
                   "note": f"llama-quantize --imatrix {IMATRIX_FILE}: llama.cpp's importance matrix, from factorport's calibration"}
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    return {
        "format": "gguf",
        "architecture": arch.gguf_arch,
        "gguf_type": type_name,
        "files": files,
        "tensor_types": dict(Counter(t.type_name for t in plan.tensors)),
        "tokenizer": tokenizer_how,
        "requantized": plan.requantized,
        "multiplied_out": plan.multiplied_out,
        "adapter": None if not plan.lora else {
            "pairs": len(plan.lora) // 2,
            "bytes": files[ADAPTER_FILE],
            "duplicated_shared_v": plan.duplicated_v,
            "note": "llama.cpp has no shared-input LoRA: a shared V is written once per member",
        },
        "imatrix": imatrix,
        "native": f"{NATIVE_FILE}: factorport's own layout (architecture 'factorport'); stock llama.cpp does not run it" if native else None,
        "seconds": round(time.perf_counter() - started, 2),
    }


__all__ = ["ADAPTER_FILE", "IMATRIX_FILE", "MODEL_FILE", "NATIVE_FILE", "export", "load_native"]
