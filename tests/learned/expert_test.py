"""Expert Merging: its objective, importance, chunking, and the two loops on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

import fusionjax as fj

T, D, H, C, N = 3, 5, 8, 4, 24

# The objective compiled (op by op it dispatches hundreds of small ops per call).
_loss = jax.jit(
    fj.learned.expert_merging_loss,
    static_argnames=("hidden_fn", "hidden_weight", "logit_weight", "temperature", "reg_weight"),
)


def _host_normal(rng, *shape, scale=1.0):
    return np.asarray(scale * rng.standard_normal(shape), np.float32)


def _normal(rng, *shape, scale=1.0):
    """NumPy draws placed with device_put (no convert program per shape)."""
    return jax.device_put(_host_normal(rng, *shape, scale=scale))


def _hidden(params, x):
    """Two hidden states (a pytree): both layers' outputs."""
    h1 = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"][None])
    h2 = jnp.tanh(h1 @ params["l2"]["kernel"] + params["l2"]["bias"][None])
    return [h1, h2]


def _np_hidden(params, x):
    """``_hidden`` in float64 NumPy."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    h1 = np.tanh(f(x) @ f(params["l1"]["kernel"]) + f(params["l1"]["bias"])[None])
    h2 = np.tanh(h1 @ f(params["l2"]["kernel"]) + f(params["l2"]["bias"])[None])
    return [h1, h2]


def _logits(heads, params, t, x):
    return 3.0 * _hidden(params, x)[1] @ heads[t]


@pytest.fixture(scope="module")
def problem():
    """A 2-layer model fine-tuned three ways, a head and an unlabeled pool per task.

    ``logits_fn`` is a Partial of a module-level function holding the heads as arrays, so
    every loop in this file with the same shapes shares one compilation.
    """
    rng = np.random.default_rng(0)
    zeros = np.zeros(H, np.float32)
    base = {
        "l1": {"kernel": _host_normal(rng, D, H, scale=1 / np.sqrt(D)), "bias": zeros},
        "l2": {"kernel": _host_normal(rng, H, H, scale=1 / np.sqrt(H)), "bias": zeros.copy()},
    }
    fts = [  # float32 sums on the host, as on the device; everything placed once
        jax.tree.map(lambda v: v + _host_normal(rng, *v.shape, scale=0.4), base) for _ in range(T)
    ]
    base, fts = jax.device_put((base, fts))
    heads = tuple(_normal(rng, H, C) for _ in range(T))
    data = [rng.standard_normal((N, D)).astype(np.float32) for _ in range(T)]
    return base, fts, data, Partial(_logits, heads)


def _kl_np(p_logits, q_logits, temp):
    def log_softmax(z):
        z = np.asarray(z, np.float64) / temp
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return temp**2 * np.mean(np.sum(np.exp(lp) * (lp - lq), -1))


def test_loss_is_zero_when_the_merge_is_every_expert(problem):
    base, fts, data, logits_fn = problem
    # Two copies of one expert: α = σ(0) = 1/2 each merges to exactly that expert.
    tvs = fj.learned.stacked_task_vectors(base, [fts[0], fts[0]])
    targets = fj.learned.expert_targets([fts[0], fts[0]], data[:2], logits_fn, _hidden)
    zeros = jax.tree.map(lambda _: jnp.zeros(2), base)
    kw = dict(base=base, task_vectors=tvs, logits_fn=logits_fn, hidden_fn=_hidden, anchor=0.5)
    loss = _loss(zeros, targets, **kw)
    assert abs(float(loss)) < 1e-6
    # Away from it every term is positive: alignment and the regulariser.
    off = jax.tree.map(lambda _: jnp.array([0.5, -1.0]), base)
    assert float(_loss(off, targets, **kw)) > 1e-3
    only_reg = _loss(
        off, targets, **kw | {"hidden_weight": 0.0, "logit_weight": 0.0}
    )
    expect = 0.1 * np.mean(np.abs(1 / (1 + np.exp(-np.array([0.5, -1.0]))) - 0.5))
    np.testing.assert_allclose(float(only_reg), expect, rtol=1e-5)


def test_loss_matches_numpy(problem):
    base, fts, data, logits_fn = problem
    tvs = fj.learned.stacked_task_vectors(base, fts)
    targets = fj.learned.expert_targets(fts, data, logits_fn, _hidden)
    rng = np.random.default_rng(1)
    w = jax.tree.map(lambda _: _normal(rng, T), base)
    beta, anchor, temp = np.array([1.0, 0.5, 2.0]), np.array([0.2, 0.3, 0.4]), 2.0
    got = _loss(
        w, targets, base=base, task_vectors=tvs, logits_fn=logits_fn, hidden_fn=_hidden,
        anchor=anchor, task_weights=beta, hidden_weight=0.7, logit_weight=1.3,
        temperature=temp, reg_weight=0.4,
    )
    alpha = jax.tree.map(lambda v: 1 / (1 + np.exp(-np.asarray(v, np.float64))), w)
    merged = jax.tree.map(
        lambda b, a, *f: np.asarray(b, np.float64)
        + sum(a[k] * (np.asarray(f[k], np.float64) - np.asarray(b)) for k in range(T)),
        base, alpha, *fts,
    )
    heads = logits_fn.args[0]
    want = 0.0
    for k in range(T):  # float64 NumPy forwards (no eager op per shape)
        x = data[k]
        hm, hf = _np_hidden(merged, x), _np_hidden(fts[k], x)
        mse = np.mean([np.mean((a - b) ** 2) for a, b in zip(hm, hf, strict=True)])
        head = np.asarray(heads[k], np.float64)
        kl = _kl_np(3.0 * hf[1] @ head, 3.0 * hm[1] @ head, temp)
        want += beta[k] * (0.7 * mse + 1.3 * kl)
    dev = np.concatenate([np.abs(a - anchor) for a in jax.tree.leaves(alpha)])
    want += 0.4 * dev.mean()
    np.testing.assert_allclose(float(got), want, rtol=2e-4)


def test_gradients_reach_only_the_coefficients(problem):
    base, fts, data, logits_fn = problem
    tvs = fj.learned.stacked_task_vectors(base, fts)
    targets = fj.learned.expert_targets(fts, data, logits_fn, _hidden)
    w = jax.tree.map(lambda _: jnp.zeros(T), base)
    w["l1"]["bias"] = None  # frozen at the anchor: no logit, no gradient

    def loss(w, hidden_targets, logit_targets):
        batches = [
            (x, h, z) for (x, _, _), h, z in zip(targets, hidden_targets, logit_targets,
                                                 strict=True)
        ]
        return _loss(
            w, batches, base=base, task_vectors=tvs, logits_fn=logits_fn, hidden_fn=_hidden
        )

    hidden_targets = [h for _, h, _ in targets]
    logit_targets = [z for _, _, z in targets]
    gw, gh, gz = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(w, hidden_targets, logit_targets)
    assert gw["l1"]["bias"] is None
    for g in jax.tree.leaves(gw):  # checked on the host
        assert g.shape == (T,) and np.all(np.isfinite(g)) and np.abs(np.asarray(g)).sum() > 0
    # The experts' outputs are constants of the objective.
    for g in jax.tree.leaves((gh, gz)):
        assert np.abs(np.asarray(g)).max() == 0.0


def test_layer_importance_is_the_papers_formula():
    rng = np.random.default_rng(2)
    host_tvs = {"a": _host_normal(rng, T, 4, 6), "b": _host_normal(rng, T, 3)}
    host_alpha = {"a": np.float32([0.2, 0.9, 0.5]), "b": np.float32([[0.1, 0.3]] * T)}
    tvs, alpha = jax.device_put((host_tvs, host_alpha))
    tvs["c"] = alpha["c"] = None
    imp = fj.learned.layer_importance(alpha, tvs)
    raw = {  # the reference from the host copies
        # sum_k |α_k| * mean|τ_k| * n  (block-wise α enters by its mean over blocks)
        "a": sum(
            float(host_alpha["a"][k]) * np.abs(host_tvs["a"][k]).mean() * 24 for k in range(T)
        ),
        "b": sum(0.2 * np.abs(host_tvs["b"][k]).mean() * 3 for k in range(T)),
    }
    total = raw["a"] + raw["b"]
    assert imp["c"] is None
    np.testing.assert_allclose(float(imp["a"]), raw["a"] / total, rtol=1e-5)
    np.testing.assert_allclose(float(imp["a"]) + float(imp["b"]), 1.0, rtol=1e-6)


def test_chunks_follow_importance():
    tvs = {n: jnp.ones((2, 10)) for n in "abcd"}
    imp = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05}
    ch = fj.learned.importance_chunks(imp, tvs, budget=1.0)
    # floor(4 * share): more important tensors get at least as many chunks.
    assert ch.num_chunks == {"a": 2, "b": 1, "c": 0, "d": 0}
    assert ch.partition["a"].tolist() == [0] * 5 + [1] * 5
    assert ch.partition["b"] is None and ch.partition["c"] is None
    even = fj.learned.importance_chunks(imp, tvs, budget=1.0, steepness=0.0)
    assert set(even.num_chunks.values()) == {1}
    # κ = 3 concentrates a budget of 8: shares 8 I^3 / ΣI^3 = 6.43, 1.39, 0.17, 0.01; six
    # chunks of 10 entries are runs of ceil(10/6) = 2, so five chunks (as torch.chunk).
    steep = fj.learned.importance_chunks(imp, tvs, budget=2.0, steepness=3.0)
    assert steep.num_chunks == {"a": 5, "b": 1, "c": 0, "d": 0}
    assert steep.partition["a"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # Never more chunks than entries; uneven cuts as torch.chunk (ceil-sized runs).
    tiny = fj.learned.importance_chunks({"a": 1.0, "b": 0.0}, {"a": jnp.ones((1, 7)),
                                                              "b": jnp.ones((1, 3))},
                                        budget=2.0)
    assert tiny.num_chunks == {"a": 4, "b": 0}
    assert tiny.partition["a"].tolist() == [0, 0, 1, 1, 2, 2, 3]
    many = fj.learned.importance_chunks({"a": 1.0}, {"a": jnp.ones((1, 3))}, budget=10.0)
    assert many.num_chunks == {"a": 3}


def test_expert_merging_pulls_the_merge_to_the_expert(problem):
    base, fts, data, logits_fn = problem
    # Three copies of one expert: alignment is perfect when the three coefficients of
    # every tensor sum to 1; from 3 x 0.3 the loop must move them there. (The settings
    # match the next test's first run: one compilation for both.)
    res = fj.learned.expert_merging(
        base, [fts[1]] * T, data, logits_fn, hidden_fn=_hidden, reg_weight=0.0,
        steps=60, learning_rate=0.1, batch_size=8, key=jax.random.key(0),
    )
    sums = np.asarray([float(a.sum()) for a in jax.tree.leaves(res.coefficients)])
    assert np.all(np.abs(sums - 1.0) < 0.15), sums
    assert res.losses[-5:].mean() < 0.2 * res.losses[:5].mean()
    tvs = fj.learned.stacked_task_vectors(base, [fts[1]] * T)
    again = fj.learned.combine(base, tvs, res.coefficients)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(res.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_plus_plus_chunks_important_tensors_and_freezes_the_rest(problem):
    base, fts, data, logits_fn = problem
    res = fj.learned.expert_merging_plus_plus(
        base, fts, data, logits_fn, hidden_fn=_hidden, budget=1.5, steepness=2.0,
        init=0.25, reg_weight=0.0, steps=20, learning_rate=0.1, batch_size=8, key=jax.random.key(1),
    )
    imp = {k: float(v) for k, v in jax.tree_util.tree_leaves_with_path(res.importance)}
    np.testing.assert_allclose(sum(imp.values()), 1.0, rtol=1e-5)
    # The kernels carry almost all of Σ|α||τ|: they get the chunks, the biases freeze.
    assert res.coefficients["l2"]["kernel"].ndim == 2
    assert res.coefficients["l2"]["kernel"].shape[0] == T
    for name in ("l1", "l2"):
        np.testing.assert_array_equal(res.coefficients[name]["bias"], np.full(T, 0.25, np.float32))
    tvs = fj.learned.stacked_task_vectors(base, fts)
    again = fj.learned.combine(base, tvs, res.coefficients, partition=res.partition)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(res.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_bad_inputs_are_rejected_before_training(problem):
    base, fts, data, logits_fn = problem
    key = jax.random.key(0)
    run = fj.learned.expert_merging
    with pytest.raises(ValueError, match="init"):
        run(base, fts, data, logits_fn, init=1.0, key=key)
    with pytest.raises(ValueError, match="hidden_weight"):
        run(base, fts, data, logits_fn, hidden_weight=-1.0, key=key)
    with pytest.raises(ValueError, match="temperature"):
        run(base, fts, data, logits_fn, temperature=0.0, key=key)
    with pytest.raises(ValueError, match="unlabeled"):
        run(base, fts, data[:2], logits_fn, key=key)
    with pytest.raises(ValueError, match="finetuned"):
        run(base, [], [], logits_fn, key=key)
    with pytest.raises(ValueError, match="key"):
        run(base, fts, data, logits_fn)
    with pytest.raises(ValueError, match="task_weights"):
        run(base, fts, data, logits_fn, task_weights=[1.0, 2.0], key=key, steps=0)
    with pytest.raises(TypeError, match="hidden_fn"):
        run(base, fts, data, logits_fn, hidden_fn="features", key=key)
    with pytest.raises(TypeError, match="chunks"):
        fj.learned.expert_merging_plus_plus(base, fts, data, logits_fn, chunks=None, key=key)
    with pytest.raises(ValueError, match="budget"):
        fj.learned.expert_merging_plus_plus(base, fts, data, logits_fn, budget=0.0, key=key)
    tvs = fj.learned.stacked_task_vectors(base, fts)
    w = jax.tree.map(lambda _: jnp.zeros(T), base)
    with pytest.raises(ValueError, match="expert_hidden, expert_logits"):
        fj.learned.expert_merging_loss(
            w, [d for d in data], base=base, task_vectors=tvs, logits_fn=logits_fn
        )
    with pytest.raises(ValueError, match="importance"):
        fj.learned.importance_chunks({"l1": None, "l2": None}, tvs)
