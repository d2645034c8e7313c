"""llama.cpp's own quantization grids (ggml block types) as a base.

`GGMLBase` holds a weight exactly as llama.cpp stores it: raw ggml blocks,
one row of blocks per output row, in any ggml type (Q4_K, Q5_0, IQ4_NL, ...).
It decodes with the gguf package's reference decoders, so the torch model
computes with the very weights llama.cpp reads, and an exporter can copy the
bytes into a GGUF file unchanged.

`llamacpp_quantize` is llama.cpp's quantizer (`llama_model_quantize`, which
picks a type per tensor for mixes such as Q4_K_M). llama.cpp only quantizes
whole GGUF files, so the call goes through a scratch directory that is
deleted before it returns; nothing else is written.
"""

from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# llama.cpp file types (llama_ftype) that its quantizer accepts by name.
FTYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_M", "IQ3_XS", "IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M",
    "TQ1_0", "TQ2_0",
)
# Types whose quantizer needs an importance matrix in llama.cpp (we do not pass one).
NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")


def ggml_type(name: str):
    """The gguf.GGMLQuantizationType of a ggml type name (e.g. "Q4_K")."""
    import gguf

    return gguf.GGMLQuantizationType[name]


def dequantize_blocks(blocks: np.ndarray, type_name: str) -> np.ndarray:
    """float32 (rows, in) from raw blocks (rows, row_bytes) of a ggml type."""
    import gguf

    return gguf.quants.dequantize(np.ascontiguousarray(blocks), ggml_type(type_name)).astype(np.float32)


def row_bytes(in_features: int, type_name: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[ggml_type(type_name)]
    if in_features % block:
        raise ValueError(f"ggml type {type_name} needs rows of a multiple of {block} values, got {in_features}")
    return in_features // block * size


class GGMLBase(nn.Module):
    """A weight in raw ggml blocks of type `ggml_type` (uint8, (out, row_bytes))."""

    kind = "ggml"

    def __init__(self, blocks: torch.Tensor, type_name: str, in_features: int) -> None:
        super().__init__()
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != row_bytes(in_features, type_name):
            raise ValueError(f"{type_name} blocks of shape {tuple(blocks.shape)} do not hold rows of {in_features} values")
        self.type_name = type_name
        self.in_features = in_features
        self.out_features = blocks.shape[0]
        self.register_buffer("blocks", blocks)
        self._dense: torch.Tensor | None = None  # decoded once: the reference decoders are slow

    def to_dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = torch.from_numpy(dequantize_blocks(self.blocks.numpy(), self.type_name))
        return self._dense

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.to_dense()[ids]

    def num_params(self) -> int:
        return self.out_features * self.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.to_dense().to(x.dtype))

    def spec(self) -> dict:
        return {"kind": self.kind, "type": self.type_name}


def ftype_value(name: str) -> int:
    """llama.cpp's llama_ftype number of a file type name ("Q4_K_M")."""
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL' if name == 'F32' else 'MOSTLY'}_{name}", None)
    if name not in FTYPES or value is None:
        raise ValueError(f"unknown llama.cpp quantization type {name!r}; choose one of {', '.join(FTYPES)}")
    return value


def llamacpp_quantize(
    tensors: dict[str, np.ndarray], metadata: dict, ftype: str, threads: int = 0
) -> dict[str, tuple[str, np.ndarray]]:
    """llama.cpp's quantization of a whole model: {gguf name: (ggml type, raw
    blocks (rows, row_bytes))} for every 2-D tensor of `tensors` (float32,
    (rows, cols)). `metadata` is the model's GGUF key/values (architecture and
    hyper-parameters: llama.cpp chooses per-tensor types by name, layer and
    shape). Rows are quantized independently, so their order does not matter."""
    import gguf
    import llama_cpp

    if ftype in NEEDS_IMATRIX:
        raise ValueError(f"{ftype} needs an importance matrix in llama.cpp; pick another type")
    value = ftype_value(ftype)
    with tempfile.TemporaryDirectory(prefix="factorport-llamacpp-") as scratch:
        source, target = Path(scratch) / "f32.gguf", Path(scratch) / "quantized.gguf"
        writer = gguf.GGUFWriter(source, arch=metadata["general.architecture"])
        for key, val in metadata.items():
            if key != "general.architecture":
                add_value(writer, key, val)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        for name, array in tensors.items():
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = value
        params.nthread = threads
        if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
            raise ValueError(f"llama.cpp could not quantize the model to {ftype}")
        reader = gguf.GGUFReader(target)
        result = {}
        for t in reader.tensors:
            if t.name in tensors and len(t.shape) == 2:
                data = np.array(t.data)  # copy out of the memory map before the file goes
                rows = int(t.shape[1])
                result[t.name] = (t.tensor_type.name, data.view(np.uint8).reshape(rows, -1))
        del reader
    return result


def add_value(writer, key: str, value) -> None:
    """One GGUF key/value, typed by its Python type (ints as uint32, like llama.cpp's hyper-parameters)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))
