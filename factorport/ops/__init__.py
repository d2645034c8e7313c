"""Compressed operators — the IR every converter fills and every format writes.

Imports nothing else from factorport.
"""

from .bases import Base, BlockSparseBase, DenseBase, QuantizedBase
from .linear import CompressedLinear, Projection, TiedEmbedding
from .quant import QuantSpec

__all__ = [
    "Base",
    "BlockSparseBase",
    "CompressedLinear",
    "DenseBase",
    "Projection",
    "QuantSpec",
    "QuantizedBase",
    "TiedEmbedding",
]
