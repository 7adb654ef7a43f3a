"""Tests for MergeMany."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax.alignment import PermutationSpec
from fusionjax.alignment._merge_many import merge_many

SPEC = PermutationSpec(
    {
        "P0": [("Dense_0/kernel", 1), ("Dense_0/bias", 0), ("Dense_1/kernel", 0)],
        "P1": [("Dense_1/kernel", 1), ("Dense_1/bias", 0), ("Dense_2/kernel", 0)],
    }
)


def mlp(seed, dims=(16, 12, 10, 3)):
    r = np.random.default_rng(seed)
    return {
        f"Dense_{i}": {
            "kernel": r.standard_normal((a, b)).astype(np.float32),
            "bias": r.standard_normal((b,)).astype(np.float32),
        }
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True))
    }


def permuted_copy(params, seed):
    """``params`` with both hidden layers' units shuffled (NumPy in, jax arrays out)."""
    r = np.random.default_rng(seed)
    p0, p1 = r.permutation(12), r.permutation(10)
    d0, d1, d2 = (params[f"Dense_{i}"] for i in range(3))
    out = {
        "Dense_0": {"kernel": d0["kernel"][:, p0], "bias": d0["bias"][p0]},
        "Dense_1": {"kernel": d1["kernel"][p0][:, p1], "bias": d1["bias"][p1]},
        "Dense_2": {"kernel": d2["kernel"][p1], "bias": d2["bias"]},
    }
    return jax.tree.map(jax.device_put, out)


def assert_trees_equal(a, b, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.parametrize("key", [None, jax.random.key(3)], ids=["ordered", "random"])
def test_permuted_copies_land_in_one_basin(key):
    base = mlp(0)
    models = [permuted_copy(base, s) for s in range(4)]
    out = merge_many(SPEC, models, key=key, solver="scipy")
    aligned = out.aligned(models)
    for m in aligned[1:]:
        assert_trees_equal(m, aligned[0])
    # The merged mean is that common model: a permutation of base, with base's function.
    assert_trees_equal(out.merged, aligned[0], atol=1e-6)
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)

    def apply(p, x):
        for i in range(3):
            x = x @ np.asarray(p[f"Dense_{i}"]["kernel"]) + np.asarray(p[f"Dense_{i}"]["bias"])
            x = np.maximum(x, 0) if i < 2 else x
        return x

    np.testing.assert_allclose(apply(out.merged, x), apply(base, x), rtol=1e-5, atol=1e-5)
    assert bool(out.converged)


def test_noisy_copies_merge_closer_than_naive_average():
    base = mlp(1)
    r = np.random.default_rng(5)
    models = [
        jax.tree.map(
            lambda x: jnp.asarray(
                np.asarray(x) + 0.05 * r.standard_normal(x.shape).astype(np.float32)
            ),
            permuted_copy(base, s),
        )
        for s in range(3)
    ]
    out = merge_many(SPEC, models, key=jax.random.key(0), solver="scipy")
    aligned = out.aligned(models)

    def dist(a, b):
        return sum(
            float(np.sum((np.asarray(x) - np.asarray(y)) ** 2))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        )

    # Every aligned copy is within the noise of the merged model; the naive mean is not.
    naive = jax.tree.map(lambda *xs: sum(np.asarray(x) for x in xs) / len(xs), *models)
    assert max(dist(m, out.merged) for m in aligned) < 0.1 * min(dist(m, naive) for m in models)


def test_errors():
    base = mlp(0)
    with pytest.raises(ValueError, match="at least two"):
        merge_many(SPEC, [base])
    bad = mlp(0, dims=(16, 12, 10, 4))
    with pytest.raises(ValueError, match=r"models\[1\].*\['Dense_2'\]\['bias'\]"):
        merge_many(SPEC, [jax.tree.map(jax.device_put, base), jax.tree.map(jax.device_put, bad)])
