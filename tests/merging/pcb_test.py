"""PCB-merging: against a NumPy re-implementation of the reference code, properties, search."""

import jax
import numpy as np
import pytest

import fusionjax as fj
from tests import _testing as T

M = fj.merging
# One set of leaf shapes for most tests: each distinct (shape, model count) is one compile.
# "b" has 30 entries so that every ratio of the reference test keeps at least one.
SHAPES = {"k": (12, 9), "b": (30,), "c": (2, 3, 4), "s": ()}


def models(seed, n=3, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    fts = [
        {k: np.asarray(v + (0.2 + 0.3 * t) * rng.normal(size=np.shape(v)), np.float32)
         for k, v in base.items()}
        for t in range(n)
    ]
    return base, fts


# -- NumPy reference: the semantics of duguodong7/pcb-merging (pcb-merging.py, pcb_ES.py) ----


def np_minmax(x):
    lo = x.min(axis=1, keepdims=True)
    hi = x.max(axis=1, keepdims=True)
    return (x - lo) / (hi - lo)


def np_clamp(x, min_ratio, max_ratio):
    d = x.shape[1]
    s = np.sort(x, axis=1)
    lo = s[:, int(d * min_ratio)][:, None]
    hi = s[:, int(d * (1 - max_ratio) - 1)][:, None]
    return np.clip(x, lo, hi)


def np_pcb_row(tv, ratio, outlier=1e-4, inter="sum"):
    """tv: [T, d] float64 -> merged [d], as the reference on one flattened row per task."""
    n = tv.shape[0]
    a = np_clamp(np.abs(tv), outlier, outlier)
    clamped = np.sign(tv) * a
    intra = np.exp(n * np_minmax(a) ** 2)
    if inter == "sum":
        cross = np.tanh(tv * tv.sum(axis=0))
    else:
        nrm = np.sign(tv) * np_minmax(a)
        cross = np.stack([np.tanh(nrm[i] * nrm).sum(axis=0) for i in range(n)])
    beta = intra * cross
    w = np_minmax(np_clamp(beta, 1 - ratio, 0))
    return (clamped * w).sum(axis=0) / np.maximum(w.sum(axis=0), 1e-12)


def np_pcb(base, fts, ratio, scaling=1.0, outlier=1e-4, inter="sum"):
    out = {}
    for k in base:
        tv = np.stack([f[k].astype(np.float64) - base[k] for f in fts]).reshape(len(fts), -1)
        merged = np_pcb_row(tv, ratio, outlier, inter).reshape(np.shape(base[k]))
        out[k] = base[k] + scaling * merged
    return out


def close(out, ref, rtol=2e-5, atol=2e-5):
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k], np.float64), ref[k], rtol=rtol, atol=atol,
                                   err_msg=k)


@pytest.mark.parametrize("ratio,inter,outlier", [(0.1, "sum", 1e-4), (0.3, "sum", 0.05),
                                                 (0.5, "pairwise", 0.01), (1.0, "sum", 1e-4)])
def test_matches_numpy_reference_per_leaf(ratio, inter, outlier):
    # Leaves of at least 1/ratio entries: below that the reference's cut is the maximum
    # and its min-max divides 0 by 0 (see test_a_leaf_too_small_to_keep_anything).
    base, fts = models(0, shapes={k: v for k, v in SHAPES.items() if k != "s"})
    out = fj.merge(base, fts, M.pcb_merging(ratio=ratio, scaling=0.7, outlier=outlier, inter=inter))
    close(out, np_pcb(base, fts, ratio, 0.7, outlier, inter))


def test_whole_model_reference_on_a_single_leaf_model():
    # The reference flattens the whole model: on a one-leaf model the two scopes agree.
    # 4800 entries: past 4096 the order statistics take the radix-select path.
    base, fts = models(1, n=4, shapes={"w": (80, 60)})
    close(fj.merge(base, fts, M.pcb_merging(ratio=0.05)), np_pcb(base, fts, 0.05))


def test_a_leaf_too_small_to_keep_anything():
    # d * ratio < 1: every score is clipped to the maximum, the weights have no range.
    # The reference gives NaN there; here the leaf's update is 0.
    base, fts = models(9, shapes={"b": (5,), "s": ()})
    out = fj.merge(base, fts, M.pcb_merging(ratio=0.1))
    for k in base:
        np.testing.assert_array_equal(np.asarray(out[k]), base[k])
    with np.errstate(invalid="ignore"):
        assert np.isnan(np_pcb(base, fts, 0.1)["b"]).all()


