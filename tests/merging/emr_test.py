"""EMR-merging: against a NumPy re-implementation of FusionBench's ``emr_merge``, properties."""

import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj

M = fj.merging
SHAPES = {"k": (7, 5), "b": (5,), "c": (2, 3, 4), "s": ()}


def models(seed, n=3):
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    fts = [
        {k: np.asarray(v + (0.1 + 0.2 * t) * rng.normal(size=np.shape(v)), np.float32)
         for k, v in base.items()}
        for t in range(n)
    ]
    return base, fts


def np_emr(base, fts, rescale="leaf_mean"):
    """FusionBench's emr_merge (fusion_bench/method/emr_merging/utils.py), in plain NumPy."""
    n = len(fts)
    tvs = [{k: f[k].astype(np.float64) - base[k] for k in base} for f in fts]
    unified, masks = {}, {}
    scales, new_scales = np.zeros(n), np.zeros(n)
    for k in base:
        total = sum(tv[k] for tv in tvs)
        flag = np.where(total > 0, 1.0, -1.0)  # zero counts as negative
        pmax = np.zeros_like(total)
        masks[k] = []
        for m in range(n):
            mask = tvs[m][k] * flag > 0
            masks[k].append(mask)
            pabs = np.abs(mask * tvs[m][k])
            pmax = np.where(pabs > pmax, pabs, pmax)
            agg = np.mean if rescale == "leaf_mean" else np.sum
            scales[m] += agg(np.abs(tvs[m][k]))
        unified[k] = pmax * flag
    for m in range(n):
        for k in unified:
            agg = np.mean if rescale == "leaf_mean" else np.sum
            new_scales[m] += agg(np.abs(unified[k] * masks[k][m]))
    return unified, masks, scales / new_scales


@pytest.mark.parametrize("seed,n,rescale", [(0, 3, "leaf_mean"), (1, 5, "leaf_mean"), (2, 4, "total")])
def test_matches_fusionbench_reference(seed, n, rescale):
    base, fts = models(seed, n)
    out = M.emr_merge(base, fts, rescale=rescale)
    uni, masks, lam = np_emr(base, fts, rescale)
    np.testing.assert_allclose(np.asarray(out.rescalers), lam, rtol=1e-5)
    for k in base:
        np.testing.assert_allclose(np.asarray(out.unified[k]), uni[k], rtol=1e-5, atol=1e-6)
        assert out.masks[k].dtype == jnp.bool_
        np.testing.assert_array_equal(np.asarray(out.masks[k]), np.stack(masks[k]))
        for t in range(n):
            model = M.emr_task_model(base, out, t)
            ref = base[k] + lam[t] * masks[k][t] * uni[k]
            np.testing.assert_allclose(np.asarray(model[k]), ref, rtol=1e-5, atol=1e-5)


def test_one_model_is_recovered_exactly_and_signs_agree():
    base, fts = models(3, n=1)
    out = M.emr_merge(base, fts)
    np.testing.assert_allclose(np.asarray(out.rescalers), [1.0], rtol=1e-6)
    rec = M.emr_task_model(base, out, 0)
    for k in base:
        np.testing.assert_allclose(np.asarray(rec[k]), fts[0][k], rtol=1e-6, atol=1e-6)
    base, fts = models(4, n=4)
    out = M.emr_merge(base, fts)
    for k in base:
        tv = np.stack([f[k] - base[k] for f in fts])
        u = np.asarray(out.unified[k])
        m = np.asarray(out.masks[k])
        # masked entries agree in sign with the unified vector, and |u| is the max of them
        assert np.all(np.sign(tv[m]) == np.sign(np.broadcast_to(u, tv.shape)[m]))
        assert np.all(np.abs(u) + 1e-7 >= np.max(np.where(m, np.abs(tv), 0), axis=0))


def test_rescaler_restores_the_l1_mass():
    base, fts = models(5, n=3)
    out = M.emr_merge(base, fts, rescale="total")
    for t in range(3):
        rec = M.emr_task_model(base, out, t)
        got = sum(np.abs(np.asarray(rec[k], np.float64) - base[k]).sum() for k in base)
        want = sum(np.abs(fts[t][k].astype(np.float64) - base[k]).sum() for k in base)
        np.testing.assert_allclose(got, want, rtol=1e-4)


def test_order_of_models_permutes_the_outputs():
    base, fts = models(6, n=3)
    a = M.emr_merge(base, fts)
    b = M.emr_merge(base, [fts[2], fts[0], fts[1]])
    np.testing.assert_allclose(np.asarray(b.rescalers), np.asarray(a.rescalers)[[2, 0, 1]], rtol=1e-6)
    for k in base:
        np.testing.assert_allclose(np.asarray(a.unified[k]), np.asarray(b.unified[k]), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(b.masks[k]), np.asarray(a.masks[k])[[2, 0, 1]])


def test_integer_leaves_pass_through():
    base, fts = models(7, n=2)
    base = {**base, "step": np.array(3, np.int32)}
    fts = [{**f, "step": np.array(3, np.int32)} for f in fts]
    out = M.emr_merge(base, fts)
    assert out.unified["step"] is None and out.masks["step"] is None
    assert int(M.emr_task_model(base, out, 1)["step"]) == 3


def test_bad_input():
    base, fts = models(8, n=2)
    with pytest.raises(ValueError, match="rescale"):
        M.emr_merge(base, fts, rescale="mean")
    with pytest.raises(ValueError, match="empty"):
        M.emr_merge(base, [])
    bad = {**fts[1], "k": np.zeros((5, 7), np.float32)}
    with pytest.raises(ValueError, match=r"finetuned\[1\] differs from base at \['k'\]"):
        M.emr_merge(base, [fts[0], bad])
    out = M.emr_merge(base, fts)
    with pytest.raises(ValueError, match="task"):
        M.emr_task_model(base, out, 2)
    with pytest.raises(TypeError, match="output"):
        M.emr_task_model(base, (out.unified, out.masks), 0)
