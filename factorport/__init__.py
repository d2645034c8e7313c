"""factorport: Hugging Face models -> compressed graphs (factorized, shared-factor,
sparse-quantized linears) -> safetensors / ONNX / GGUF, validated on every runtime."""

__version__ = "0.1.0"

from .api import bench, convert, evaluate, export, generate, load, open_output, perplexity, validate  # noqa: E402
from .errors import FactorportError  # noqa: E402

__all__ = [
    "FactorportError",
    "__version__",
    "bench",
    "convert",
    "evaluate",
    "export",
    "generate",
    "load",
    "open_output",
    "perplexity",
    "validate",
]