def test_drops_all_but_the_kept_fraction():
    base, fts = models(2, n=1, shapes={"w": (50, 20)})
    # One model: the merged update is the clamped task vector wherever its weight is > 0,
    # and 0 on the entries at or below the cut: at most ratio * d survive.
    out = fj.merge(base, fts, M.pcb_merging(ratio=0.2))
    moved = np.count_nonzero(np.asarray(out["w"]) != base["w"])
    assert 0 < moved <= 200


def test_identity_and_equal_models():
    base, fts = models(3)
    same = fj.merge(base, [base] * 3, M.pcb_merging())
    for k in base:  # nothing moved: the weights are 0, the update is 0 (no NaN)
        np.testing.assert_array_equal(np.asarray(same[k]), base[k])
    # k copies of one model: the weighted average of equal rows is that row (clamped).
    one = fj.merge(base, [fts[0]], M.pcb_merging(ratio=0.3))
    three = fj.merge(base, [fts[0]] * 3, M.pcb_merging(ratio=0.3))
    T.assert_trees_close(one, three, rtol=1e-6, atol=1e-6)


def test_order_invariance():
    base, fts = models(4)
    a = fj.merge(base, fts, M.pcb_merging(ratio=0.2))
    b = fj.merge(base, [fts[2], fts[0], fts[1]], M.pcb_merging(ratio=0.2))
    T.assert_trees_close(a, b, rtol=1e-6, atol=1e-6)


def test_scaling_is_linear():
    base, fts = models(5)
    one = fj.merge(base, fts, M.pcb_merging(scaling=1.0))
    half = fj.merge(base, fts, M.pcb_merging(scaling=0.5))
    for k in base:
        np.testing.assert_allclose(np.asarray(half[k]) - base[k],
                                   0.5 * (np.asarray(one[k]) - base[k]), rtol=1e-5, atol=1e-6)


def test_streamed_merge_equals_in_memory(tmp_path):
    base, fts = models(6, shapes={k: SHAPES[k] for k in ("k", "b")})
    merger = M.pcb_merging(ratio=0.2)
    T.assert_streamed_merge_equals_in_memory(tmp_path, base, fts, merger)


@pytest.mark.parametrize("kw,name", [({"ratio": 0.0}, "ratio"), ({"ratio": 1.5}, "ratio"),
                                     ({"outlier": 0.5}, "outlier"), ({"outlier": -0.1}, "outlier"),
                                     ({"inter": "max"}, "inter")])
def test_bad_hyperparameters_name_the_parameter(kw, name):
    with pytest.raises(ValueError, match=name):
        M.pcb_merging(**kw)


def test_search_grid_and_evolution():
    base, fts = models(7, shapes={"w": (8, 6)})
    target = np_pcb(base, fts, 0.5, 1.3)["w"]

    def score(p):  # best at a common scaling of 1.3
        return -float(np.sum((np.asarray(p["w"], np.float64) - target) ** 2))

    out = M.pcb_scaling_search(base, fts, score, ratio=0.5, grid=(0.5, 1.0, 1.5), num_steps=0)
    assert out.scalings.tolist() == [1.5] * 3 and len(out.history) == 3
    es = M.pcb_scaling_search(base, fts, score, ratio=0.5, grid=(0.5, 1.0, 1.5), num_steps=30,
                              step_size=0.1, key=jax.random.key(0))
    assert len(es.history) == 33
    assert es.score >= out.score  # elitist: never worse than the grid's best
    assert es.score == max(s for _, s in es.history)
    np.testing.assert_allclose(score(es.params), es.score, rtol=1e-6)
    # the search's model at common scalings is pcb_merging's
    same = M.pcb_scaling_search(base, fts, score, ratio=0.5, grid=(1.3,), num_steps=0)
    close(same.params, {"w": target})


def test_search_bad_input():
    base, fts = models(8, shapes={"w": (4, 3)})
    with pytest.raises(ValueError, match="key"):
        M.pcb_scaling_search(base, fts, lambda p: 0.0, num_steps=2)
    with pytest.raises(ValueError, match="bounds"):
        M.pcb_scaling_search(base, fts, lambda p: 0.0, num_steps=0, bounds=(1.0, 1.0))
    with pytest.raises(ValueError, match="grid"):
        M.pcb_scaling_search(base, fts, lambda p: 0.0, grid=(), num_steps=0)
    with pytest.raises(ValueError, match="step_size"):
        M.pcb_scaling_search(base, fts, lambda p: 0.0, step_size=0.0, num_steps=0)
    with pytest.raises(TypeError, match="score"):
        M.pcb_scaling_search(base, fts, 3.0, num_steps=0)
    bad = {"w": np.zeros((3, 4), np.float32)}
    with pytest.raises(ValueError, match=r"finetuned\[1\] differs from base at \['w'\]"):
        M.pcb_scaling_search(base, [fts[0], bad], lambda p: 0.0, num_steps=0)
