"""VaRM (FuseChat v1): per-matrix weights from the mean squared update, against NumPy."""

import numpy as np
import pytest

import fusionjax as fj
from tests import _testing as T

M = fj.merging
SHAPES = {"k": (6, 5), "c": (2, 3, 4), "s": ()}


def models(seed, n=3):
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    # models move by different amounts, so the weights differ from 1/T
    fts = [
        {
            k: np.asarray(v + (0.1 + 0.3 * t) * rng.normal(size=v.shape), np.float32)
            for k, v in base.items()
        }
        for t in range(n)
    ]
    return base, fts


def np_varm(base, fts):
    out = {}
    for k in base:
        tv = np.stack([f[k].astype(np.float64) - base[k].astype(np.float64) for f in fts])
        ms = (tv**2).reshape(len(fts), -1).mean(axis=1)
        w = ms / ms.sum() if ms.sum() >= 1e-12 else np.full(len(fts), 1 / len(fts))
        out[k] = base[k] + np.tensordot(w, tv, axes=1)
    return out


def close(out, ref, **tol):
    tol = tol or dict(rtol=2e-5, atol=2e-5)
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k], np.float64), ref[k], err_msg=k, **tol)


@pytest.mark.parametrize("seed,n", [(0, 3), (1, 3)])
def test_matches_numpy_reference(seed, n):
    base, fts = models(seed, n)
    close(fj.merge(base, fts, M.varm()), np_varm(base, fts))


def test_weights_follow_the_update_size():
    base = {"w": np.zeros(4, np.float32)}
    a = {"w": np.ones(4, np.float32)}
    b = {"w": np.full(4, 3.0, np.float32)}
    # mean squares 1 and 9: weights 0.1 and 0.9 -> 0.1 * 1 + 0.9 * 3 = 2.8
    np.testing.assert_allclose(np.asarray(fj.merge(base, [a, b], M.varm())["w"]), 2.8, rtol=1e-6)


def test_identity_and_zero_task_vectors():
    base, fts = models(3)
    theta = fts[1]
    for k in (1, 3):
        close(fj.merge(base, [theta] * k, M.varm()), {k_: v.astype(np.float64) for k_, v in theta.items()})
    same = {k: v.astype(np.float64) for k, v in base.items()}
    close(fj.merge(base, [base] * 3, M.varm()), same, rtol=0, atol=0)
    # one model leaves a leaf untouched: that leaf's weight is 0, the other model owns it
    part = {**fts[0], "k": base["k"]}
    out = fj.merge(base, [part, fts[2], fts[2]], M.varm())
    np.testing.assert_allclose(np.asarray(out["k"]), fts[2]["k"], rtol=1e-6, atol=1e-6)


def test_order_invariance():
    base, fts = models(4)
    a = fj.merge(base, fts, M.varm())
    b = fj.merge(base, [fts[2], fts[0], fts[1]], M.varm())
    T.assert_trees_close(a, b, rtol=1e-6, atol=1e-6)


def test_a_step_of_the_chain():
    base, fts = models(5)
    ref = np_varm(base, fts)
    # followed by a scaling of the merged task vector
    out = fj.merge(base, fts, fj.chain(M.varm(), M.scale(0.5)))
    close(out, {k: base[k] + 0.5 * (ref[k] - base[k]) for k in base})


def test_streamed_merge_equals_in_memory(tmp_path):
    base, fts = models(6)
    T.assert_streamed_merge_equals_in_memory(tmp_path, base, fts, M.varm())


def test_bad_input_names_the_model():
    base, fts = models(7)
    bad = {**fts[1], "k": np.zeros((5, 6), np.float32)}
    with pytest.raises(ValueError, match=r"finetuned\[1\] differs from base at \['k'\]"):
        fj.merge(base, [fts[0], bad], M.varm())
