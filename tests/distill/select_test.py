"""Source selection: selector network, exact top-k weights, feedback loss, ProFuser advantages."""

import jax
import numpy as np
import pytest

from fusionjax import distill

N, D, M, V = 8, 5, 4, 7


def feats(seed=0):
    return np.random.default_rng(seed).normal(size=(N, D)).astype(np.float32)


def test_top_k_weights_are_exact_and_jit():
    s = np.random.default_rng(1).normal(size=(N, M)).astype(np.float32)
    for k in (1, 2, M):
        w = np.asarray(jax.jit(lambda x, k=k: distill.select_sources(x, k=k))(s))
        top = np.argsort(-s, axis=-1)[:, :k]
        keep = np.zeros_like(s, bool)
        np.put_along_axis(keep, top, True, axis=-1)
        assert np.all((w > 0) == keep)
        e = np.where(keep, np.exp(s - s.max(-1, keepdims=True)), 0.0)
        np.testing.assert_allclose(w, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    # ties are broken by index, still exactly k kept
    mask = np.asarray(distill.top_k_mask(np.zeros((2, M), np.float32), k=2))
    np.testing.assert_array_equal(mask, [[True, True, False, False]] * 2)
    # strengths multiply the softmax before renormalising
    q = np.random.default_rng(2).uniform(0.1, 1.0, size=(N, M)).astype(np.float32)
    w = np.asarray(distill.select_sources(s, k=2, strengths=q))
    top = np.argsort(-s, axis=-1)[:, :2]
    keep = np.zeros_like(s, bool)
    np.put_along_axis(keep, top, True, axis=-1)
    e = np.where(keep, np.exp(s) * q, 0.0)
    np.testing.assert_allclose(w, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)


def test_selector_trains_under_grad_and_the_feedback_loss_balances():
    params = distill.init_selector(jax.random.key(0), D, M, hidden_dim=6, noise=True)
    x = feats()
    s = distill.selector_scores(params, x)
    assert s.shape == (N, M)
    noisy = distill.selector_scores(params, x, key=jax.random.key(1))
    assert not np.allclose(np.asarray(noisy), np.asarray(s))  # softplus(0) > 0: noise on

    def loss(p):
        return distill.selection_feedback_loss(
            distill.select_sources(distill.selector_scores(p, x), k=M)
        )

    @jax.jit
    def descend(p):  # value before, gradient, and the value after 15 steps, in one program
        def step(_, q):
            g = jax.grad(loss)(q)
            return {name: q[name] - 0.5 * g[name] for name in q}

        return loss(p), jax.grad(loss)(p), loss(jax.lax.fori_loop(0, 15, step, p))

    # gradient descent on the feedback loss alone un-collapses a selector stuck on source 0
    p = dict(params, b2=jax.device_put(np.array([4.0, 0.0, -1.0, -2.0], np.float32)))
    before, g, after = descend(p)
    assert jax.tree.structure(g) == jax.tree.structure(params)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(g))
    assert np.abs(np.asarray(g["w2"])).sum() > 0 and np.abs(np.asarray(g["w1"])).sum() > 0
    assert float(after) < 0.25 * float(before)
    # with k < M the gradient reaches exactly the selected scores
    sc = jax.device_put(np.random.default_rng(5).normal(size=(N, M)).astype(np.float32))
    # one compiled gradient, not its ops one by one
    gs = np.asarray(jax.jit(jax.grad(lambda z: distill.select_sources(z, k=2)[:, 0].sum()))(sc))
    chosen = np.asarray(distill.top_k_mask(sc, k=2))
    assert np.all(gs[~chosen] == 0) and np.all(gs[chosen[:, 0]][:, 0] != 0)


