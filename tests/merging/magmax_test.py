"""MagMax: the largest-magnitude task-vector entry per parameter, against NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from tests import _testing as T

M = fj.merging
SHAPES = {"k": (6, 5), "c": (2, 3, 4), "s": ()}
MAGMAX = M.magmax()


def models(seed, n=3):  # noqa: D103
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    fts = [
        {k: np.asarray(v + 0.3 * rng.normal(size=v.shape), np.float32) for k, v in base.items()}
        for _ in range(n)
    ]
    return base, fts


def np_magmax(base, fts, scaling=1.0):
    # per entry, the task vector of largest |.|; the first model on ties (np.argmax)
    out = {}
    for k in base:
        tv = np.stack([f[k].astype(np.float32) - base[k].astype(np.float32) for f in fts])
        idx = np.argmax(np.abs(tv), axis=0)
        picked = np.take_along_axis(tv, idx[None], axis=0)[0].astype(np.float64)
        out[k] = base[k].astype(np.float64) + scaling * picked
    return out


def close(out, ref):
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k], np.float64), ref[k], rtol=1e-6, atol=1e-6,
                                   err_msg=k)


def test_matches_numpy_reference():
    base, fts = models(0)
    close(fj.merge(base, fts, MAGMAX), np_magmax(base, fts))
    close(fj.merge(base, fts, M.magmax(scaling=0.5)), np_magmax(base, fts, 0.5))


def test_keeps_the_sign_of_the_largest_entry_and_the_first_on_ties():
    base = {"w": np.zeros(4, np.float32)}
    a = {"w": np.array([1.0, -4.0, 2.0, 0.0], np.float32)}
    b = {"w": np.array([-2.0, 3.0, -2.0, 0.0], np.float32)}
    # no sign election: -2 wins over +1 and -4 over +3 by magnitude alone; 2 vs -2 is a
    # tie, and the first model's entry is kept
    out = fj.merge(base, [a, b], MAGMAX)
    np.testing.assert_array_equal(np.asarray(out["w"]), [-2.0, -4.0, 2.0, 0.0])


def test_identity_and_order_invariance():
    base, fts = models(1)
    for k in (1, 3):
        close(fj.merge(base, [fts[1]] * k, MAGMAX), {n: v.astype(np.float64) for n, v in fts[1].items()})
    a = fj.merge(base, fts, MAGMAX)
    b = fj.merge(base, [fts[2], fts[0], fts[1]], MAGMAX)
    T.assert_trees_close(a, b, rtol=0, atol=0)  # no magnitude ties in random data: exact


def test_bfloat16_leaves_stay_bfloat16():
    base, fts = models(2)
    bf = [{k: jnp.asarray(v, jnp.bfloat16) for k, v in m.items()} for m in (base, *fts)]
    out = fj.merge(bf[0], bf[1:], MAGMAX)
    assert all(v.dtype == jnp.bfloat16 for v in out.values())
    f32 = [{k: np.asarray(v, np.float32) for k, v in m.items()} for m in bf]
    ref = np_magmax(f32[0], f32[1:])
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k], np.float64), ref[k], **T.BF16)


def test_bad_scaling_is_named():
    with pytest.raises(ValueError, match="scaling"):
        M.magmax(scaling=float("nan"))
    with pytest.raises(TypeError, match="scaling"):
        M.magmax(scaling="1")


def test_streamed_merge_equals_in_memory(tmp_path):
    base, fts = models(3)
    T.assert_streamed_merge_equals_in_memory(tmp_path, base, fts, MAGMAX)
