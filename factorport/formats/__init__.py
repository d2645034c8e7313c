"""Compressed graph <-> files. Formats never import converters: they read and
write what the operators in `factorport.ops` hold, as specified in docs/FORMAT.md."""

import importlib

# Exporters beyond the safetensors reference, one per sub-directory of an
# output: "module:function", imported when used. Each is called as
# `export(model, tokenizer, out_dir, progress=..., **options)` on a converted
# model, writes only inside `out_dir` and returns a JSON-able report.
EXPORTERS = {
    "onnx": "factorport.formats.onnx:export",
    "gguf": "factorport.formats.gguf:export",
}


def exporter(name: str):
    from ..errors import FactorportError

    if name not in EXPORTERS:
        raise FactorportError(f"unknown format {name!r}; choose from safetensors, {', '.join(EXPORTERS)}")
    module, function = EXPORTERS[name].split(":")
    return getattr(importlib.import_module(module), function)
