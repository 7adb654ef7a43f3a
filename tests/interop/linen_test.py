"""Tests for the flax.linen helpers: capture_dense_inputs and dense_grams."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from fusionjax.interop import capture_dense_inputs
from fusionjax.interop import dense_grams
from fusionjax.merging import regmean

RTOL, ATOL = 1e-5, 1e-6


def _normal(seed, shape, scale=1.0):
    """NumPy-drawn float32 normals (no threefry program to compile)."""
    return jax.device_put((scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32))


def _init(model, x, seed, **kwargs):
    """``model``'s variables, shapes from ``init`` (traced only), values drawn in NumPy.

    Kernels are LeCun-normal as flax's default initialiser; other leaves are drawn too.
    """
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), x)
    leaves, treedef = jax.tree.flatten(shapes)
    return treedef.unflatten(
        [
            _normal((seed, i), s.shape, 1 / np.sqrt(s.shape[0]) if s.ndim == 2 else 0.1)
            for i, s in enumerate(leaves)
        ]
    )


@pytest.fixture(autouse=True)
def _strict_promotion():
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        yield


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(nn.Dense(4, name="proj")(x))


class Net(nn.Module):
    """Dense_0 -> Block (nested Dense) -> a shared Dense called twice -> LayerNorm -> head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(4)(x))
        x = Block(name="block")(x)
        shared = nn.Dense(4, name="shared")
        x = shared(jnp.tanh(shared(x)))
        x = nn.LayerNorm()(x)
        return nn.Dense(2, name="head")(x)


@jax.jit  # one compiled reference, not an op-by-op forward pass per call
def manual_inputs(params, x):
    """The inputs of every Dense, by a hand-written forward pass of Net."""
    with jax.numpy_rank_promotion("allow"):
        return _manual_inputs(params, x)


def _manual_inputs(params, x):

    def dense(p, h):
        return h @ p["kernel"] + p["bias"]

    def layer_norm(p, h):
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) / jnp.sqrt(var + 1e-6) * p["scale"] + p["bias"]

    rows = lambda h: h.reshape(-1, h.shape[-1])  # noqa: E731
    ins = {"Dense_0": rows(x)}
    h = nn.relu(dense(params["Dense_0"], x))
    ins["block"] = rows(h)
    h = nn.relu(dense(params["block"]["proj"], h))
    s1 = h
    h = jnp.tanh(dense(params["shared"], h))
    ins["shared"] = jnp.concatenate([rows(s1), rows(h)])
    h = dense(params["shared"], h)
    h = layer_norm(params["LayerNorm_0"], h)
    ins["head"] = rows(h)
    return ins


@pytest.fixture(scope="module")
def net():
    model = Net()
    x = jax.device_put(np.random.default_rng(1).standard_normal((6, 3)).astype(np.float32))
    variables = _init(model, x[:1], 0)
    return model, variables, x


