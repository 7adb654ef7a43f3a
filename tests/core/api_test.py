"""The public API: every exported name exists and documents itself.

Every public subpackage is covered: each name in its ``__all__`` exists, and

* a module has a docstring;
* a class has a docstring of its own (not the ``Name(field, ...)`` line that
  ``NamedTuple`` and ``dataclass`` write when there is none); its fields or
  constructor arguments may be described in prose or an ``Attributes:`` section;
* any other callable (a function, a jitted function, a ``functools.partial``) has a
  docstring with ``Args:`` when it takes arguments (``**kwargs`` alone does not count),
  and ``Args:`` or ``Returns:`` when it takes none;
* anything else (a type alias such as ``Params``, a constant) only has to exist.
"""

import importlib
import inspect

import pytest

import fusionjax as fj

SUBPACKAGES = [
    "fusionjax",
    "fusionjax.alignment",
    "fusionjax.cli",
    "fusionjax.decoding",
    "fusionjax.demo",
    "fusionjax.distill",
    "fusionjax.interop",
    "fusionjax.io",
    "fusionjax.learned",
    "fusionjax.logits",
    "fusionjax.merging",
    "fusionjax.testbed",
    "fusionjax.zoo",
]
MODULES = {name: importlib.import_module(name) for name in SUBPACKAGES}
EXPORTS = [(m, n) for m in SUBPACKAGES for n in MODULES[m].__all__]
PARAMS = [pytest.param(m, n, id=f"{m}.{n}") for m, n in EXPORTS]


def test_every_public_subpackage_is_covered():
    top_level_modules = {n for n in fj.__all__ if inspect.ismodule(getattr(fj, n))}
    assert {f"fusionjax.{n}" for n in top_level_modules} == set(SUBPACKAGES) - {"fusionjax"}


def _takes_arguments(obj) -> bool:
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # no signature to read: ask for Args:
        return True
    return any(p.kind != p.VAR_KEYWORD for p in params)


@pytest.mark.parametrize("module,name", PARAMS)
def test_export_exists_and_is_documented(module, name):
    mod = MODULES[module]
    assert hasattr(mod, name), f"{module}.__all__ lists {name}, which does not exist"
    obj = getattr(mod, name)
    if type(obj).__module__ in ("typing", "types"):
        return  # a type alias such as ArrayLike (a Union)
    if inspect.ismodule(obj):
        assert obj.__doc__, f"{obj.__name__} has no docstring"
    elif inspect.isclass(obj):
        if obj.__module__ in ("typing", "builtins") or obj.__module__.startswith("jax"):
            return  # an alias of another library's type, e.g. ArrayLike
        doc = obj.__doc__ or ""
        assert doc.strip(), f"{module}.{name} has no docstring"
        assert not doc.startswith(f"{obj.__name__}("), (
            f"{module}.{name} has only the generated {obj.__name__}(...) docstring"
        )
    elif callable(obj):
        doc = inspect.getdoc(obj) or ""
        assert doc, f"{module}.{name} has no docstring"
        if _takes_arguments(obj):
            assert "Args:" in doc, f"{module}.{name} takes arguments but documents none"
        else:
            assert "Args:" in doc or "Returns:" in doc, f"{module}.{name} lacks Returns:"


def test_factories_take_keyword_only_hyperparameters():
    for name in [
        "ties",
        "trim",
        "dare",
        "drop_and_rescale",
        "breadcrumbs",
        "della",
        "slerp",
        "task_arithmetic",
    ]:
        sig = inspect.signature(getattr(fj.merging, name))
        assert all(p.kind == p.KEYWORD_ONLY for p in sig.parameters.values()), name


def test_version():
    assert isinstance(fj.__version__, str) and fj.__version__
