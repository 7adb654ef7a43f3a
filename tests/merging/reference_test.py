"""Each method against a short plain-NumPy version of its paper's rule."""

import itertools

import jax
import numpy as np
import pytest

import fusionjax as fj
from tests import _testing as T

K = jax.random.key


def np_models(seed=0, n=3):
    base = T.random_model(K(seed))
    fts = T.finetune_like(base, K(seed + 1), n)
    return base, fts


def leafwise_reference(base, fts, fn):
    """Applies ``fn(stacked_tv [T, ...] float64) -> merged tv`` per float leaf, in NumPy."""

    def one(b, *fs):
        if not np.issubdtype(b.dtype, np.floating):
            return b
        # task vectors in float32, as the library computes them, then float64.
        tv = np.stack([np.asarray(f, np.float32) - np.asarray(b, np.float32) for f in fs])
        return np.asarray(b, np.float64) + fn(tv.astype(np.float64))

    return jax.tree.map(one, base, *fts)


def np_topk_mask(tv, density):
    flat = np.abs(tv.reshape(tv.shape[0], -1))
    k = int(np.ceil(density * flat.shape[1]))
    thr = -np.sort(-flat, axis=1)[:, k - 1]
    return (np.abs(tv) >= thr.reshape((-1,) + (1,) * (tv.ndim - 1)))


def np_ties(tv, density, lam, merge="mean", mask=None):
    trimmed = tv * (np_topk_mask(tv, density) if mask is None else mask)
    sign = np.sign(trimmed.sum(0))
    agree = (np.sign(trimmed) == sign) & (sign != 0)
    kept = trimmed * agree
    if merge == "sum":
        return lam * kept.sum(0)
    return lam * kept.sum(0) / np.maximum(agree.sum(0), 1)


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_ties_matches_numpy(density, merge):
    base, fts = np_models()
    out = fj.merge(base, fts, fj.merging.ties(density=density, scaling=0.7, merge=merge))
    ref = leafwise_reference(base, fts, lambda tv: np_ties(tv, density, 0.7, merge))
    T.assert_trees_close(out, ref)


def test_ties_model_scope_matches_numpy():
    base, fts = np_models()
    density = 0.25
    tvs = fj.task_vectors(base, fts)
    per_model = [jax.tree.leaves(t) for t in tvs]
    leaves = [
        np.stack([np.asarray(x, np.float32).astype(np.float64) for x in ls])
        for ls in zip(*per_model, strict=True)
    ]
    flat = np.concatenate([np.abs(x.reshape(3, -1)) for x in leaves], axis=1)
    k = int(np.ceil(density * flat.shape[1]))
    thr = -np.sort(-flat, axis=1)[:, k - 1]
    out = fj.merge(base, fts, fj.merging.ties(density=density, scope="model"))

    def fn(tv):
        mask = np.abs(tv) >= thr.reshape((-1,) + (1,) * (tv.ndim - 1))
        return np_ties(tv, density, 1.0, mask=mask)

    T.assert_trees_close(out, leafwise_reference(base, fts, fn))


def test_trim_keeps_exactly_k_without_ties():
    tvs = fj.stack(fj.task_vectors(*np_models()))
    trimmed = fj.merging.trim(density=0.2)(tvs)
    kernel = np.asarray(trimmed["dense"]["kernel"]).reshape(3, -1)
    assert ((kernel != 0).sum(1) == int(np.ceil(0.2 * 32))).all()


def test_elect_sign_count_is_majority():
    x = np.array([[1.0, -1.0], [1.0, -1.0], [-5.0, 3.0]], np.float32)
    out = np.asarray(fj.merging.elect_sign(method="count")({"w": x})["w"])
    np.testing.assert_array_equal(out, [[1.0, -1.0], [1.0, -1.0], [0.0, 0.0]])
    mass = np.asarray(fj.merging.elect_sign(method="mass")({"w": x})["w"])
    # column 1 sums to +1, so the single positive entry wins by mass.
    np.testing.assert_array_equal(mass, [[0.0, 0.0], [0.0, 0.0], [-5.0, 3.0]])


def test_task_arithmetic_and_weighted_average_match_numpy():
    base, fts = np_models()
    out = fj.merge(base, fts, fj.merging.task_arithmetic(scaling=0.3))
    T.assert_trees_close(out, leafwise_reference(base, fts, lambda tv: 0.3 * tv.sum(0)))
    w = np.array([1.0, 2.0, 5.0], np.float32)
    out = fj.merge(base, fts, fj.merging.weighted_average(w))
    ref = leafwise_reference(base, fts, lambda tv: np.tensordot(w / w.sum(), tv, axes=1))
    T.assert_trees_close(out, ref)


