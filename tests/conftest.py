"""Shared pytest configuration: strict JAX numerics and common fixtures."""

import jax
import pytest

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
