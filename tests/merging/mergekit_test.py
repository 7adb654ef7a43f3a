"""mergekit's methods and options against short NumPy versions written from mergekit 0.1.5.

Each reference below follows mergekit's source (torch code in
``mergekit/merge_methods/*.py`` and ``mergekit/sparsify.py``), re-expressed in NumPy
float64 on the float32 task vectors the library computes.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from tests import _testing as T

M = fj.merging
SHAPES = {"k": (6, 5), "b": (5,), "c": (2, 3, 4)}


def models(seed, n=3, scale=0.3):
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    fts = [
        {k: (v + scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in base.items()}
        for _ in range(n)
    ]
    return base, fts


def tvs_of(base, fts, k):
    return np.stack([np.float32(f[k]) - np.float32(base[k]) for f in fts]).astype(np.float64)


def close(out, ref, **tol):
    tol = tol or dict(rtol=2e-5, atol=2e-5)
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k], np.float64), ref[k], err_msg=k, **tol)


# -- references ---------------------------------------------------------------


def np_nuslerp(t, v0, v1, axis=-1, flatten=True, eps=1e-8):
    shape = v0.shape
    if flatten or v0.ndim <= 1:
        v0, v1 = v0.reshape(1, -1), v1.reshape(1, -1)
    else:
        v0, v1 = np.moveaxis(v0, axis, -1), np.moveaxis(v1, axis, -1)

    def unit(v):
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-7)

    cos = np.clip(np.sum(unit(v0) * unit(v1), -1, keepdims=True), -1, 1)
    col = 1 - cos**2 <= eps**2
    th = np.arccos(np.where(col, 0, cos))
    with np.errstate(invalid="ignore", divide="ignore"):
        res = (np.sin((1 - t) * th) * v0 + np.sin(t * th) * v1) / np.sin(th)
    res = np.where(col, (1 - t) * v0 + t * v1, res)
    if not (flatten or len(shape) <= 1):
        res = np.moveaxis(res, -1, axis)
    return res.reshape(shape)


def np_multislerp(vs, w, normalize=True, eps=1e-8):
    vs = np.stack(vs)
    flat = vs.reshape(len(vs), -1)
    w = np.asarray(w, np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.linalg.norm(flat, axis=-1, keepdims=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / np.linalg.norm(mean)
    dots = (units * mean).sum(-1, keepdims=True)
    tangent = ((units - dots * mean) * w[:, None]).sum(0)
    tn = np.linalg.norm(tangent) + eps
    res = mean * np.cos(tn) + tangent * np.sin(tn) / tn
    return (res * (norms[:, 0] * w).sum()).reshape(vs.shape[1:])


def np_karcher(vs, alphas, max_iter=10, tol=1e-5):
    norms = [np.linalg.norm(v) for v in vs]
    units = [v / n if n > 0 else 0 * v for v, n in zip(vs, norms, strict=False)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    a = np.array([alphas[i] for i in valid])
    a = a / a.sum()
    us = [units[i] for i in valid]
    u = sum(ai * ui for ai, ui in zip(a, us, strict=False))
    u = us[0].copy() if np.linalg.norm(u) < tol else u / np.linalg.norm(u)
    for _ in range(max_iter):
        g = np.zeros_like(u)
        for ai, ui in zip(a, us, strict=False):
            dot = np.clip(np.sum(u * ui), -1, 1)
            th = np.arccos(dot)
            if th < tol:
                continue
            g += ai * th / np.sin(th) * (ui - dot * u)
        gn = np.linalg.norm(g)
        if gn < tol:
            break
        u = np.cos(gn) * u + np.sin(gn) * g / gn
        un = np.linalg.norm(u)
        if un > tol:
            u = u / un
    return sum(al * n for al, n in zip(alphas, norms, strict=False)) * u


def np_sce(tv, density):
    if density < 1:
        var = tv.var(0)
        k = int(np.count_nonzero(var) * density)
        mask = np.zeros(var.size)
        mask[np.argsort(-var.ravel(), kind="stable")[:k]] = 1
        tv = tv * mask.reshape(var.shape)
    maj = np.where(tv.sum(0) >= 0, 1.0, -1.0)
    erase = np.sign(tv) == maj
    w = (tv**2).reshape(len(tv), -1).mean(1)
    w = np.full(len(tv), 1 / len(tv)) if abs(w.sum()) < 1e-6 else w / w.sum()
    ew = w.reshape((-1,) + (1,) * (tv.ndim - 1)) * erase
    return (tv * ew).sum(0) / np.maximum(ew.sum(0), 1e-6)


def np_arcee(a, b):
    def softmax(v):
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(b) + 1e-8, softmax(a) + 1e-8
    imp = np.abs(b - a) * np.sum(p * np.log(p / q), -1, keepdims=True)
    s = np.sort(imp.ravel())
    idx = [int(np.float32(q) * np.float32(s.size - 1)) for q in (0.25, 0.5, 0.75)]
    thr = s[idx[1]] + 1.5 * (s[idx[2]] - s[idx[0]])
    return a + (b - a) * (imp >= thr)


def np_magnitude(tv, density, rescale=False):
    """mergekit's ``sparsify.magnitude`` on one task vector."""
    if density >= 1:
        return tv
    k = max(1, int(density * tv.size))
    mask = np.zeros(tv.size)
    mask[np.argsort(-np.abs(tv.ravel()), kind="stable")[:k]] = 1
    return np_rescale(tv, tv * mask.reshape(tv.shape), rescale)


