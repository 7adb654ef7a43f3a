"""The ``fusionjax`` command line (``fusionjax demo``, ``fusionjax merge``, ``--version``).

It sits above the library: it imports :mod:`fusionjax.demo` and
:mod:`fusionjax.testbed`, and nothing in the library imports it.
"""

from fusionjax.cli._main import main

__all__ = ["main"]
