"""llama.cpp's file types and its quantizer (`llama_model_quantize`, which
picks a type per tensor for mixes such as Q4_K_M).

llama.cpp only quantizes whole GGUF files, so `quantize_model` goes through a
scratch directory that is deleted before it returns; nothing else is written.
"""

from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path
from typing import Iterator

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
# Types whose quantizer needs an importance matrix in llama.cpp.
NEEDS_IMATRIX = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")
# {ggml type: a file type whose default type it is}: quantized with `pure`,
# that file type puts every tensor in the ggml type (or its fallback, when a
# row does not fit the type's blocks: Q4_K -> Q5_0, Q6_K -> Q8_0, ...).
PURE_FTYPES = {
    "Q2_K": "Q2_K", "Q3_K": "Q3_K_S", "IQ3_S": "IQ3_S", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "Q4_0": "Q4_0", "Q4_1": "Q4_1",
    "Q4_K": "Q4_K_S", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q5_K": "Q5_K_S", "Q6_K": "Q6_K", "Q8_0": "Q8_0",
}


def ftype_value(name: str) -> int:
    """llama.cpp's llama_ftype number of a file type name ("Q4_K_M")."""
    llama_cpp = import_llama_cpp()
    value = getattr(llama_cpp, f"LLAMA_FTYPE_{'ALL' if name == 'F32' else 'MOSTLY'}_{name}", None)
    if name not in FTYPES or value is None:
        raise FactorportError(f"unknown llama.cpp quantization type {name!r}; choose one of {', '.join(FTYPES)}")
    return value


def quantize_model(
    tensors: dict[str, np.ndarray], metadata: dict, ftype: str, threads: int = 0, importance: dict[str, np.ndarray] | None = None,
    pure: bool = False,
) -> dict[str, tuple[str, np.ndarray]]:
    """llama.cpp's quantization of a whole model: {gguf name: (ggml type, raw
    blocks (rows, row_bytes))} for every 2-D tensor of `tensors` (float32,
    (rows, cols)). `metadata` is the model's GGUF key/values (architecture and
    hyper-parameters: llama.cpp chooses per-tensor types by name, layer and
    shape). Rows are quantized independently, so their order does not matter.
    `importance`: {gguf name: mean x² per input column}, llama.cpp's
    importance matrix (what `llama-quantize --imatrix` reads from a file).
    `pure`: every tensor in the file type's default type (`llama-quantize --pure`)."""
    [result] = quantize_each(tensors, metadata, [(ftype, pure)], threads, importance)  # runs the generator out: its scratch directory goes now
    return result


def quantize_each(
    tensors: dict[str, np.ndarray], metadata: dict, runs: list[tuple[str, bool]], threads: int = 0,
    importance: dict[str, np.ndarray] | None = None,
) -> Iterator[dict[str, tuple[str, np.ndarray]]]:
    """`quantize_model` for each (file type, pure) of `runs`, one after the
    other, from one F32 source file."""
    import gguf

    for ftype, _ in runs:
        if ftype in NEEDS_IMATRIX and not importance:
            raise FactorportError(f"{ftype} needs an importance matrix in llama.cpp; calibrate (a recipe calibration section) or pick another type")
        ftype_value(ftype)  # before writing anything
    with tempfile.TemporaryDirectory(prefix="factorport-llamacpp-") as scratch:
        source, target = Path(scratch) / "f32.gguf", Path(scratch) / "quantized.gguf"
        write_f32(source, tensors, metadata)
        for ftype, pure in runs:
            quantize_file(source, target, ftype, threads, importance=importance, pure=pure)
            reader = gguf.GGUFReader(target)
            result = {}
            for t in reader.tensors:
                if t.name in tensors and len(t.shape) == 2:
                    data = np.array(t.data)  # copy out of the memory map before the file goes
                    rows = int(t.shape[1])
                    result[t.name] = (t.tensor_type.name, data.view(np.uint8).reshape(rows, -1))
            del reader
            target.unlink()
            yield result


def write_f32(path: Path, tensors: dict[str, np.ndarray], metadata: dict) -> None:
    """An F32 GGUF of `tensors` with the model's key/values: what llama.cpp's quantizer reads."""
    import gguf

    writer = gguf.GGUFWriter(path, arch=metadata["general.architecture"])
    add_values(writer, metadata)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_file(
    source: Path, target: Path, ftype: str, threads: int = 0, allow_requantize: bool = False, importance: dict[str, np.ndarray] | None = None,
    pure: bool = False,
) -> None:
    """`llama-quantize [--imatrix] [--pure] SOURCE TARGET FTYPE`, in this process
    (llama.cpp's quantizer does not crash on the files factorport checks and
    writes). `importance` as `quantize_model`'s."""
    llama_cpp = import_llama_cpp()  # refuses, in one line, a CPU the build does not fit
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_value(ftype)
    params.nthread = threads
    params.allow_requantize = allow_requantize
    params.pure = pure
    if importance:
        entries, buffers = _imatrix_entries(llama_cpp, importance)  # both kept alive until llama.cpp has copied them
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise FactorportError(f"llama.cpp could not quantize {source.name} to {ftype} (status {status})")


def _imatrix_entries(llama_cpp, importance: dict[str, np.ndarray]):
    """llama.cpp's `llama_model_imatrix_data` array: (name, floats, count) per
    tensor, ended by a null name, and the buffers its pointers point into."""
    for name, values in importance.items():
        if not np.isfinite(values).all():
            raise FactorportError(f"the importance matrix of {name} holds a non-finite value; calibrate again")
    entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
    buffers = []
    for i, (name, values) in enumerate(importance.items()):
        data = np.ascontiguousarray(values, dtype=np.float32).ravel()
        buffers.append((name.encode(), data))
        entries[i].name, entries[i].data, entries[i].size = buffers[-1][0], data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size
    return entries, buffers


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
