"""Tests of the ready distillation loop (fusionjax.distill.distill)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.tree_util import Partial

from fusionjax import distill
from fusionjax._src import training


def _apply(params, batch):
    return batch["x"] @ params["w"] + params["b"][None, :]


def _soft_ce(logits, batch, *, lam):
    lp = jax.nn.log_softmax(logits, axis=-1)
    hard = -jnp.mean(jnp.take_along_axis(lp, batch["y"][:, None], axis=-1))
    soft = -jnp.mean(jnp.sum(jnp.exp(batch["teacher"]) * lp, axis=-1))
    return lam * hard + (1.0 - lam) * soft, soft


def _data(n=32, d=5, v=4):
    kx, kt = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (n, d))
    teacher = jax.nn.log_softmax(3.0 * jax.random.normal(kt, (n, v)), axis=-1)
    return {"x": x, "y": jnp.argmax(teacher, -1).astype(jnp.int32), "teacher": teacher}


def _params(d=5, v=4):
    return {"w": jnp.zeros((d, v)), "b": jnp.zeros(v)}


OPT = optax.adam(0.05)


def test_matches_a_hand_written_loop():
    data, key = _data(), jax.random.key(3)
    loss = Partial(_soft_ce, lam=jnp.float32(0.3))
    out = distill.distill(_apply, _params(), data, loss, optimizer=OPT, steps=30,
                          batch_size=8, key=key, chunk=7)
    opt = training.standard_promotion(OPT)
    params, state = _params(), opt.init(_params())

    @jax.jit
    def step(s, params, state):
        batch = distill.sample_batch(jax.random.fold_in(key, s), data, 8)
        value, g = jax.value_and_grad(lambda p: loss(_apply(p, batch), batch)[0])(params)
        updates, state = opt.update(g, state, params)
        return optax.apply_updates(params, updates), state, value

    losses = []
    for s in range(30):
        params, state, value = step(jnp.int32(s), params, state)
        losses.append(float(value))
    np.testing.assert_allclose(out.losses, losses, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 out.params, params)
    assert np.mean(out.losses[-5:]) < out.losses[0] - 0.1  # it learns


def test_one_compilation_for_other_hyperparameters_and_data():
    data = _data()
    opt = optax.sgd(0.1)
    step_calls = []

    def counting_loss(logits, batch, *, lam):
        step_calls.append(1)  # runs once per trace
        return _soft_ce(logits, batch, lam=lam)

    for lam, seed in ((0.2, 0), (0.9, 1)):
        other = jax.tree.map(lambda a, s=seed: a + s, data) if seed else data
        distill.distill(_apply, _params(), other, Partial(counting_loss, lam=jnp.float32(lam)),
                        optimizer=opt, steps=5, batch_size=4, key=jax.random.key(seed))
    assert len(step_calls) == 1


def test_rejects_bad_input():
    data, loss = _data(), Partial(_soft_ce, lam=0.5)
    kw = dict(optimizer=OPT, steps=3, batch_size=4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="leading"):
        distill.distill(_apply, _params(), {"x": jnp.ones((3, 5)), "y": jnp.ones(4)}, loss, **kw)
    with pytest.raises(ValueError, match="no examples"):
        distill.distill(_apply, _params(), {"x": jnp.ones((0, 5))}, loss, **kw)
    with pytest.raises(ValueError, match="steps"):
        distill.distill(_apply, _params(), data, loss, **{**kw, "steps": -1})
    with pytest.raises(TypeError, match="batch_size"):
        distill.distill(_apply, _params(), data, loss, **{**kw, "batch_size": 2.5})
    with pytest.raises(TypeError, match="loss"):
        distill.distill(_apply, _params(), data, "ce", **kw)
    with pytest.raises(TypeError, match="key"):
        distill.distill(_apply, _params(), data, loss, **{**kw, "key": 0})