def np_outliers(tv, density, gamma, rescale=False):
    """mergekit's ``sparsify.magnitude_outliers`` on one task vector."""
    if density >= 1:
        return tv
    n = tv.size
    target, top = int(density * n), int(gamma * n)
    bot = max(0, n - target - top)
    mask = np.zeros(n)
    mask[np.argsort(np.abs(tv.ravel()), kind="stable")[bot : bot + target]] = 1
    return np_rescale(tv, tv * mask.reshape(tv.shape), rescale)


def np_rescale(tv, masked, rescale):
    if not rescale:
        return masked
    before, after = np.abs(tv).sum(), np.abs(masked).sum()
    return masked if before < 1e-7 or after < 1e-7 else masked * before / after


def np_gta(tv, weights, sparsify, consensus, normalize, lam):
    """mergekit's ``GeneralizedTaskArithmeticMerge`` on stacked task vectors."""
    d = np.stack([sparsify(x) for x in tv])
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (tv.ndim - 1))
    wd = d * w
    if consensus:
        maj = np.where(wd.sum(0) >= 0, 1.0, -1.0)
        mask = np.sign(wd) == maj
        mixed = (wd * mask).sum(0)
        div = (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = wd.sum(0)
        div = w.sum(0) * np.ones(tv.shape[1:])
        div[np.abs(div) < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    return lam * mixed


# -- new methods against the references --------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_nuslerp_matches_reference(seed):
    base, fts = models(seed, n=2)
    w = [0.7, 1.3]
    t = w[1] / sum(w)
    out = fj.merge(base, fts, M.nuslerp(weights=w))
    close(out, {k: np_nuslerp(t, fts[0][k].astype(np.float64), fts[1][k].astype(np.float64))
                for k in base})
    out = fj.merge(base, fts, M.nuslerp(t=t, flatten=False, axis=0, space="task_vectors"))
    ref = {}
    for k in base:
        tv = tvs_of(base, fts, k)
        ref[k] = base[k] + np_nuslerp(t, tv[0], tv[1], axis=0, flatten=False)
    close(out, ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_multislerp_matches_reference(seed):
    base, fts = models(seed)
    w = [0.5, 1.0, 2.0]
    out = fj.merge(base, fts, M.multislerp(weights=w))
    close(out, {k: np_multislerp([f[k].astype(np.float64) for f in fts], w) for k in base})
    out = fj.merge(base, fts, M.multislerp(weights=w, space="task_vectors"))
    close(out, {k: base[k] + np_multislerp(list(tvs_of(base, fts, k)), w) for k in base})


@pytest.mark.parametrize("seed", [0, 1])
def test_karcher_matches_reference(seed):
    base, fts = models(seed, scale=1.0)
    zero = {k: np.zeros_like(v) for k, v in base.items()}  # no base: exact round trip
    out = fj.merge(zero, fts, M.karcher(max_iter=10, tol=1e-5))
    ref = {k: np_karcher([f[k].astype(np.float64) for f in fts], [1 / 3] * 3) for k in base}
    close(out, ref, rtol=1e-4, atol=1e-5)
    out = fj.merge(zero, fts, M.karcher(max_iter=1))
    close(out, {k: np_karcher([f[k].astype(np.float64) for f in fts], [1 / 3] * 3, max_iter=1)
                for k in base}, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_nearswap_matches_reference(seed):
    base, fts = models(seed, n=1)
    t = 0.2
    out = fj.merge(base, fts, M.nearswap(t=t))
    ref = {}
    for k in base:
        a, b = base[k].astype(np.float64), fts[0][k].astype(np.float64)
        w = np.clip(t / np.maximum(np.abs(a - b), 1e-6), 0, 1)
        ref[k] = w * b + (1 - w) * a
    close(out, ref)


@pytest.mark.parametrize("seed,density", [(0, 1.0), (1, 0.5), (2, 0.1)])
def test_sce_matches_reference(seed, density):
    base, fts = models(seed)
    out = fj.merge(base, fts, M.sce(density=density))
    close(out, {k: base[k] + np_sce(tvs_of(base, fts, k), density) for k in base})


@pytest.mark.parametrize("seed", [0, 1])
def test_arcee_fusion_matches_reference(seed):
    base, fts = models(seed, n=1)
    out = fj.merge(base, fts, M.arcee_fusion())
    close(out, {k: np_arcee(base[k].astype(np.float64), fts[0][k].astype(np.float64))
                for k in base})


# -- mergekit conventions reproduce mergekit exactly ---------------------------


@pytest.mark.parametrize("seed,normalize", [(0, True), (1, False)])
def test_ties_mergekit_matches_gta(seed, normalize):
    base, fts = models(seed)
    w, dens = [1.0, 0.5, 2.0], [0.3, 0.5, 0.05]
    step = M.ties(density=dens, weights=w, scaling=0.8, merge="mean" if normalize else "sum",
                  rescale="l1", convention="mergekit")
    out = fj.merge(base, fts, step)
    ref = {}
    for k in base:
        tv = tvs_of(base, fts, k)
        sp = iter([lambda x, d=d: np_magnitude(x, d, rescale=True) for d in dens])
        ref[k] = base[k] + np_gta(tv, w, lambda x, sp=sp: next(sp)(x), True, normalize, 0.8)
    close(out, ref)


@pytest.mark.parametrize("density,gamma", [(0.3, 0.1), (0.9, 0.2), (1.0, 0.1)])
def test_breadcrumbs_mergekit_matches_gta(density, gamma):
    base, fts = models(3)
    w = [1.0, 2.0, 0.5]
    for consensus, step in [
        (False, M.breadcrumbs(density=density, gamma=gamma, scaling=1.0, weights=w,
                              convention="mergekit")),
        (True, M.breadcrumbs_ties(density=density, gamma=gamma, weights=w,
                                  convention="mergekit")),
    ]:
        out = fj.merge(base, fts, step)
        ref = {k: base[k] + np_gta(tvs_of(base, fts, k), w,
                                   lambda x: np_outliers(x, density, gamma), consensus, False, 1.0)
               for k in base}
        close(out, ref)


def test_mergekit_counts_keep_exactly_k_with_ties_by_index():
    x = np.array([[1.0, -1.0, 1.0, 1.0, 0.5, -2.0, 1.0, 0.1]], np.float32)
    out = np.asarray(M.trim(density=0.25, count="mergekit")({"w": x})["w"])
    # k = max(1, int(0.25 * 8)) = 2: -2 and the first of the tied 1s (index 0).
    np.testing.assert_array_equal(out, [[1.0, 0, 0, 0, 0, -2.0, 0, 0]])
    out = np.asarray(M.trim(density=0.25)({"w": x})["w"])  # ceil, ties kept
    assert (out != 0).sum() == 6
    out = np.asarray(M.trim(density=0.01, count="mergekit")({"w": x})["w"])
    assert (out != 0).sum() == 1  # max(1, int(0.08)) = 1
    # breadcrumbs: int() of both fractions; ascending ranks, ties by index.
    out = np.asarray(M.drop_extremes(density=0.5, gamma=0.125, count="mergekit")({"w": x})["w"])
    ref = np_outliers(x[0].astype(np.float64), 0.5, 0.125)
    np.testing.assert_array_equal(out[0], ref)
    assert (out != 0).sum() == 4


def test_l1_rescale_keeps_each_tensor_l1_norm():
    base, fts = models(4)
    tvs = {"k": jax.device_put(tvs_of(base, fts, "k").astype(np.float32))}
    key = jax.random.key(0)
    a = M.drop_and_rescale(drop_rate=0.6, rescale="l1")(tvs, key=key)
    b = M.drop_and_rescale(drop_rate=0.6)(tvs, key=key)
    c = M.drop_and_rescale(drop_rate=0.6, rescale="none")(tvs, key=key)
    for k in tvs:
        x, ya, yb, yc = (np.asarray(v[k], np.float64) for v in (tvs, a, b, c))
        axes = tuple(range(1, x.ndim))
        np.testing.assert_allclose(np.abs(ya).sum(axes), np.abs(x).sum(axes), rtol=1e-5)
        np.testing.assert_array_equal(ya != 0, yb != 0)  # the same mask
        np.testing.assert_allclose(yc, np.where(yb != 0, x, 0), rtol=1e-6)  # unscaled
        np.testing.assert_allclose(yb, yc / 0.4, rtol=1e-5)  # 1/q
    d = M.magnitude_drop(density=0.5, epsilon=0.15, rescale="l1")(tvs, key=key)
    for k in tvs:
        x, y = np.asarray(tvs[k], np.float64), np.asarray(d[k], np.float64)
        axes = tuple(range(1, x.ndim))
        np.testing.assert_allclose(np.abs(y).sum(axes), np.abs(x).sum(axes), rtol=1e-5)


def test_della_rank_axis_groups_like_torch_dim1():
    from fusionjax.merging._sparsify import _ranks01

    # jitted (one program per call, not an eager program per op and shape)
    ranks01 = jax.jit(_ranks01, static_argnums=1)
    mag = np.abs(np.random.default_rng(0).normal(size=(2, 4, 6, 3))).astype(np.float32)
    r = np.asarray(ranks01(mag, 1))  # leaf axis 1 = stacked axis 2
    ref = np.argsort(np.argsort(mag, axis=2), axis=2) / 5
    np.testing.assert_allclose(r, ref, rtol=1e-6)
    # A flax Dense kernel (in, out) ranked per output unit (None) is torch's
    # (out, in) ranked along dim 1 (mergekit), transposed.
    k = np.abs(np.random.default_rng(1).normal(size=(2, 7, 3))).astype(np.float32)
    flax = np.asarray(ranks01(k, None))
    torch = np.asarray(ranks01(np.swapaxes(k, 1, 2), 1))
    np.testing.assert_allclose(flax, np.swapaxes(torch, 1, 2), rtol=1e-6)


def test_elect_sign_zero_conventions():
    # column 0 ties (+1, -1): drop -> zeroed; mergekit -> +1; FusionBench -> model majority.
    x = {"w": np.array([[1.0, 2.0, -3.0, -1.0], [-1.0, 1.0, -1.0, -1.0]], np.float32)}
    drop = np.asarray(M.elect_sign()(x)["w"])
    pos = np.asarray(M.elect_sign(zero="positive")(x)["w"])
    maj = np.asarray(M.elect_sign(zero="majority")(x)["w"])
    np.testing.assert_array_equal(drop[:, 0], [0, 0])
    np.testing.assert_array_equal(pos[:, 0], [1, 0])
    np.testing.assert_array_equal(maj[:, 0], [0, -1])  # elected signs +,-,- : majority -1
    np.testing.assert_array_equal(drop[:, 1:], pos[:, 1:])


def test_ties_merge_max_is_fusionbench():
    base, fts = models(5)
    out = fj.merge(base, fts, M.ties(density=0.4, merge="max"))
    ref = {}
    for k in base:
        tv = tvs_of(base, fts, k)
        n = tv[0].size
        kk = int(np.ceil(0.4 * n))
        thr = -np.sort(-np.abs(tv.reshape(3, -1)), 1)[:, kk - 1]
        trimmed = tv * (np.abs(tv) >= thr.reshape((-1,) + (1,) * (tv.ndim - 1)))
        sign = np.sign(trimmed.sum(0))
        sel = trimmed * (np.sign(trimmed) == sign)
        ref[k] = base[k] + np.abs(sel).max(0) * sign
    close(out, ref)


def test_model_stock_filter_wise_mergekit():
    base, fts = models(6)
    out = fj.merge(base, fts, M.model_stock(filter_wise=True, axis=-1, convention="mergekit"))
    ref = {}
    for k in base:
        w0 = base[k].astype(np.float64)
        ws = [w0 + tv for tv in tvs_of(base, fts, k)]
        offs = [w - w0 for w in ws]
        if w0.ndim == 1:
            offs = [o[None] for o in offs]
        cos = np.mean([np.clip((a * b).sum(-1) / np.maximum(
            np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-6), -1, 1)
            for a, b in itertools.combinations(offs, 2)], axis=0)[..., None]
        t = 3 * cos / (1 + 2 * cos)
        avg = sum(ws) / 3
        ref[k] = (t * (avg if w0.ndim > 1 else avg[None]) + (1 - t) * (
            w0 if w0.ndim > 1 else w0[None])).reshape(w0.shape)
    close(out, ref)


def test_slerp_zero_tensor_right_angle():
    base = {"w": np.zeros(3, np.float32)}
    v = np.array([1.0, 2.0, 2.0], np.float32)
    fts = [{"w": np.zeros(3, np.float32)}, {"w": v}]
    lerp = fj.merge(base, fts, M.slerp(t=0.3))["w"]
    mk = fj.merge(base, fts, M.slerp(t=0.3, convention="mergekit"))["w"]
    np.testing.assert_allclose(lerp, 0.3 * v, rtol=1e-6)
    np.testing.assert_allclose(mk, np.sin(0.3 * np.pi / 2) * v, rtol=1e-6)


# -- properties ---------------------------------------------------------------


def test_identity_copies_give_the_model():
    base, fts = models(7, n=1)
    m = fts[0]
    zero = {k: np.zeros_like(v) for k, v in base.items()}
    for b, step, n in [
        (base, M.nuslerp(t=0.3), 2),
        (base, M.nuslerp(t=0.3, flatten=False), 2),
        (base, M.multislerp(weights=[1.0, 2.0, 3.0]), 3),
        (zero, M.karcher(), 3),
        (base, M.sce(), 3),  # with density < 1, k = 0 positions of nonzero variance
    ]:
        close(fj.merge(b, [m] * n, step), {k: v.astype(np.float64) for k, v in m.items()},
              rtol=1e-5, atol=1e-5)
    same = {k: v.astype(np.float64) for k, v in base.items()}
    close(fj.merge(base, [base], M.nearswap(t=0.1)), same)
    close(fj.merge(base, [base], M.arcee_fusion()), same)


def test_endpoints_and_symmetry():
    base, fts = models(8, n=2)
    for t, want in [(0.0, fts[0]), (1.0, fts[1])]:
        for step in (M.nuslerp(t=t), M.nuslerp(t=t, flatten=False), M.slerp(t=t)):
            close(fj.merge(base, fts, step), {k: v.astype(np.float64) for k, v in want.items()},
                  rtol=1e-5, atol=1e-5)
    a = fj.merge(base, fts, M.nuslerp(t=0.3, flatten=False))
    b = fj.merge(base, fts[::-1], M.nuslerp(t=0.7, flatten=False))
    T.assert_trees_close(a, b, rtol=1e-5, atol=1e-5)
    base, fts = models(9)
    zero = {k: np.zeros_like(v) for k, v in base.items()}
    perm = [fts[2], fts[0], fts[1]]
    for f in (lambda w: M.karcher(weights=w), lambda w: M.multislerp(weights=w)):
        a = fj.merge(zero, fts, f([1.0, 2.0, 3.0]))
        b = fj.merge(zero, perm, f([3.0, 1.0, 2.0]))
        T.assert_trees_close(a, b, rtol=1e-4, atol=1e-5)
    a = fj.merge(base, fts, M.sce(density=0.6))
    T.assert_trees_close(a, fj.merge(base, perm, M.sce(density=0.6)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: M.nearswap(t=-1.0), "t"),
        (lambda: M.karcher(max_iter=0), "max_iter"),
        (lambda: M.karcher(tol=0.0), "tol"),
        (lambda: M.multislerp(space="sphere"), "space"),
        (lambda: M.nuslerp(t=0.5, weights=[1.0, 1.0]), "weights"),
        (lambda: M.sce(density=1.5), "density"),
        (lambda: M.ties(convention="torch"), "convention"),
        (lambda: M.ties(merge="median"), "merge"),
        (lambda: M.trim(count="floor"), "count"),
        (lambda: M.trim(count="mergekit", scope="model"), "count"),
        (lambda: M.elect_sign(zero="nan"), "zero"),
        (lambda: M.drop_and_rescale(rescale="l2"), "rescale"),
        (lambda: M.della(density=0.9, convention="mergekit"), "epsilon"),
        (lambda: M.model_stock(convention="x"), "convention"),
    ],
)
def test_bad_hyperparameters_name_the_parameter(make, name):
    with pytest.raises((ValueError, TypeError), match=name):
        make()


def test_model_count_errors_name_the_method():
    base, fts = models(0)
    with pytest.raises(ValueError, match="nuslerp merges exactly 2"):
        fj.merge(base, fts, M.nuslerp())
    with pytest.raises(ValueError, match="nearswap merges one model"):
        fj.merge(base, fts, M.nearswap(t=0.1))
    with pytest.raises(ValueError, match="arcee_fusion merges one model"):
        fj.merge(base, fts, M.arcee_fusion())


def test_round_to_rounds_task_vectors_like_a_bf16_subtraction():
    base = {"w": np.array([1.0, 3.0, -2.0, 0.5], np.float32)}
    ft = {"w": np.array([1.0078125, 2.9, -1.7, 0.51], np.float32)}
    # bfloat16 on the host (ml_dtypes: each op in float32, rounded to bfloat16 as XLA does)
    h16, g16 = ({"w": x["w"].astype(jnp.bfloat16)} for x in (base, ft))
    b16, f16 = (jax.device_put(t) for t in (h16, g16))
    out = fj.merge(b16, [f16], fj.chain(M.round_to("bfloat16"), M.sum()))
    want = (g16["w"] - h16["w"]).astype(jnp.bfloat16)  # bf16 task vector
    np.testing.assert_array_equal(
        np.asarray(out["w"], np.float32), (h16["w"] + want).astype(np.float32)
    )
    with pytest.raises(TypeError, match="dtype"):
        M.round_to("int8")