@pytest.mark.parametrize("density,gamma", [(0.15, 0.01), (0.5, 0.1), (0.3, 0.0)])
def test_breadcrumbs_matches_numpy(density, gamma):
    base, fts = np_models()

    def fn(tv):
        flat = np.abs(tv.reshape(tv.shape[0], -1))
        n = flat.shape[1]
        k_top, k_keep = int(np.ceil(gamma * n)), int(np.ceil(density * n))
        srt = -np.sort(-flat, axis=1)
        top = srt[:, k_top - 1] if k_top > 0 else np.full(tv.shape[0], np.inf)
        end = srt[:, min(k_top + k_keep, n) - 1]
        shape = (-1,) + (1,) * (tv.ndim - 1)
        mask = (np.abs(tv) < top.reshape(shape)) & (np.abs(tv) >= end.reshape(shape))
        return 0.3 * (tv * mask).sum(0)

    out = fj.merge(base, fts, fj.merging.breadcrumbs(density=density, gamma=gamma, scaling=0.3))
    T.assert_trees_close(out, leafwise_reference(base, fts, fn))


def np_slerp(v0, v1, t, thr=0.9995):
    a, b = v0.ravel(), v1.ravel()
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    if abs(cos) > thr:
        return (1 - t) * v0 + t * v1
    om = np.arccos(cos)
    return (np.sin((1 - t) * om) * v0 + np.sin(t * om) * v1) / np.sin(om)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp_matches_numpy(t):
    base, fts = np_models(n=2)

    def weights(b, f0, f1):
        if not np.issubdtype(b.dtype, np.floating):
            return b
        return np_slerp(np.asarray(f0, np.float64), np.asarray(f1, np.float64), t)

    out = fj.merge(base, fts, fj.merging.slerp(t=t))
    T.assert_trees_close(out, jax.tree.map(weights, base, *fts))
    out = fj.merge(base, fts, fj.merging.slerp(t=t, space="task_vectors"))
    ref = leafwise_reference(base, fts, lambda tv: np_slerp(tv[0], tv[1], t))
    T.assert_trees_close(out, ref)


def test_slerp_keeps_norm_of_orthogonal_unit_vectors():
    v = fj.merging.slerp_arrays(np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32), 0.3)
    np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-6)
    np.testing.assert_allclose(v, [np.cos(0.3 * np.pi / 2), np.sin(0.3 * np.pi / 2)], rtol=1e-6)


def test_slerp_falls_back_to_lerp_when_collinear_or_zero():
    a = np.array([1.0, 2.0], np.float32)
    np.testing.assert_allclose(fj.merging.slerp_arrays(a, 3 * a, 0.5), 2 * a, rtol=1e-6)
    np.testing.assert_allclose(fj.merging.slerp_arrays(0 * a, a, 0.5), 0.5 * a, rtol=1e-6)


def test_model_stock_matches_numpy():
    base, fts = np_models()

    def fn(tv):
        flat = tv.reshape(tv.shape[0], -1)
        n = len(flat)
        cos = np.mean(
            [flat[i] @ flat[j] / np.linalg.norm(flat[i]) / np.linalg.norm(flat[j])
             for i, j in itertools.combinations(range(n), 2)]
        )
        cos = max(cos, 0.0)
        t = n * cos / (1 + (n - 1) * cos)
        return t * tv.mean(0)

    T.assert_trees_close(fj.merge(base, fts, fj.merging.model_stock()), leafwise_reference(base, fts, fn))


def test_model_stock_two_orthogonal_models_from_paper_geometry():
    # Two unit task vectors at 60 degrees: cos=0.5, t = 2*0.5/(1+0.5) = 2/3.
    base = {"w": np.zeros(2, np.float32)}
    fts = [{"w": np.array([1.0, 0.0], np.float32)}, {"w": np.array([0.5, np.sqrt(3) / 2], np.float32)}]
    out = fj.merge(base, fts, fj.merging.model_stock())
    np.testing.assert_allclose(out["w"], (2 / 3) * np.array([0.75, np.sqrt(3) / 4]), rtol=1e-6)


@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.2, 0.0)])
def test_breadcrumbs_model_scope_matches_numpy(density, gamma):
    base, fts = np_models()
    tvs = fj.task_vectors(base, fts)
    per_model = [jax.tree.leaves(t) for t in tvs]
    flat = np.stack(
        [np.concatenate([np.abs(np.asarray(x, np.float64)).ravel() for x in leaves]) for leaves in per_model]
    )
    n = flat.shape[1]
    k_top, k_keep = int(np.ceil(gamma * n)), int(np.ceil(density * n))
    srt = -np.sort(-flat, axis=1)
    top = srt[:, k_top - 1] if k_top > 0 else np.full(3, np.inf)
    end = srt[:, min(k_top + k_keep, n) - 1]

    def fn(tv):
        shape = (-1,) + (1,) * (tv.ndim - 1)
        mask = (np.abs(tv) < top.reshape(shape)) & (np.abs(tv) >= end.reshape(shape))
        return 0.3 * (tv * mask).sum(0)

    m = fj.merging.breadcrumbs(density=density, gamma=gamma, scaling=0.3, scope="model")
    T.assert_trees_close(fj.merge(base, fts, m), leafwise_reference(base, fts, fn))
