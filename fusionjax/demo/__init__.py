"""Demonstrations on the bundled testbeds (what ``fusionjax demo`` prints)."""

from fusionjax.demo._merging import MethodResult
from fusionjax.demo._merging import default_methods
from fusionjax.demo._merging import format_coefficients
from fusionjax.demo._merging import format_table
from fusionjax.demo._merging import run_merging_suite

__all__ = [
    "MethodResult",
    "default_methods",
    "format_coefficients",
    "format_table",
    "run_merging_suite",
]
