"""ONNX export of a compressed graph (OUTPUT/onnx), loadable by onnxruntime and
by `optimum.onnxruntime.ORTModelForCausalLM`.

Optimum's exporter traces the decoder (KV cache, Optimum's input/output
names); before tracing, each compressed linear is swapped for a module that
traces to its own ONNX form (see `operators`), so compressed operators stay
compressed in the graph. docs/onnx.md describes the graph.
"""

from __future__ import annotations

from pathlib import Path

from .export import export

__all__ = ["export"]
