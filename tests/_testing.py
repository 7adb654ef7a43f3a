"""Tolerances and small helpers shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np

SEEDS = (0, 1, 2)
"""Testbed seeds every evidence test runs on."""

F32 = dict(rtol=1e-5, atol=1e-6)
BF16 = dict(rtol=1e-2, atol=1e-2)


def assert_trees_close(a, b, **tol):
    """Asserts two pytrees have the same structure and close leaves."""
    tol = tol or F32
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, f"structures differ: {ta} != {tb}"
    for (path, x), (_, y) in zip(la, lb, strict=False):
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), err_msg=jax.tree_util.keystr(path), **tol
        )


def random_model(key, *, dtype=jnp.float32, scale=1.0):
    """A small nested-dict model with a kernel, a bias, a conv-like kernel and an int leaf."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "dense": {
            "kernel": (scale * jax.random.normal(k1, (8, 4))).astype(dtype),
            "bias": (scale * jax.random.normal(k2, (4,))).astype(dtype),
        },
        "conv": {"kernel": (scale * jax.random.normal(k3, (3, 3, 2, 5))).astype(dtype)},
        "scale": (scale * jax.random.normal(k4, ())).astype(dtype),
        "step": jnp.array(7, jnp.int32),
    }


def finetune_like(base, key, n, *, scale=0.1):
    """``n`` models near ``base`` (float leaves perturbed, int leaves equal)."""
    out = []
    for k in jax.random.split(key, n):
        leaves, treedef = jax.tree.flatten(base)
        keys = jax.random.split(k, len(leaves))
        new = [
            x + (scale * jax.random.normal(kk, x.shape)).astype(x.dtype)
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x
            for x, kk in zip(leaves, keys, strict=False)
        ]
        out.append(treedef.unflatten(new))
    return out