def test_feedback_loss_values():
    uniform = np.full((N, M), 1.0 / M, np.float32)
    assert float(distill.selection_feedback_loss(uniform)) == pytest.approx(0.0, abs=1e-7)
    collapsed = np.zeros((N, M), np.float32)
    collapsed[:, 0] = 1.0
    assert float(distill.selection_feedback_loss(collapsed)) == pytest.approx(M - 1, rel=1e-5)
    # masked rows do not count
    w = collapsed.copy()
    w[:4] = np.eye(M, dtype=np.float32)
    where = np.arange(N) < 4
    assert float(distill.selection_feedback_loss(w, where=where)) == pytest.approx(0.0, abs=1e-7)


def test_fuse_selected_is_the_mixture_and_minus_inf_safe():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(M, N, 3, V)).astype(np.float32)
    logits[3, :, :, 0] = -np.inf  # a source with an impossible token
    m = logits.max(-1, keepdims=True)  # log-softmax in NumPy (no op programs to compile)
    lp = (logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))).astype(np.float32)
    w = np.asarray(distill.select_sources(rng.normal(size=(N, M)).astype(np.float32), k=2))
    out = np.asarray(distill.fuse_selected(lp, w))
    ref = np.log(np.einsum("nm,mntv->ntv", w, np.exp(lp)))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(out[w[:, 3] == 0]))
    np.testing.assert_allclose(np.log(np.exp(out.astype(np.float64)).sum(-1)), 0.0, atol=1e-5)
    g = jax.jit(jax.grad(lambda w: distill.fuse_selected(lp, w)[..., 1].sum()))(jax.device_put(w))
    assert np.all(np.isfinite(np.asarray(g)))


def test_profuser_modes_and_schedule():
    rng = np.random.default_rng(4)
    ce = rng.uniform(1, 3, size=(N, M)).astype(np.float32)
    rw = rng.normal(size=(N, M)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(distill.training_mode_advantage(ce)), np.eye(M)[ce.argmin(-1)])
    np.testing.assert_array_equal(np.asarray(distill.inference_mode_advantage(rw)), np.eye(M)[rw.argmax(-1)])
    early = np.asarray(distill.profuser_weights(ce, rw, progress=0.1))
    late = np.asarray(distill.profuser_weights(ce, rw, progress=0.9))
    np.testing.assert_array_equal(early, np.eye(M)[rw.argmax(-1)])
    np.testing.assert_array_equal(late, np.eye(M)[ce.argmin(-1)])
    f = jax.jit(lambda p: distill.profuser_weights(ce, rw, progress=p, schedule="linear"))
    mid = np.asarray(f(0.25))
    np.testing.assert_allclose(mid, 0.75 * early + 0.25 * late, rtol=1e-6)
    np.testing.assert_allclose(mid.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: distill.select_sources(np.zeros((2, M), np.float32), k=M + 1), ValueError, "k must"),
        (lambda: distill.select_sources(np.zeros((2, M), np.float32), k=1.5), TypeError, "k must"),
        (lambda: distill.select_sources(np.zeros((2, M), np.float32), k=1,
                                        strengths=np.ones((2, 3), np.float32)), ValueError, "strengths"),
        (lambda: distill.init_selector(jax.random.key(0), 0, M), ValueError, "feature_dim"),
        (lambda: distill.selector_scores(  # the training test's selector: no new init draws
            distill.init_selector(jax.random.key(0), D, M, hidden_dim=6, noise=True),
            np.zeros((2, D + 1), np.float32)), ValueError, "features"),
        (lambda: distill.fuse_selected(np.zeros((M, 2, V), np.float32), np.ones((3, M), np.float32)),
         ValueError, "weights"),
        (lambda: distill.selection_feedback_loss(np.ones((2, M), np.float32), where=np.ones(3, bool)),
         ValueError, "where"),
        (lambda: distill.profuser_weights(np.ones((2, M)), np.ones((2, M)), progress=1.5), ValueError,
         "progress"),
        (lambda: distill.profuser_weights(np.ones((2, M)), np.ones((2, M)), progress=0.5,
                                          schedule="cosine"), ValueError, "schedule"),
        (lambda: distill.profuser_weights(np.ones((2, M)), np.ones((3, M)), progress=0.5),
         ValueError, "rewards"),
    ],
)
def test_bad_inputs_name_the_parameter(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
