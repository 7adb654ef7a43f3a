"""Only the linen integration of the learned package imports flax at module import time."""

import ast
import pathlib

import pytest

import fusionjax.learned

PACKAGE = pathlib.Path(fusionjax.learned.__file__).parent
LINEN_MODULES = {"_wemoe.py", "_twin.py"}  # intercept nn.Dense calls: flax is their subject


def _top_level_imports(path):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


@pytest.mark.parametrize(
    "module", sorted(p.name for p in PACKAGE.glob("_*.py") if p.name != "__init__.py")
)
def test_flax_is_imported_by_linen_modules_only(module):
    """The pure-jax modules (MoE math, Portland, ensemble, loops) never import flax."""
    flax = [m for m in _top_level_imports(PACKAGE / module) if m.split(".")[0] == "flax"]
    if module in LINEN_MODULES:
        assert flax, f"{module} is listed as a linen module but imports no flax"
    else:
        assert not flax, f"{module} imports {flax} at module import time"
