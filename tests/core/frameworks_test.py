"""merge works unchanged on flax linen params, nnx.State and equinox modules."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import fusionjax as fj
from tests import _testing as T


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.BatchNorm(use_running_average=True)(x)
        return nn.Dense(3)(x)


def perturb(params, seed, scale=0.05):
    """``params`` plus Gaussian noise drawn and added with NumPy, placed by ``device_put``
    (no XLA compilation per leaf shape)."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([
        jax.device_put(np.asarray(x) + np.asarray(scale * rng.standard_normal(np.shape(x)), x.dtype))
        for x in leaves
    ])


def np_mean(a, b):
    """The average of two models, leaf by leaf in NumPy (float32)."""
    return jax.tree.map(lambda x, y: (np.asarray(x) + np.asarray(y)) / np.float32(2), a, b)


X = np.ones((2, 5), np.float32)  # host input: no broadcast program


def test_linen_params():
    model = LinenMLP()
    variables = model.init(jax.random.key(0), X)
    base = variables["params"]
    fts = [perturb(base, i) for i in (1, 2)]
    merged = fj.merge(base, fts, fj.merging.ties(density=0.5))
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    out = model.apply({**variables, "params": merged}, X)
    assert out.shape == (2, 3) and np.isfinite(out).all()
    avg = fj.merge(base, fts, fj.merging.mean())
    T.assert_trees_close(avg, np_mean(*fts))


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.bn(nnx.relu(self.l1(x)), use_running_average=True))


def test_nnx_state():
    model = NnxMLP(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fts = [perturb(params, i) for i in (1, 2, 3)]
    merged = fj.merge(params, fts, fj.merging.task_arithmetic(scaling=0.5))
    assert isinstance(merged, nnx.State)
    rebuilt = nnx.merge(graphdef, merged, rest)
    y = rebuilt(jnp.ones((2, 5)))
    assert y.shape == (2, 3)
    want = params["l1"]["kernel"][...] + 0.5 * sum(
        f["l1"]["kernel"][...] - params["l1"]["kernel"][...] for f in fts
    )
    np.testing.assert_allclose(merged["l1"]["kernel"][...], want, rtol=1e-5, atol=1e-6)


def test_equinox_module_filtered_arrays():
    model = eqx.nn.MLP(4, 2, width_size=8, depth=2, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    fts = [perturb(params, i) for i in (1, 2)]
    merged = fj.merge(params, fts, fj.merging.mean())
    out_model = eqx.combine(merged, static)
    assert out_model(np.ones(4, np.float32)).shape == (2,)
    T.assert_trees_close(merged, np_mean(*fts))


def test_equinox_module_directly():
    # Non-array leaves (activation functions) are passed through when they match.
    model = eqx.nn.MLP(4, 2, width_size=8, depth=1, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    fts = [eqx.combine(perturb(params, i), static) for i in (1, 2)]
    merged = fj.merge(model, fts, fj.merging.mean())
    assert isinstance(merged, eqx.nn.MLP)
    assert merged(np.ones(4, np.float32)).shape == (2,)


def test_linen_variables_with_batch_stats_merge_whole():
    model = LinenMLP()
    variables = model.init(jax.random.key(0), X)
    fts = [perturb(variables, i, scale=0.3) for i in (1, 2)]
    merged = fj.merge(variables, fts, fj.merging.task_arithmetic(scaling=1.5))
    var = merged["batch_stats"]["BatchNorm_0"]["var"]
    want = np_mean(fts[0], fts[1])["batch_stats"]["BatchNorm_0"]["var"]
    np.testing.assert_allclose(var, want, rtol=1e-6)
    assert np.isfinite(model.apply(merged, X)).all()


def test_flax_train_state():
    import optax
    from flax.training import train_state

    model = LinenMLP()
    variables = model.init(jax.random.key(0), X)
    tx = optax.adam(1e-3)
    states = [
        train_state.TrainState.create(
            apply_fn=model.apply, params=perturb(variables["params"], i), tx=tx
        )
        for i in range(3)
    ]
    merged = fj.merge(states[0].params, [s.params for s in states[1:]], fj.merging.ties(density=0.5))
    state = states[0].replace(params=merged)
    assert state.apply_fn({**variables, "params": state.params}, X).shape == (2, 3)
    # The whole TrainState merges too: its step counter must agree, Adam's moments are floats.
    whole = fj.merge(states[0], states[1:], fj.merging.mean())
    assert int(whole.step) == 0 and whole.apply_fn == model.apply
    other = train_state.TrainState.create(apply_fn=model.apply, params=states[1].params, tx=optax.adam(1e-3))
    with pytest.raises(ValueError, match="static \\(non-array\\) parts of its tree"):
        fj.merge(states[0], [other], fj.merging.mean())
