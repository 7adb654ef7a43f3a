"""Tests for RegMean: regmean and gram_matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from fusionjax.merging import gram_matrices
from fusionjax.merging import regmean
from tests import _testing as T

RTOL, ATOL = 1e-5, 1e-6


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    T.assert_trees_close(a, b, rtol=rtol, atol=atol)


# Kernel shapes and their Gram sizes d_in: dense, DenseGeneral [d_in, heads, dim], conv
# [kh, kw, c_in, c_out] with Grams over flattened (kh, kw, c_in) patches.
KERNELS = {"dense": ((4, 3), 4), "general": ((4, 2, 3), 4), "conv": ((2, 2, 3, 5), 12)}


def put(x):
    """A float32 device array from NumPy (``jax.device_put`` compiles nothing per shape)."""
    return jax.device_put(np.asarray(x, np.float32))


def random_params(rng, kernels):
    out = {}
    for name, (shape, _) in kernels.items():
        out[name] = {"kernel": put(rng.normal(size=shape)), "bias": put(rng.normal(size=shape[-1:]))}
    out["embed"] = put(rng.normal(size=(5, 2)))
    return out


def random_gram(rng, m, rows=None):
    x = rng.normal(size=(rows or 3 * m, m)).astype(np.float32) * np.linspace(0.5, 2.0, m, dtype=np.float32)
    return put(x.T @ x / x.shape[0])


def make_problem(t=3, seed=0, kernels=("dense",)):
    """Models with the given kernels (each with a bias) and an embedding, and Grams.

    Drawn with NumPy (a ``jax.random`` draw compiles a threefry program per shape). Every
    kernel costs one compiled solve per merge, so most tests use one.
    """
    kernels = {k: KERNELS[k] for k in kernels}
    rng = np.random.default_rng(seed)
    base = random_params(rng, kernels)
    fts = [random_params(rng, kernels) for _ in range(t)]
    grams = []
    for _ in range(t):
        g = {name: {"kernel": random_gram(rng, m), "bias": None} for name, (_, m) in kernels.items()}
        g["embed"] = None
        grams.append(g)
    return base, fts, grams


def numpy_regmean(base, fts, grams, alpha, weights=None):
    t = len(fts)
    lam = np.ones(t) if weights is None else np.asarray(weights, np.float64)

    def merge_leaf(b, *rest):
        thetas = [np.asarray(x, np.float64) for x in rest[:t]]
        gs = rest[t:]
        if gs[0] is None:
            return (sum(lam[i] * thetas[i] for i in range(t)) / lam.sum()).astype(np.float32)
        m = np.asarray(gs[0]).shape[0]
        g = []
        for i in range(t):
            gi = np.asarray(gs[i], np.float64)
            gi = alpha * gi + (1 - alpha) * np.diag(np.diag(gi))
            g.append(lam[i] * gi)
        w = np.linalg.solve(sum(g), sum(g[i] @ thetas[i].reshape(m, -1) for i in range(t)))
        return w.reshape(np.shape(b)).astype(np.float32)

    return jax.tree.map(merge_leaf, base, *fts, *grams, is_leaf=lambda x: x is None)


# --------------------------------------------------------------------------- merging


@pytest.mark.parametrize("jit", [False, True])
def test_matches_numpy_reference(jit):
    base, fts, grams = make_problem(t=3, kernels=tuple(KERNELS))
    weights = jnp.array([0.5, 2.0, 1.0])
    merger = regmean(alpha=0.6, weights=weights)

    def run(b, f, g):
        return fj.merge(b, f, merger, grams=g)

    run = jax.jit(run) if jit else run
    got = run(base, fts, fj.stack(grams))
    want = numpy_regmean(base, fts, grams, alpha=0.6, weights=np.asarray(weights))
    assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


def test_jit_and_nojit_agree():
    base, fts, grams = make_problem(t=2, seed=3)
    stacked = fj.stack(grams)
    merger = regmean()
    eager = fj.merge(base, fts, merger, grams=stacked)
    jitted = jax.jit(lambda b, f, g: fj.merge(b, f, merger, grams=g))(base, fts, stacked)
    assert_trees_close(eager, jitted)


def test_identity():
    base, fts, grams = make_problem(t=3)
    stacked = fj.stack(grams)
    out = fj.merge(base, [base] * 3, regmean(), grams=stacked)
    assert_trees_close(out, base)
    out = fj.merge(base, [fts[1]] * 3, regmean(), grams=stacked)
    assert_trees_close(out, fts[1], rtol=1e-4, atol=1e-5)


def test_order_invariance():
    base, fts, grams = make_problem(t=3, seed=1)
    perm = [1, 2, 0]
    a = fj.merge(base, fts, regmean(alpha=1.0), grams=fj.stack(grams))
    b = fj.merge(
        base, [fts[i] for i in perm], regmean(alpha=1.0), grams=fj.stack([grams[i] for i in perm])
    )
    assert_trees_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_identity_grams_is_plain_mean(alpha):
    base, fts, _ = make_problem(t=3, seed=2)
    eye = {"dense": {"kernel": jnp.eye(4), "bias": None}, "embed": None}
    got = fj.merge(base, fts, regmean(alpha=alpha), grams=fj.stack([eye] * 3))
    assert_trees_close(got, fj.merge(base, fts, fj.merging.mean()))


def test_equal_grams_is_plain_mean():
    base, fts, grams = make_problem(t=3, seed=2)
    got = fj.merge(base, fts, regmean(alpha=0.8), grams=fj.stack([grams[0]] * 3))
    assert_trees_close(got, fj.merge(base, fts, fj.merging.mean()), rtol=1e-4, atol=1e-5)


def test_matches_least_squares():
    """alpha=1 solves min_W sum_t ||X_t W - X_t W_t||^2 (checked with numpy lstsq)."""
    rng = np.random.default_rng(0)
    d_in, d_out = 6, 3
    xs = [rng.normal(size=(n, d_in)) * rng.uniform(0.5, 2, d_in) for n in (20, 35, 50)]
    ws = [rng.normal(size=(d_in, d_out)) for _ in xs]
    base = {"kernel": jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)}
    fts = [{"kernel": jnp.asarray(w, jnp.float32)} for w in ws]
    grams = [gram_matrices([{"kernel": jnp.asarray(x, jnp.float32)}], normalize=False) for x in xs]
    got = fj.merge(base, fts, regmean(alpha=1.0), grams=fj.stack(grams))["kernel"]
    a = np.concatenate(xs)
    b = np.concatenate([x @ w for x, w in zip(xs, ws, strict=False)])
    want = np.linalg.lstsq(a, b, rcond=None)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_dead_features_get_the_mean_and_no_nan():
    rng = np.random.default_rng(1)
    d_in, d_out = 5, 2
    dead = 3
    xs = [rng.normal(size=(30, d_in)) for _ in range(2)]
    for x in xs:
        x[:, dead] = 0.0  # e.g. a ReLU unit that never fires
    ws = [rng.normal(size=(d_in, d_out)) for _ in xs]
    base = {"kernel": jnp.zeros((d_in, d_out))}
    fts = [{"kernel": jnp.asarray(w, jnp.float32)} for w in ws]
    grams = fj.stack(
        [gram_matrices([{"kernel": jnp.asarray(x, jnp.float32)}]) for x in xs]
    )
    got = np.asarray(fj.merge(base, fts, regmean(alpha=1.0), grams=grams)["kernel"])
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[dead], (ws[0][dead] + ws[1][dead]) / 2, rtol=RTOL)
    live = [i for i in range(d_in) if i != dead]
    a = np.concatenate([x[:, live] for x in xs])
    b = np.concatenate([x @ w for x, w in zip(xs, ws, strict=False)])
    want = np.linalg.lstsq(a, b, rcond=None)[0]
    np.testing.assert_allclose(got[live], want, rtol=1e-4, atol=1e-5)


def test_grams_prefix_with_none_subtrees():
    base, fts, grams = make_problem(t=2, seed=4, kernels=tuple(KERNELS))
    stacked = fj.stack(grams)
    stacked["general"] = None  # whole subtree averaged
    stacked["conv"] = None
    got = fj.merge(base, fts, regmean(), grams=stacked)
    mean = fj.merge(base, fts, fj.merging.mean())
    assert_trees_close(got["general"], mean["general"])
    assert_trees_close(got["conv"], mean["conv"])
    assert_trees_close(got["dense"]["bias"], mean["dense"]["bias"])


# ---------------------------------------------------------------------------- errors


def test_missing_grams_raises():
    base, fts, _ = make_problem(t=2)
    with pytest.raises(TypeError, match="grams="):
        fj.merge(base, fts, regmean())


def test_wrong_gram_shape_names_path():
    base, fts, grams = make_problem(t=2)
    stacked = fj.stack(grams)
    stacked["dense"]["kernel"] = stacked["dense"]["kernel"][:, :3, :3]
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\].*does not fit the kernel"):
        fj.merge(base, fts, regmean(), grams=stacked)


def test_non_square_gram_names_path():
    base, fts, grams = make_problem(t=2, kernels=("conv",))
    stacked = fj.stack(grams)
    stacked["conv"]["kernel"] = stacked["conv"]["kernel"][:, :, :4]
    with pytest.raises(ValueError, match=r"\['conv'\]\['kernel'\].*square"):
        fj.merge(base, fts, regmean(), grams=stacked)


def test_wrong_number_of_models_names_path():
    base, fts, grams = make_problem(t=3)
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\].*2 Gram matrices for 3"):
        fj.merge(base, fts, regmean(), grams=fj.stack(grams[:2]))


def test_gram_on_bias_raises():
    base, fts, grams = make_problem(t=2)
    stacked = fj.stack(grams)
    stacked["dense"]["bias"] = jnp.stack([jnp.eye(3)] * 2)
    with pytest.raises(ValueError, match=r"\['dense'\]\['bias'\].*kernels"):
        fj.merge(base, fts, regmean(), grams=stacked)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        regmean(alpha=alpha)


def test_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        regmean(weights=jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="weights"):
        regmean(weights=jnp.zeros(2))


# ----------------------------------------------------------------------- gram_matrices


def test_gram_matrices_accumulates_over_batches():
    rng = np.random.default_rng(0)
    x1 = rng.normal(size=(2, 5, 3)).astype(np.float32)  # leading axes are flattened
    x2 = rng.normal(size=(4, 3)).astype(np.float32)
    batches = ({"a": {"kernel": jnp.asarray(x), "bias": None}} for x in (x1, x2))
    got = gram_matrices(batches, normalize=False)
    rows = np.concatenate([x1.reshape(-1, 3), x2])
    assert got["a"]["bias"] is None
    np.testing.assert_allclose(got["a"]["kernel"], rows.T @ rows, rtol=RTOL, atol=ATOL)
    mean = gram_matrices([{"k": jnp.asarray(x1)}, {"k": jnp.asarray(x2)}])["k"]
    np.testing.assert_allclose(mean, rows.T @ rows / 14, rtol=RTOL, atol=ATOL)
    assert mean.dtype == jnp.float32


def test_gram_matrices_errors():
    with pytest.raises(ValueError, match="empty"):
        gram_matrices([])
    with pytest.raises(ValueError, match="structure"):
        gram_matrices([{"a": jnp.ones((2, 3))}, {"b": jnp.ones((2, 3))}])
    with pytest.raises(ValueError, match=r"\['a'\].*features"):
        gram_matrices([{"a": jnp.ones((2, 3))}, {"a": jnp.ones((2, 4))}])
    with pytest.raises(ValueError, match=r"\['a'\]"):
        gram_matrices([{"a": jnp.ones((2, 3), jnp.int32)}])
