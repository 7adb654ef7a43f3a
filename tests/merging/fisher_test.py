"""Tests for Fisher merging: fisher_diagonal and fisher_merging."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from fusionjax.merging import fisher_diagonal
from fusionjax.merging import fisher_merging
from tests import _testing as T

RTOL, ATOL = 1e-5, 1e-6


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    T.assert_trees_close(a, b, rtol=rtol, atol=atol)


def put(x, dtype=np.float32):
    """A device array from NumPy (``jax.device_put`` compiles nothing per shape)."""
    return jax.device_put(np.asarray(x, dtype))


def random_params(rng):
    """Drawn with NumPy: a ``jax.random`` draw compiles a threefry program per shape."""
    rng = np.random.default_rng(rng)
    return {
        "Dense_0": {
            "kernel": put(rng.normal(size=(4, 3))),
            "bias": put(rng.normal(size=(3,))),
        },
        "scale": put(rng.normal(size=())),
        "step": put(7, np.int32),
    }


def random_fisher(rng, params, scale=1.0):
    """Positive Fishers at float leaves, None at int leaves (like fisher_diagonal)."""
    rng = np.random.default_rng(rng)
    leaves, treedef = jax.tree.flatten(params)
    out = [
        put(scale * rng.uniform(0.1, 2.0, size=x.shape))
        if jnp.issubdtype(x.dtype, jnp.floating)
        else None
        for x in leaves
    ]
    return treedef.unflatten(out)


def make_problem(t=3, seed=0):
    rng = np.random.default_rng(seed)
    base = random_params(rng)
    fts = [random_params(rng) for _ in range(t)]
    for ft in fts:
        ft["step"] = base["step"]
    fishers = [random_fisher(rng, base) for _ in range(t)]
    return base, fts, fishers


def numpy_fisher_merge(base, fts, fishers, floor=1e-6, weights=None):
    t = len(fts)
    lam = np.ones(t) if weights is None else np.asarray(weights, np.float64)

    def merge_leaf(b, *rest):
        if not np.issubdtype(np.asarray(b).dtype, np.floating):
            return b
        thetas, fs = rest[:t], rest[t:]
        f = [lam[i] * np.maximum(np.asarray(fs[i], np.float64), floor) for i in range(t)]
        num = sum(f[i] * np.asarray(thetas[i], np.float64) for i in range(t))
        return (num / sum(f)).astype(np.float32)

    is_leaf = lambda x: x is None  # noqa: E731
    return jax.tree.map(merge_leaf, base, *fts, *fishers, is_leaf=is_leaf)


# --------------------------------------------------------------------------- merging


@pytest.mark.parametrize("jit", [False, True])
def test_matches_numpy_reference(jit):
    base, fts, fishers = make_problem(t=3)
    weights = jnp.array([0.5, 2.0, 1.0])
    merger = fisher_merging(fisher_floor=0.3, weights=weights)

    def run(b, f, fi):
        return fj.merge(b, f, merger, fishers=fi)

    run = jax.jit(run) if jit else run
    got = run(base, fts, fj.stack(fishers))
    want = numpy_fisher_merge(base, fts, fishers, floor=0.3, weights=np.asarray(weights))
    assert_trees_close(got, want)
    assert got["step"] == base["step"]


def test_jit_and_nojit_agree():
    base, fts, fishers = make_problem(t=2, seed=3)
    stacked = fj.stack(fishers)
    merger = fisher_merging()
    eager = fj.merge(base, fts, merger, fishers=stacked)
    jitted = jax.jit(lambda b, f, s: fj.merge(b, f, merger, fishers=s))(base, fts, stacked)
    assert_trees_close(eager, jitted)


def test_identity():
    base, fts, fishers = make_problem(t=3)
    stacked = fj.stack(fishers)
    out = fj.merge(base, [base] * 3, fisher_merging(), fishers=stacked)
    assert_trees_close(out, base, rtol=0, atol=0)
    theta = fts[0]
    out = fj.merge(base, [theta] * 3, fisher_merging(), fishers=stacked)
    assert_trees_close(out, theta)


def test_order_invariance():
    base, fts, fishers = make_problem(t=3, seed=1)
    perm = [2, 0, 1]
    a = fj.merge(base, fts, fisher_merging(), fishers=fj.stack(fishers))
    b = fj.merge(
        base, [fts[i] for i in perm], fisher_merging(), fishers=fj.stack([fishers[i] for i in perm])
    )
    assert_trees_close(a, b)


def test_equal_fishers_is_plain_mean():
    base, fts, fishers = make_problem(t=3, seed=2)
    same = fj.stack([fishers[0]] * 3)
    got = fj.merge(base, fts, fisher_merging(), fishers=same)
    want = fj.merge(base, fts, fj.merging.mean())
    assert_trees_close(got, want)


def test_equal_fishers_with_weights_is_weighted_mean():
    base, fts, fishers = make_problem(t=3, seed=2)
    w = jnp.array([1.0, 3.0, 0.0])
    got = fj.merge(base, fts, fisher_merging(weights=w), fishers=fj.stack([fishers[1]] * 3))
    want = fj.merge(base, fts, fj.merging.mean(w))
    assert_trees_close(got, want)


def test_dominating_fisher_selects_that_model():
    base, fts, fishers = make_problem(t=3, seed=4)
    big = random_fisher(9, base, scale=1e6)
    small = random_fisher(8, base, scale=1e-6)
    stacked = fj.stack([small, big, small])
    got = fj.merge(base, fts, fisher_merging(fisher_floor=1e-12), fishers=stacked)
    assert_trees_close(got, fts[1], rtol=1e-4, atol=1e-4)


def test_zero_fishers_fall_back_to_mean_without_nan():
    base, fts, _ = make_problem(t=3, seed=5)
    zeros = jax.tree.map(lambda x: jnp.zeros_like(x) if x.dtype == jnp.float32 else None, base)
    stacked = fj.stack([zeros] * 3)
    got = fj.merge(base, fts, fisher_merging(), fishers=stacked)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(got))
    assert_trees_close(got, fj.merge(base, fts, fj.merging.mean()))


def test_prefix_fishers_with_one_value_per_model():
    base, fts, fishers = make_problem(t=2, seed=6)
    # Isotropic Fisher [T] for the whole Dense_0 subtree.
    prefix = {
        "Dense_0": jnp.array([1.0, 3.0]),
        "scale": fj.stack(fishers)["scale"],
        "step": None,
    }
    got = fj.merge(base, fts, fisher_merging(), fishers=prefix)
    want_dense = jax.tree.map(lambda a, b: (a + 3 * b) / 4, fts[0]["Dense_0"], fts[1]["Dense_0"])
    assert_trees_close(got["Dense_0"], want_dense)


def test_step_called_directly_on_task_vectors():
    x = jnp.array([[1.0, 2.0], [3.0, 6.0]])
    f = jnp.array([[1.0, 1.0], [1.0, 3.0]])
    out = fisher_merging()({"w": x}, fishers={"w": f})
    np.testing.assert_allclose(out["w"], [2.0, 5.0], rtol=RTOL)


# ---------------------------------------------------------------------------- errors


def test_missing_fishers_raises():
    base, fts, _ = make_problem(t=2)
    with pytest.raises(TypeError, match="fishers="):
        fj.merge(base, fts, fisher_merging())


def test_wrong_shape_names_path():
    base, fts, fishers = make_problem(t=2)
    stacked = fj.stack(fishers)
    stacked["Dense_0"]["kernel"] = stacked["Dense_0"]["kernel"][:, :, :2]
    with pytest.raises(ValueError, match=r"\['Dense_0'\]\['kernel'\].*fishers has shape"):
        fj.merge(base, fts, fisher_merging(), fishers=stacked)


def test_wrong_number_of_models_names_path():
    base, fts, fishers = make_problem(t=3)
    stacked = fj.stack(fishers[:2])
    with pytest.raises(ValueError, match=r"\['Dense_0'\]\['bias'\]"):
        fj.merge(base, fts, fisher_merging(), fishers=stacked)


def test_none_fisher_at_merged_leaf_raises():
    base, fts, fishers = make_problem(t=2)
    stacked = fj.stack(fishers)
    stacked["scale"] = None
    with pytest.raises(ValueError, match=r"\['scale'\].*no value"):
        fj.merge(base, fts, fisher_merging(), fishers=stacked)


@pytest.mark.parametrize("floor", [0.0, -1.0, float("nan")])
def test_bad_floor(floor):
    with pytest.raises(ValueError, match="fisher_floor"):
        fisher_merging(fisher_floor=floor)


def test_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        fisher_merging(weights=jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="weights"):
        fisher_merging(weights=jnp.zeros(2))
    base, fts, fishers = make_problem(t=2)
    with pytest.raises(ValueError, match=r"weights takes one value, or one per model"):
        fj.merge(base, fts, fisher_merging(weights=jnp.ones(3)), fishers=fj.stack(fishers))


# ------------------------------------------------------------------- fisher_diagonal


class TinyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(5)(x))
        return nn.Dense(3)(x)


def tiny_params(seed):
    """TinyMLP params of the shapes ``model.init`` gives for 4 inputs, drawn with NumPy.

    ``model.init`` compiles a truncated-normal threefry program per kernel shape.
    """
    rng = np.random.default_rng(seed)
    dense = lambda i, o: {"kernel": put(rng.normal(size=(i, o)) / np.sqrt(i)), "bias": put(0.1 * rng.normal(size=o))}  # noqa: E731, E501
    return {"Dense_0": dense(4, 5), "Dense_1": dense(5, 3)}


def slow_fisher(model, params, xs):
    """Plain loop: per example, per class, one jax.grad of log p(c | x)."""

    def log_prob(p, x, c):
        return jax.nn.log_softmax(model.apply({"params": p}, x[None])[0])[c]

    grad = jax.jit(jax.grad(log_prob))
    # One program for the probabilities, rows taken on the host (no eager op per step).
    probs = np.asarray(jax.jit(lambda p, x: jax.nn.softmax(model.apply({"params": p}, x)))(
        params, xs
    ))
    out = jax.tree.map(lambda a: np.zeros(a.shape, np.float64), params)
    for i, x in enumerate(np.asarray(xs)):
        for c in range(probs.shape[1]):
            g = grad(params, x, c)
            p_c = float(probs[i, c])
            out = jax.tree.map(
                lambda a, gi, p_c=p_c: a + p_c * np.asarray(gi, np.float64) ** 2, out, g
            )
    return jax.tree.map(lambda a: a / len(xs), out)


@pytest.fixture(scope="module")
def tiny_problem():
    model = TinyMLP()
    xs = put(np.random.default_rng(1).normal(size=(7, 4)))
    params = tiny_params(0)
    return model, params, xs, slow_fisher(model, params, xs)


@pytest.mark.parametrize("batch_size", [None, 3, 7])
def test_fisher_diagonal_matches_slow_loop(tiny_problem, batch_size):
    model, params, xs, want = tiny_problem

    def logits_fn(p, xb):
        return model.apply({"params": p}, xb)

    got = fisher_diagonal(logits_fn, params, xs, batch_size=batch_size)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-7)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))
    assert all((np.asarray(x) >= 0).all() for x in jax.tree.leaves(got))


def test_fisher_diagonal_pytree_inputs_and_int_leaves():
    params = {"w": put([[1.0, -1.0], [0.5, 2.0]]), "n": put(3, np.int32)}
    xs = {"a": put([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), "b": put(np.ones((3, 2)))}

    def logits_fn(p, xb):
        return (xb["a"] + 0.1 * xb["b"]) @ p["w"]

    got = fisher_diagonal(logits_fn, params, xs, batch_size=2)
    assert got["n"] is None
    # Closed form for a linear softmax model: F_w[i, c] = E_x[x_i^2 p_c (1 - p_c)].
    # (in float64 NumPy: no eager program per op)
    x = np.asarray(xs["a"], np.float64) + 0.1 * np.asarray(xs["b"], np.float64)
    z = x @ np.asarray(params["w"], np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.mean(x[:, :, None] ** 2 * (p * (1 - p))[:, None, :], axis=0)
    np.testing.assert_allclose(got["w"], want, rtol=1e-5, atol=1e-7)


def test_fisher_diagonal_end_to_end_merge():
    model = TinyMLP()
    xs = put(np.random.default_rng(2).normal(size=(6, 4)))
    base = tiny_params(0)
    fts = [tiny_params(k) for k in (1, 2)]

    def logits_fn(p, xb):
        return model.apply({"params": p}, xb)

    fishers = fj.stack([fisher_diagonal(logits_fn, p, xs, batch_size=4) for p in fts])
    merged = fj.merge(base, fts, fisher_merging(), fishers=fishers)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(merged))


def test_fisher_diagonal_compiles_once_per_logits_fn():
    traces = []

    def logits_fn(p, xb):
        traces.append(1)
        return xb @ p["w"]

    xs = put(np.ones((5, 2)))
    fisher_diagonal(logits_fn, {"w": put(np.ones((2, 3)))}, xs, batch_size=2)
    n = len(traces)
    fisher_diagonal(logits_fn, {"w": put(-np.ones((2, 3)))}, xs, batch_size=2)
    assert len(traces) == n


def test_fisher_diagonal_errors():
    params = {"w": put(np.ones((2, 3)))}
    xs = put(np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"\[n, C\]"):
        fisher_diagonal(lambda p, xb: (xb @ p["w"])[:, 0], params, xs)
    with pytest.raises(ValueError, match="batch_size"):
        fisher_diagonal(lambda p, xb: xb @ p["w"], params, xs, batch_size=0)
    with pytest.raises(ValueError, match="leading"):
        fisher_diagonal(lambda p, xb: xb["a"] @ p["w"], params, {"a": xs, "b": put(np.ones(3))})
    with pytest.raises(ValueError, match="floating-point"):
        fisher_diagonal(lambda p, xb: xb, {"n": jnp.array(1)}, xs)
