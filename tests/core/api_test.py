"""The public API: every exported name exists and documents itself."""

import inspect

import pytest

import fusionjax as fj
from fusionjax import demo, testbed

MODULES = [fj, fj.merging, fj.interop, testbed, demo]
EXPORTS = [(m.__name__, n) for m in MODULES for n in m.__all__]


@pytest.mark.parametrize("module,name", EXPORTS, ids=[f"{m}.{n}" for m, n in EXPORTS])
def test_export_exists_and_is_documented(module, name):
    mod = {m.__name__: m for m in MODULES}[module]
    obj = getattr(mod, name)
    if inspect.ismodule(obj):
        assert obj.__doc__
        return
    if inspect.isfunction(obj):
        doc = inspect.getdoc(obj) or ""
        assert "Returns:" in doc or "Args:" in doc, f"{module}.{name} lacks Args/Returns sections"
        params = [p for p in inspect.signature(obj).parameters.values() if p.kind != p.VAR_KEYWORD]
        if params:
            assert "Args:" in doc, f"{module}.{name} takes arguments but documents none"
    elif inspect.isclass(obj):
        assert inspect.getdoc(obj), f"{module}.{name} has no docstring"


def test_factories_take_keyword_only_hyperparameters():
    for name in ["ties", "trim", "dare", "drop_and_rescale", "breadcrumbs", "della", "slerp", "task_arithmetic"]:
        sig = inspect.signature(getattr(fj.merging, name))
        assert all(p.kind == p.KEYWORD_ONLY for p in sig.parameters.values()), name


def test_version():
    assert isinstance(fj.__version__, str) and fj.__version__
