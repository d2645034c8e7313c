"""`imatrix.gguf`: factorport's calibration statistics as llama.cpp's
importance matrix, the file `llama-imatrix` writes and `llama-quantize
--imatrix` reads (tools/imatrix/imatrix.cpp, common/imatrix-loader.cpp).

Per weight tensor `NAME` (llama.cpp's names, `blk.3.ffn_up.weight`):
`NAME.in_sum2`, float32 (1, n_cols), the sum over the calibration tokens of
each input column's square; `NAME.counts`, float32 (1, 1), the token count.
Keys: `general.type = imatrix`, `imatrix.datasets` (the text),
`imatrix.chunk_count` and `imatrix.chunk_size` (sequences and their length).
As `llama-imatrix` does, only decoder linears and an untied `output.weight`
are written (a tied table is the embedding, which it never records)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import FactorportError
from ...llamacpp.names import OUTPUT, gguf_arch, linear_tensor
from ..input_sums import InputSums
from .model_file import is_tied

IMATRIX_FILE = "imatrix.gguf"
SUMS, COUNTS = ".in_sum2", ".counts"


def imatrix_entries(model, stats: InputSums) -> dict[str, np.ndarray]:
    """{llama.cpp weight name: Σ x² per input column} for the model's exported linears."""
    arch = gguf_arch(model.config)
    tied = is_tied(model)
    entries = {}
    for name, sums in stats.sums.items():
        tensor = f"{linear_tensor(name, arch)}.weight"
        if tensor == OUTPUT and tied:
            continue
        width = model.get_submodule(name).in_features
        if sums.numel() != width:
            raise FactorportError(f"calibration input sums of {name} hold {sums.numel()} values for {width} input columns; convert the model again")
        entries[tensor] = sums.numpy().astype(np.float32)
    return entries


def write_imatrix(path: Path, model, stats: InputSums) -> int:
    """imatrix.gguf for `model`; returns the number of tensors it covers."""
    import gguf

    entries = imatrix_entries(model, stats)
    writer = gguf.GGUFWriter(path, arch=gguf_arch(model.config).gguf_arch)
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(gguf.Keys.IMatrix.DATASETS, [stats.source])
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, stats.tokens // stats.seq_len)
    writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, stats.seq_len)
    for name in sorted(entries):
        writer.add_tensor(name + SUMS, entries[name].reshape(1, -1))
        writer.add_tensor(name + COUNTS, np.full((1, 1), stats.tokens, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return len(entries)


def read_imatrix(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(sums, counts, keys) of an imatrix GGUF, by weight name: `write_imatrix`'s
    mirror, and a reader of `llama-imatrix`'s files. Refuses files that are not one."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, IndexError) as exc:
        raise FactorportError(f"{path}: not a readable GGUF file ({exc}); write it again") from None
    kind = reader.fields.get("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise FactorportError(f"{path}: general.type is not 'imatrix'; not an importance matrix")
    keys = {k: reader.fields[k].contents() for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k in reader.fields}
    sums, counts = {}, {}
    for t in reader.tensors:
        for suffix, into in ((SUMS, sums), (COUNTS, counts)):
            if t.name.endswith(suffix):
                into[t.name.removesuffix(suffix)] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    if not sums or set(sums) != set(counts):
        raise FactorportError(f"{path}: every {SUMS} tensor needs its {COUNTS} (and one at least); not an importance matrix")
    return sums, counts, keys
