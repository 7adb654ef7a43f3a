"""Shared pytest configuration: strict JAX numerics and common fixtures."""

import jax
import pytest

from fusionjax import testbed
from fusionjax.demo import run_merging_suite
from tests._testing import SEEDS

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def rng():
    """A fresh PRNG key."""
    return jax.random.key(0)


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def maybe_jit(request):
    """Wraps a function in ``jax.jit`` or leaves it as is."""
    return (lambda f: jax.jit(f)) if request.param else (lambda f: f)


@pytest.fixture(scope="session")
def suite():
    """{seed: {row name: MethodResult}}: every method of the demo on every seed, once per session."""
    out = {}
    for seed in SEEDS:
        tb = testbed.load(seed=seed)
        out[seed] = {r.name: r for r in run_merging_suite(tb)}
    return out
