"""Helpers for models from other libraries (flax.linen): capture layer inputs."""

from fusionjax.interop._linen import capture_dense_inputs
from fusionjax.interop._linen import dense_grams

__all__ = [
    "capture_dense_inputs",
    "dense_grams",
]
