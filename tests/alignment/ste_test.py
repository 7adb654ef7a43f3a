"""Tests for straight-through estimator matching."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fusionjax.alignment import PermutationSpec
from fusionjax.alignment._ste import _ste_matching
from fusionjax.alignment._ste import ste_matching
from fusionjax.alignment._weight_matching import weight_matching

DIMS = (8, 32, 32, 4)
SPEC = PermutationSpec(
    {
        f"P{k}": [(f"Dense_{k}/kernel", 1), (f"Dense_{k}/bias", 0), (f"Dense_{k + 1}/kernel", 0)]
        for k in range(len(DIMS) - 2)
    }
)


def init(seed):
    r = np.random.default_rng(seed)
    return {
        f"Dense_{i}": {
            "kernel": jax.device_put(r.standard_normal((a, b)).astype(np.float32) / np.sqrt(a)),
            "bias": jax.device_put(np.zeros((b,), np.float32)),
        }
        for i, (a, b) in enumerate(zip(DIMS[:-1], DIMS[1:], strict=True))
    }


def logits(params, x):
    n = len(params)
    for i in range(n):
        x = x @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"][None]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def loss_fn(params, batch):
    x, y = batch  # y one-hot
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits(params, x)), axis=-1))


@jax.jit
@jax.numpy_dtype_promotion("standard")
def train(params, x, y):
    opt = optax.adam(3e-2)

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss_fn)(p, (x, y))
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=150)
    return params


@pytest.fixture(scope="module")
def problem():
    """Two MLPs trained from different inits on the same teacher-labelled data."""
    r = np.random.default_rng(0)
    x = r.standard_normal((512, DIMS[0])).astype(np.float32)
    teacher = r.standard_normal((DIMS[0], DIMS[-1])).astype(np.float32)
    y = np.argmax(np.tanh(x @ teacher) + 0.3 * np.sin(3 * x[:, :4]), axis=1)
    y = np.eye(DIMS[-1], dtype=np.float32)[y]
    x, y = jax.device_put(x), jax.device_put(y)
    a, b = train(init(1), x, y), train(init(2), x, y)
    return a, b, (x, y)


@jax.jit
def midpoint(a, b):
    return jax.tree.map(lambda u, v: 0.5 * (u + v), a, b)


eval_loss = jax.jit(loss_fn)


def test_ste_midpoint_loss_not_worse_than_weight_matching(problem):
    a, b, (x, y) = problem
    x_np, y_np = np.asarray(x), np.asarray(y)  # sliced on the host: no slicing programs
    batches = [
        (jax.device_put(x_np[i : i + 128]), jax.device_put(y_np[i : i + 128]))
        for i in range(0, 512, 128)
    ] * 8
    wm = weight_matching(SPEC, a, b)
    out, trace = _ste_matching(
        SPEC,
        a,
        b,
        loss_fn,
        batches,
        steps=None,
        optimizer=optax.adam(1e-2),
        key=None,
        max_iter=100,
        solver="scipy",
    )
    naive = float(eval_loss(midpoint(a, b), (x, y)))
    loss_wm = float(eval_loss(midpoint(a, wm.apply(b)), (x, y)))
    loss_ste = float(eval_loss(midpoint(a, out.apply(b)), (x, y)))
    endpoints = 0.5 * (float(eval_loss(a, (x, y))) + float(eval_loss(b, (x, y))))
    print(
        f"midpoint loss: naive {naive:.4f}, WM {loss_wm:.4f}, STE {loss_ste:.4f} "
        f"(endpoints {endpoints:.4f})"
    )
    assert len(trace.losses) == 32
    # The first projection is plain weight matching, so its batch loss is a candidate.
    assert float(out.objective) <= trace.losses[0] + 1e-6
    assert loss_ste <= loss_wm * 1.05
    assert loss_ste < naive


def test_ste_gradient_is_straight_through(problem):
    """One SGD step moves the proxy by -lr * (d loss / d other-half at the midpoint)."""
    from fusionjax.alignment._ste import _make_step

    a, b, batch = problem
    step = _make_step(a, loss_fn, optax.sgd(0.5))
    with jax.numpy_dtype_promotion("standard"):
        state = optax.sgd(0.5).init(a)
    proxy, _, loss = step(a, state, b, batch)
    grads = jax.jit(jax.grad(lambda q: loss_fn(midpoint(a, q), batch)))(b)
    np.testing.assert_allclose(float(loss), float(eval_loss(midpoint(a, b), batch)), rtol=1e-6)
    for p, q, g in zip(
        jax.tree.leaves(proxy), jax.tree.leaves(a), jax.tree.leaves(grads), strict=True
    ):
        np.testing.assert_allclose(p, np.asarray(q) - 0.5 * np.asarray(g), rtol=1e-5, atol=1e-6)


def test_ste_errors(problem):
    a, b, batch = problem
    with pytest.raises(ValueError, match="no batches"):
        ste_matching(SPEC, a, b, loss_fn, [])
    with pytest.raises(ValueError, match="steps"):
        ste_matching(SPEC, a, b, loss_fn, [batch], steps=0)
    bad = jax.tree.map(lambda u: u, b)
    bad["Dense_1"] = {
        "kernel": jax.device_put(np.zeros((32, 5), np.float32)),
        "bias": bad["Dense_1"]["bias"],
    }
    with pytest.raises(ValueError, match=r"\['Dense_1'\]\['kernel'\]"):
        ste_matching(SPEC, a, bad, loss_fn, [batch])
