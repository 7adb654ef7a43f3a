"""``import fusionjax`` stays light: no flax, and every subpackage is an attribute."""

import pkgutil
import subprocess
import sys
import textwrap

import pytest

import fusionjax as fj

LAZY = ("alignment", "cli", "decoding", "demo", "interop", "learned", "testbed", "zoo")


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
