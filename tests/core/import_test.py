"""``import fusionjax`` stays light: no flax, every subpackage is an attribute, and the core
(``fusionjax/_src``) is layered: no import cycles, nothing imported from above it."""

import ast
import pathlib
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import fusionjax as fj

LAZY = ("alignment", "cli", "decoding", "demo", "distill", "interop", "io", "learned", "logits", "testbed", "zoo")


def test_import_loads_no_flax_and_subpackages_are_attributes():
    # A fresh interpreter (one subprocess, ~2 s): this session has imported flax already.
    code = textwrap.dedent(
        """
        import sys
        import fusionjax as fj
        heavy = sorted(m for m in ("flax", "sklearn", "ott") if m in sys.modules)
        assert not heavy, f"import fusionjax loaded {heavy}"
        assert not any(m.startswith("fusionjax.alignment") for m in sys.modules)
        assert fj.merging.ties and fj.merge and fj.chain
        assert fj.alignment.PermutationSpec
        assert "fusionjax.alignment" in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_every_subpackage_is_an_attribute_listed_in_dir_and_all():
    found = {m.name for m in pkgutil.iter_modules(fj.__path__) if m.ispkg}
    public = {name for name in found if not name.startswith("_")}
    assert public == {*LAZY, "merging"}, "a new subpackage goes in fusionjax/__init__.py"
    for name in public:
        module = getattr(fj, name)
        assert module.__name__ == f"fusionjax.{name}"
        assert name in fj.__all__ and name in dir(fj)


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_subpackage"):
        fj.no_such_subpackage  # noqa: B018


SRC = pathlib.Path(fj.__file__).parent / "_src"


def _src_imports() -> dict[str, set[str]]:
    """``{module: imported names}`` for every ``fusionjax/_src/*.py``, function-level included.

    Names are dotted modules (``fusionjax._src.base``, ``fusionjax.merging``, ``jax``);
    ``from fusionjax._src import keys`` counts as importing ``fusionjax._src.keys``.
    """
    out = {}
    for path in sorted(SRC.glob("*.py")):
        here = f"fusionjax._src.{path.stem}" if path.stem != "__init__" else "fusionjax._src"
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package fusionjax._src
                    parts = "fusionjax._src".split(".")[: 3 - node.level]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    is_module = sub.startswith("fusionjax.") and (
                        (SRC.parent / (sub.split(".", 1)[1].replace(".", "/") + ".py")).exists()
                        or (SRC.parent / sub.split(".", 1)[1].replace(".", "/")).is_dir()
                    )
                    names.add(sub if is_module else base)
        out[here] = names
    return out


def test_src_imports_nothing_above_it():
    for module, names in _src_imports().items():
        above = sorted(
            n for n in names
            if (n == "fusionjax" or n.startswith("fusionjax."))
            and not (n == "fusionjax._src" or n.startswith("fusionjax._src."))
        )
        assert not above, f"{module} imports {above}: the core may not import from above it"


def test_src_import_graph_has_no_cycle():
    imports = _src_imports()
    graph = {m: sorted(n for n in names if n in imports and n != m) for m, names in imports.items()}
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                raise AssertionError("import cycle in fusionjax._src: " + " -> ".join(cycle))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    # The layering the test protects: base imports no module that imports base.
    assert "fusionjax._src.merge" not in imports["fusionjax._src.base"]

