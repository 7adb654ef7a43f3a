"""WIDEN: against a NumPy re-implementation of the reference (yule-BUAA/MergeLLM), properties."""

import numpy as np
import pytest

import fusionjax as fj
from tests import _testing as T

M = fj.merging


def models(seed, n=3, shapes=None):
    shapes = shapes or {"w": (6, 10), "b": (6,)}  # "w" in torch layout [out, in]
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    fts = [
        {k: np.asarray(v + (0.05 + 0.1 * t) * rng.normal(size=np.shape(v)), np.float32)
         for k, v in base.items()}
        for t in range(n)
    ]
    return base, fts


def np_softmax0(x):
    e = np.exp(x - x.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def np_scores(sig, ratio, calib, temp=1.0):
    scores = np_softmax0(sig / temp)
    mask = sig > sig.mean(axis=1, keepdims=True) * ratio
    scores[mask] = calib
    return scores


def np_rank(diff):
    """Within-model significance: position in a stable ascending sort, divided by n."""
    n = diff.shape[1]
    out = np.zeros_like(diff)
    for t in range(diff.shape[0]):
        order = np.argsort(diff[t], kind="stable")
        out[t, order] = np.arange(n) / n
    return out


def np_widen(base, fts, ratio=1.0, calib=1.0, temp=1.0):
    """The reference's widen_merging on torch-layout weights ([out, in]) and 1-D vectors."""
    out = {}
    for k in base:
        b = base[k].astype(np.float64)
        ft = np.stack([f[k].astype(np.float64) for f in fts])
        tv = ft - b
        if b.ndim == 2:
            m0 = np.linalg.norm(b, axis=0)
            d0 = b / m0
            dm, dd = [], []
            for t in range(len(fts)):
                mt = np.linalg.norm(ft[t], axis=0)
                dt = ft[t] / mt
                dm.append(np.abs(mt - m0))
                cos = (dt * d0).sum(axis=0) / np.maximum(
                    np.linalg.norm(dt, axis=0) * np.linalg.norm(d0, axis=0), 1e-8)
                dd.append(1.0 - cos)
            sm = np_scores(np_rank(np.stack(dm)), ratio, calib, temp)
            sd = np_scores(np_rank(np.stack(dd)), ratio, calib, temp)
            w = 0.5 * (sm + sd)
            out[k] = b + (tv * w[:, None, :]).sum(axis=0)
        else:
            w = np_scores(np.abs(tv).reshape(len(fts), -1), ratio, calib, temp).reshape(tv.shape)
            out[k] = b + (tv * w).sum(axis=0)
    return out


def close(out, ref, rtol=2e-5, atol=2e-5):
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k], np.float64), ref[k], rtol=rtol, atol=atol,
                                   err_msg=k)


@pytest.mark.parametrize("seed,n,ratio,calib,temp", [(0, 3, 1.0, 1.0, 1.0), (1, 4, 1.2, 0.8, 1.0),
                                                     (2, 2, 0.9, 1.0, 0.5)])
def test_matches_reference_torch_and_flax_layouts(seed, n, ratio, calib, temp):
    base, fts = models(seed, n)
    ref = np_widen(base, fts, ratio, calib, temp)
    kw = dict(above_average_ratio=ratio, score_calibration=calib, temperature=temp)
    close(fj.merge(base, fts, M.widen(axis=0, **kw)), ref)
    # flax layout: the same weights transposed to [in, out], norm over the last axis
    tr = lambda p: {"w": p["w"].T.copy(), "b": p["b"]}  # noqa: E731
    got = fj.merge(tr(base), [tr(f) for f in fts], M.widen(axis=-1, **kw))
    close({"w": np.asarray(got["w"]).T, "b": got["b"]}, ref)


def test_identity_and_order():
    base, fts = models(3)
    same = fj.merge(base, [base] * 3, M.widen())
    for k in base:
        np.testing.assert_array_equal(np.asarray(same[k]), base[k])
    a = fj.merge(base, fts, M.widen())
    b = fj.merge(base, [fts[1], fts[2], fts[0]], M.widen())
    T.assert_trees_close(a, b, rtol=1e-6, atol=1e-6)


def test_one_model_keeps_its_changed_columns():
    # One model: softmax over one model is 1 and the calibrated score is 1, so every
    # weight is 1 and the model comes back.
    base, fts = models(4, n=1)
    close(fj.merge(base, fts, M.widen()), {k: v.astype(np.float64) for k, v in fts[0].items()})


def test_calibration_scales_the_above_average_columns():
    base, fts = models(5, n=2, shapes={"b": (64,)})
    zero = fj.merge(base, fts, M.widen(score_calibration=0.0))
    one = fj.merge(base, fts, M.widen(score_calibration=1.0))
    tv = np.stack([f["b"] - base["b"] for f in fts])
    above = np.abs(tv) > np.abs(tv).mean(axis=1, keepdims=True)
    # with s = 0 an entry that is above average in every model does not move
    both = above.all(axis=0)
    np.testing.assert_allclose(np.asarray(zero["b"])[both], base["b"][both], atol=1e-7)
    assert not np.allclose(np.asarray(one["b"])[both], base["b"][both])


def test_streamed_merge_equals_in_memory(tmp_path):
    base, fts = models(6)
    T.assert_streamed_merge_equals_in_memory(tmp_path, base, fts, M.widen())


@pytest.mark.parametrize("kw,name", [({"above_average_ratio": 0.0}, "above_average_ratio"),
                                     ({"score_calibration": -1.0}, "score_calibration"),
                                     ({"temperature": 0.0}, "temperature"),
                                     ({"axis": 2}, "axis")])
def test_bad_hyperparameters_name_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        M.widen(**kw)
