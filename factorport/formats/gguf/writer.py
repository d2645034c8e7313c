"""Writing `model.gguf` and `adapter.gguf` from a `Plan`, one tensor at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...llamacpp.hparams import hparams
from ...llamacpp.quantize import add_values
from ...ops.ggml import ggml_type
from .metadata import add_tokenizer
from .model_file import Plan, Tensor

QUANTIZATION_VERSION = 2  # ggml's block layouts of Q4_0/Q4_1/Q8_0 (and K-quants) since 2023
# llama.cpp scales a LoRA product by alpha / rank, or by 1 when alpha is 0:
# 0 leaves every correction unscaled whatever each tensor's rank is.
LORA_ALPHA_UNSCALED = 0.0


def _finish(writer, tensors: list[Tensor]) -> None:
    """The header, then each tensor's data made and written in turn (the
    header needs only shapes and types), so one tensor is in memory at a time."""
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, t.dtype, t.nbytes, raw_dtype=ggml_type(t.type_name) if t.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        data = np.ascontiguousarray(t.make())
        if data.shape != t.shape or data.dtype != t.dtype:  # the header already promised otherwise
            raise AssertionError(f"{t.name}: planned {t.shape} {t.dtype}, made {data.shape} {data.dtype}")
        writer.write_tensor_data(data)
    writer.close()


def write_model(path: Path, plan: Plan, model, tokenizer, name: str) -> str:
    """model.gguf; returns how the tokenizer was written."""
    import gguf

    values = hparams(model.config)
    writer = gguf.GGUFWriter(path, arch=values["general.architecture"])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_values(writer, values)
    writer.add_quantization_version(QUANTIZATION_VERSION)
    how = add_tokenizer(writer, tokenizer, model.config.vocab_size)
    writer.add_string("factorport.requantized", json.dumps(plan.requantized))
    writer.add_string("factorport.multiplied_out", json.dumps(plan.multiplied_out))
    writer.add_bool("factorport.has_adapter", bool(plan.lora))
    _finish(writer, plan.tensors)
    return how


def write_adapter(path: Path, plan: Plan, arch: str) -> None:
    """adapter.gguf: llama.cpp computes W·x + B·(A·x) for every tensor pair."""
    import gguf

    writer = gguf.GGUFWriter(path, arch=arch)  # llama.cpp's architecture name
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, LORA_ALPHA_UNSCALED)
    writer.add_string("factorport.duplicated_shared_v", json.dumps(plan.duplicated_v))
    _finish(writer, plan.lora)