@pytest.mark.parametrize("jit", [False, True])
def test_capture_dense_inputs_matches_manual_forward(net, jit):
    model, variables, x = net
    fn = lambda v, xb: capture_dense_inputs(model, v, xb)  # noqa: E731
    got = (jax.jit(fn) if jit else fn)(variables, x)
    want = manual_inputs(variables["params"], x)
    params = variables["params"]
    # Shaped like params: inputs at each Dense kernel, None everywhere else.
    assert jax.tree.structure(got, is_leaf=lambda a: a is None) == jax.tree.structure(params)
    assert got["Dense_0"]["bias"] is None and got["LayerNorm_0"]["scale"] is None
    np.testing.assert_allclose(got["Dense_0"]["kernel"], want["Dense_0"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["block"]["proj"]["kernel"], want["block"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["shared"]["kernel"], want["shared"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["head"]["kernel"], want["head"], rtol=1e-4, atol=1e-5)
    assert got["shared"]["kernel"].shape == (2 * x.shape[0], 4)  # two calls, concatenated


def test_capture_flattens_leading_axes():
    model = nn.Dense(3)
    x = _normal(0, (2, 5, 4))
    variables = _init(model, x, 1)
    got = capture_dense_inputs(model, variables, x)
    np.testing.assert_array_equal(got["kernel"], x.reshape(10, 4))
    assert got["bias"] is None


def test_capture_passes_apply_kwargs():
    class Drop(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            x = nn.Dropout(0.5, deterministic=not train)(x)
            return nn.Dense(2)(x)

    model = Drop()
    x = jnp.ones((8, 3))
    variables = _init(model, x, 0, train=False)
    eval_in = capture_dense_inputs(model, variables, x, train=False)
    np.testing.assert_array_equal(eval_in["Dense_0"]["kernel"], x)
    train_in = capture_dense_inputs(
        model, variables, x, train=True, rngs={"dropout": jax.random.key(1)}
    )
    assert not np.array_equal(train_in["Dense_0"]["kernel"], x)


def test_capture_errors():
    model = nn.Dense(2)
    variables = _init(model, jnp.ones((1, 3)), 0)
    with pytest.raises(ValueError, match="'params'"):
        capture_dense_inputs(model, variables["params"], jnp.ones((1, 3)))


@pytest.mark.parametrize("batch_size", [None, 4])
def test_dense_grams(net, batch_size):
    model, variables, x = net
    got = dense_grams(model, variables, x, batch_size=batch_size, normalize=False)
    want = manual_inputs(variables["params"], x)
    for path, name in [(("Dense_0",), "Dense_0"), (("block", "proj"), "block"),
                       (("shared",), "shared"), (("head",), "head")]:
        g = got
        for k in path:
            g = g[k]
        np.testing.assert_allclose(
            g["kernel"], want[name].T @ want[name], rtol=1e-4, atol=1e-5
        )
        assert g["bias"] is None
    mean = dense_grams(model, variables, x, batch_size=batch_size)
    np.testing.assert_allclose(
        mean["shared"]["kernel"], got["shared"]["kernel"] / (2 * x.shape[0]), rtol=RTOL, atol=ATOL
    )


def test_stacked_dense_grams_merge_linear_models_by_least_squares():
    """End to end: RegMean(alpha=1) of linear models solves the stacked regression."""
    model = nn.Dense(3, use_bias=False)
    xs = [_normal(i, (40, 5), i + 1.0) for i in range(2)]
    base = _init(model, xs[0][:1], 2)["params"]
    fts = [_init(model, xs[0][:1], seed)["params"] for seed in (3, 4)]
    grams = fj.stack([dense_grams(model, {"params": p}, x) for p, x in zip(fts, xs, strict=False)])
    merged = fj.merge(base, fts, regmean(alpha=1.0), grams=grams)
    a = np.concatenate([np.asarray(x, np.float64) for x in xs])
    b = np.concatenate([np.asarray(x @ p["kernel"], np.float64) for x, p in zip(xs, fts, strict=False)])
    want = np.linalg.lstsq(a, b, rcond=None)[0]
    np.testing.assert_allclose(merged["kernel"], want, rtol=1e-4, atol=1e-5)


def test_stacking_grams_with_none_leaves(net):
    model, variables, x = net
    g = dense_grams(model, variables, x)
    stacked = fj.stack([g, g])
    assert stacked["Dense_0"]["kernel"].shape == (2, 3, 3)
    assert stacked["Dense_0"]["bias"] is None
    params = variables["params"]
    merged = fj.merge(params, [params, params], regmean(), grams=stacked)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params), strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


TRACES = []


class Counting(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        TRACES.append(1)
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(2)(x)


def test_dense_grams_kwargs_and_one_compile_per_architecture():
    model = Counting()
    x = _normal(0, (6, 3))
    p0 = _init(model, x, 1, train=False)
    p1 = _init(model, x, 2, train=False)
    g0 = dense_grams(model, p0, x, batch_size=3, train=False)
    n = len(TRACES)
    g1 = dense_grams(model, p1, x, batch_size=3, train=False)
    assert len(TRACES) == n  # same module and flags: the compiled forward pass is reused
    np.testing.assert_allclose(g0["Dense_0"]["kernel"], x.T @ x / 6, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g1["Dense_0"]["kernel"], g0["Dense_0"]["kernel"], rtol=RTOL)
    rngs = {"dropout": jax.random.key(3)}
    g2 = dense_grams(model, p0, x, batch_size=3, train=True, rngs=rngs)
    assert not np.allclose(g2["Dense_0"]["kernel"], g0["Dense_0"]["kernel"])


def test_dense_grams_errors(net):
    model, variables, x = net
    with pytest.raises(ValueError, match="batch_size"):
        dense_grams(model, variables, x, batch_size=0)
    with pytest.raises(ValueError, match="no examples"):
        dense_grams(model, variables, x[:0])
