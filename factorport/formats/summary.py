"""`factorport inspect`: a per-layer account of a safetensors artifact, read
from the file header alone (no tensor data is loaded)."""

from __future__ import annotations

from pathlib import Path

from ..errors import FactorportError
from .safetensors_dir import find_artifact, read_header, verify, weight_files


def tensor_bytes(directory: Path) -> dict[str, int]:
    """{tensor: bytes} from the (checked) headers of `directory`'s safetensors files."""
    sizes = {}
    for path in weight_files(Path(directory)):
        sizes.update({name: entry.nbytes for name, entry in read_header(path)[0].items()})
    return sizes


def _operator(entry: dict) -> tuple[str, int | None, int | None, float | None]:
    """(operator, bits, group size, density) of one linear's layout entry."""
    base, low = entry["base"], entry["lowrank"]
    bits = group = density = None
    if base is None:
        name = "lowrank"
    else:
        name = base["kind"]
        quant = base["values"] if base["kind"] == "block_sparse" else base
        if base["kind"] == "block_sparse":
            density = base["density"]
        if quant["kind"] == "quantized":
            bits, group = quant["bits"], quant["group_size"]
            name += f" int{bits}{'s' if quant['symmetric'] else 'a'}"
        if low is not None:
            name += "+lowrank"
    if low is not None and low["shared"]:
        name += " (shared V)"
    return name, bits, group, density


def inspect_artifact(path: str | Path) -> dict:
    directory = find_artifact(path)
    if directory is None:
        raise FactorportError(f"{path} is not a factorport artifact; point at a 'factorport convert' output")
    # the checks a load makes (header, config.json, layout against the tensor
    # table), so the account below is of a file that loads
    header, meta = verify(directory)
    sizes = {name: entry.nbytes for name, entry in header.items()}
    layers = []
    for name, entry in meta["linears"].items():
        op, bits, group, density = _operator(entry)
        layer_bytes = sum(b for t, b in sizes.items() if t.startswith(name + "."))
        dense = entry["in_features"] * entry["out_features"]
        layers.append(
            {
                "name": name,
                "operator": op,
                "shape": [entry["out_features"], entry["in_features"]],
                "rank": entry["lowrank"]["rank"] if entry["lowrank"] else None,
                "bits": bits,
                "group_size": group,
                "density": density,
                "bytes": layer_bytes,
                "dense_params": dense,
            }
        )
    shared_bytes = {g: sizes.get(f"{g}.V", 0) for g in meta.get("shared", {})}
    compressed = {t for layer in layers for t in sizes if t.startswith(layer["name"] + ".")} | {f"{g}.V" for g in shared_bytes}
    total = sum(sizes.values())
    return {
        "path": str(directory),
        "format_version": meta["format_version"],
        "tied_embeddings": meta["tied_embeddings"],
        "layers": layers,
        "shared": shared_bytes,
        "totals": {
            "compressed_linears": len(layers),
            "compressed_bytes": sum(sizes[t] for t in compressed),
            "other_bytes": total - sum(sizes[t] for t in compressed),
            "total_bytes": total,
            "file_bytes": sum(p.stat().st_size for p in weight_files(directory)),
        },
    }


def format_table(summary: dict) -> str:
    rows = [f"{'layer':<40} {'operator':<28} {'shape':>11} {'rank':>5} {'bits':>4} {'group':>5} {'density':>7} {'bytes':>11}"]
    for layer in summary["layers"]:
        shape = "x".join(str(d) for d in layer["shape"])
        cell = lambda v, fmt="{}": "-" if v is None else fmt.format(v)  # noqa: E731
        rows.append(
            f"{layer['name']:<40} {layer['operator']:<28} {shape:>11} {cell(layer['rank']):>5} {cell(layer['bits']):>4} "
            f"{cell(layer['group_size']):>5} {cell(layer['density'], '{:.2f}'):>7} {layer['bytes']:>11,}"
        )
    for group, size in summary["shared"].items():
        rows.append(f"{group + '.V':<40} {'shared projection':<28} {'':>11} {'':>5} {'':>4} {'':>5} {'':>7} {size:>11,}")
    t = summary["totals"]
    rows.append("")
    rows.append(f"compressed linears: {t['compressed_linears']}   bytes in them: {t['compressed_bytes']:,}")
    rows.append(f"other tensors (embeddings, norms, dense linears): {t['other_bytes']:,}")
    rows.append(f"total tensor bytes: {t['total_bytes']:,}   file: {t['file_bytes']:,}   tied embeddings: {summary['tied_embeddings']}")
    return "\n".join(rows)
