"""DARE and DELLA: determinism, exact rescaling, unbiasedness over keys."""

import jax
import jax.numpy as jnp
import numpy as np

import fusionjax as fj

K = jax.random.key


def stacked(n=3, size=20_000, seed=0):
    return {"w": jax.random.normal(K(seed), (n, size))}


def test_dare_keeps_expected_fraction_and_rescales_exactly():
    tvs = stacked()
    out = np.asarray(fj.merging.drop_and_rescale(drop_rate=0.9)(tvs, key=K(1))["w"])
    x = np.asarray(tvs["w"])
    kept = out != 0
    assert abs(kept.mean() - 0.1) < 0.01  # binomial sd ~0.0017
    np.testing.assert_allclose(out[kept], x[kept] / 0.1, rtol=1e-6)


def test_dare_masks_differ_across_models_and_leaves():
    tvs = {"a": jnp.ones((2, 1000)), "b": jnp.ones((2, 1000))}
    out = fj.merging.drop_and_rescale(drop_rate=0.5)(tvs, key=K(3))
    a, b = np.asarray(out["a"]), np.asarray(out["b"])
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a, b)


def test_dare_is_unbiased_over_keys():
    base = {"w": jnp.zeros(500)}
    fts = [{"w": jnp.linspace(-1.0, 1.0, 500)}, {"w": jnp.linspace(2.0, 0.0, 500)}]
    m = fj.merging.dare(drop_rate=0.5, merger=fj.merging.mean())
    runs = np.stack([np.asarray(fj.merge(base, fts, m, key=K(i))["w"]) for i in range(300)])
    target = np.asarray(fj.merge(base, fts, fj.merging.mean())["w"])
    # per-entry sd of one run ~ 1.0, of the mean of 300 runs ~ 0.058: allow 5 sd.
    assert np.abs(runs.mean(0) - target).max() < 0.3
    assert abs(runs.mean() - target.mean()) < 0.02


def test_della_keep_probability_grows_with_magnitude_and_is_unbiased():
    x = jnp.tile(jnp.linspace(0.01, 1.0, 200)[None, :], (1, 1))
    step = fj.merging.magnitude_drop(density=0.5, epsilon=0.4)
    runs = np.stack([np.asarray(step({"w": x}, key=K(i))["w"])[0] for i in range(400)])
    kept = (runs != 0).mean(0)
    # keep probability is 0.1 for the smallest and 0.9 for the largest entry.
    assert kept[:20].mean() < 0.25 and kept[-20:].mean() > 0.75
    np.testing.assert_allclose(runs.mean(0).mean(), np.asarray(x).mean(), rtol=0.05)


def test_della_ranks_within_output_units():
    # A [T, d_in, d_out] kernel: ranks run over d_in separately for every output unit.
    from fusionjax.merging._sparsify import _ranks01

    mag = jnp.stack([jnp.arange(6.0).reshape(3, 2), jnp.arange(6.0)[::-1].reshape(3, 2)])
    r = np.asarray(_ranks01(mag))
    np.testing.assert_allclose(r[0], [[0, 0], [0.5, 0.5], [1, 1]])
    np.testing.assert_allclose(r[1], [[1, 1], [0.5, 0.5], [0, 0]])
