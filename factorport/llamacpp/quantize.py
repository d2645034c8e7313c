"""llama.cpp's file types and its quantizer (`llama_model_quantize`, which
picks a type per tensor for mixes such as Q4_K_M).

llama.cpp only quantizes whole GGUF files, so `quantize_model` goes through a
scratch directory that is deleted before it returns; nothing else is written.
"""

from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path

import numpy as np

from ..errors import FactorportError
from ..hostcpu import import_llama_cpp

# llama.cpp file types (llama_ftype) that its quantizer accepts by name.
FTYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_M", "IQ3_XS", "IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M",
    "TQ1_0", "TQ2_0",
)
# Types whose quantizer needs an importance matrix in llama.cpp (we do not pass one).
NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")


def ftype_value(name: str) -> int:
    """llama.cpp's llama_ftype number of a file type name ("Q4_K_M")."""
    llama_cpp = import_llama_cpp()
    value = getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL' if name == 'F32' else 'MOSTLY'}_{name}", None)
    if name not in FTYPES or value is None:
        raise FactorportError(f"unknown llama.cpp quantization type {name!r}; choose one of {', '.join(FTYPES)}")
    return value


def quantize_model(
    tensors: dict[str, np.ndarray], metadata: dict, ftype: str, threads: int = 0
) -> dict[str, tuple[str, np.ndarray]]:
    """llama.cpp's quantization of a whole model: {gguf name: (ggml type, raw
    blocks (rows, row_bytes))} for every 2-D tensor of `tensors` (float32,
    (rows, cols)). `metadata` is the model's GGUF key/values (architecture and
    hyper-parameters: llama.cpp chooses per-tensor types by name, layer and
    shape). Rows are quantized independently, so their order does not matter."""
    import gguf

    if ftype in NEEDS_IMATRIX:
        raise FactorportError(f"{ftype} needs an importance matrix in llama.cpp; pick another type")
    ftype_value(ftype)  # before writing anything
    with tempfile.TemporaryDirectory(prefix="factorport-llamacpp-") as scratch:
        source, target = Path(scratch) / "f32.gguf", Path(scratch) / "quantized.gguf"
        writer = gguf.GGUFWriter(source, arch=metadata["general.architecture"])
        add_values(writer, metadata)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        for name, array in tensors.items():
            writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        quantize_file(source, target, ftype, threads)
        reader = gguf.GGUFReader(target)
        result = {}
        for t in reader.tensors:
            if t.name in tensors and len(t.shape) == 2:
                data = np.array(t.data)  # copy out of the memory map before the file goes
                rows = int(t.shape[1])
                result[t.name] = (t.tensor_type.name, data.view(np.uint8).reshape(rows, -1))
        del reader
    return result


def quantize_file(source: Path, target: Path, ftype: str, threads: int = 0, allow_requantize: bool = False) -> None:
    """`llama-quantize SOURCE TARGET FTYPE`, in this process (llama.cpp's
    quantizer does not crash on the files factorport checks and writes)."""
    llama_cpp = import_llama_cpp()  # refuses, in one line, a CPU the build does not fit
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_value(ftype)
    params.nthread = threads
    params.allow_requantize = allow_requantize
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise FactorportError(f"llama.cpp could not quantize {source.name} to {ftype} (status {status})")


def add_values(writer, values: dict) -> None:
    """GGUF key/values, each typed by its Python type (ints as uint32, like
    llama.cpp's hyper-parameters); general.architecture is GGUFWriter's own."""
    for key, value in values.items():
        if key == "general.architecture":
            continue
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
