"""Helpers for models from other libraries (flax.linen): capture layer inputs, Dense Fishers."""

from fusionjax.interop._linen import capture_dense_inputs
from fusionjax.interop._linen import dense_grams
from fusionjax.interop._linen_fisher import dense_fisher_diagonal

__all__ = [
    "capture_dense_inputs",
    "dense_fisher_diagonal",
    "dense_grams",
]
