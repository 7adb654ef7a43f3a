"""Preference losses of the fusion route: DPO, SimPO, WRPO, FuseRL against NumPy and properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import distill

B, M = 6, 3


def logps(seed, *shape):
    return np.asarray(np.random.default_rng(seed).normal(-20.0, 5.0, size=shape or (B,)), np.float32)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_dpo(pc, pr, rc, rr, beta, eps):
    z = beta * ((pc - rc) - (pr - rr))
    return -(1 - eps) * np_log_sigmoid(z) - eps * np_log_sigmoid(-z)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_matches_numpy(jit, eps):
    pc, pr, rc, rr = (logps(s) for s in range(4))
    f = jax.jit(distill.dpo_loss, static_argnames=()) if jit else distill.dpo_loss
    out = f(pc, pr, rc, rr, beta=0.3, label_smoothing=eps)
    ref = np_dpo(*(x.astype(np.float64) for x in (pc, pr, rc, rr)), 0.3, eps)
    np.testing.assert_allclose(np.asarray(out.losses), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(out.loss), ref.mean(), rtol=1e-5)
    margins = 0.3 * ((pc - rc) - (pr - rr))
    np.testing.assert_allclose(np.asarray(out.margins), margins, rtol=1e-5, atol=1e-5)
    assert float(out.accuracy) == pytest.approx(np.mean(margins > 0))


def test_dpo_properties():
    pc, pr = logps(1), logps(2)
    # policy == reference: every loss is log 2
    out = distill.dpo_loss(pc, pr, pc, pr, beta=0.5)
    np.testing.assert_allclose(np.asarray(out.losses), np.log(2.0), rtol=1e-6)
    # the gradient raises the chosen log-prob and lowers the rejected one
    g = jax.grad(lambda a, b: distill.dpo_loss(a, b, pc, pr, beta=0.5).loss, argnums=(0, 1))(
        jnp.asarray(pc), jnp.asarray(pr)
    )
    assert np.all(np.asarray(g[0]) < 0) and np.all(np.asarray(g[1]) > 0)
    # label smoothing is symmetric: swapping the pair and eps <-> 1 - eps changes nothing
    rc, rr = logps(3), logps(4)
    a = distill.dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.3).losses
    b = distill.dpo_loss(pr, pc, rr, rc, beta=0.2, label_smoothing=0.3).losses
    np.testing.assert_allclose(
        np.asarray(a), np_dpo(pr, pc, rr, rc, 0.2, 0.7), rtol=1e-5, atol=1e-6
    )
    # at eps = 0.5 the loss does not depend on which side is chosen
    a = distill.dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.5).losses
    b = distill.dpo_loss(pr, pc, rr, rc, beta=0.2, label_smoothing=0.5).losses
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_where_mask_excludes_examples():
    pc, pr, rc, rr = (logps(s) for s in range(4))
    where = np.array([True, False, True, True, False, True])
    out = distill.dpo_loss(pc, pr, rc, rr, beta=0.1, where=where)
    sub = distill.dpo_loss(pc[where], pr[where], rc[where], rr[where], beta=0.1)
    np.testing.assert_allclose(float(out.loss), float(sub.loss), rtol=1e-6)
    np.testing.assert_allclose(float(out.accuracy), float(sub.accuracy), rtol=1e-6)
    assert np.all(np.asarray(out.losses)[~where] == 0)


def test_simpo_matches_numpy_and_normalises_length():
    pc, pr = logps(5), logps(6)
    lc = np.arange(1, B + 1, dtype=np.float32) * 3
    lr = np.arange(B, 0, -1, dtype=np.float32) * 2
    out = distill.simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.5)
    z = 2.0 * pc / lc - 2.0 * pr / lr - 0.5
    np.testing.assert_allclose(np.asarray(out.losses), -np_log_sigmoid(z), rtol=1e-5, atol=1e-6)
    # doubling a response (length and summed log-prob) changes nothing
    twice = distill.simpo_loss(2 * pc, pr, 2 * lc, lr, beta=2.0, gamma=0.5)
    np.testing.assert_allclose(np.asarray(twice.losses), np.asarray(out.losses), rtol=1e-5)
    # the margin gamma makes an equal pair cost more than log 2
    eq = distill.simpo_loss(pc, pc, lc, lc, beta=2.0, gamma=0.5)
    np.testing.assert_allclose(np.asarray(eq.losses), -np_log_sigmoid(-0.5), rtol=1e-6)


def test_wrpo_reduces_to_dpo_and_mixes_linearly():
    ps, pt, pr, rs, rt, rr = (logps(s) for s in range(10, 16))
    w0 = distill.wrpo_loss(ps, pt, pr, rs, rt, rr, alpha=0.0, beta=0.2)
    d = distill.dpo_loss(pt, pr, rt, rr, beta=0.2)
    np.testing.assert_allclose(np.asarray(w0.losses), np.asarray(d.losses), rtol=1e-6)
    w1 = distill.wrpo_loss(ps, pt, pr, rs, rt, rr, alpha=1.0, beta=0.2)
    d1 = distill.dpo_loss(ps, pr, rs, rr, beta=0.2)
    np.testing.assert_allclose(np.asarray(w1.losses), np.asarray(d1.losses), rtol=1e-6)
    mid = distill.wrpo_loss(ps, pt, pr, rs, rt, rr, alpha=0.3, beta=0.2)
    chosen = 0.3 * 0.2 * (ps - rs) + 0.7 * 0.2 * (pt - rt)
    np.testing.assert_allclose(np.asarray(mid.chosen_rewards), chosen, rtol=1e-5, atol=1e-6)
    # traced alpha from the schedule inside jit
    f = jax.jit(lambda t: distill.wrpo_loss(ps, pt, pr, rs, rt, rr,
                                            alpha=distill.wrpo_alpha(t, 10, alpha_max=0.6),
                                            beta=0.2).loss)
    np.testing.assert_allclose(float(f(5)), float(distill.wrpo_loss(
        ps, pt, pr, rs, rt, rr, alpha=0.3, beta=0.2).loss), rtol=1e-6)


def test_wrpo_alpha_schedule():
    a = np.array([float(distill.wrpo_alpha(t, 20, alpha_max=0.8)) for t in range(0, 31)])
    assert a[0] == 0.0 and np.isclose(a[20], 0.8) and np.all(a[20:] == a[20])
    assert np.all(np.diff(a) >= 0) and np.all(np.diff(a[:21]) > 0)
    np.testing.assert_allclose(a[:21], 0.8 * np.arange(21) / 20, rtol=1e-6)


def test_fuserl_weights():
    r = np.random.default_rng(0).normal(size=(B, M)).astype(np.float32)
    for tau in (0.5, 1.0, 4.0):
        w = np.asarray(distill.fuserl_weights(r, temperature=tau))
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
        e = np.exp(r / tau - (r / tau).max(-1, keepdims=True))
        np.testing.assert_allclose(w, e / e.sum(-1, keepdims=True), rtol=1e-5)
    cold = np.asarray(distill.fuserl_weights(r, temperature=1e-4))
    np.testing.assert_array_equal(cold, np.eye(M)[r.argmax(-1)])
    where = np.ones((B, M), bool)
    where[0, r[0].argmax()] = False
    where[1] = False
    w = np.asarray(distill.fuserl_weights(r, temperature=1e-4, where=where))
    assert w[0, r[0].argmax()] == 0 and w[0].sum() == pytest.approx(1.0)
    assert np.all(w[1] == 0)


def test_fuserl_sft_and_po():
    lp = logps(20, B, M)
    r = np.random.default_rng(1).normal(size=(B, M)).astype(np.float32)
    lengths = np.random.default_rng(2).integers(3, 9, size=(B, M)).astype(np.float32)
    loss = distill.fuserl_sft_loss(lp, r, temperature=0.7, lengths=lengths)
    w = np.asarray(distill.fuserl_weights(r, temperature=0.7))
    np.testing.assert_allclose(float(loss), np.mean(-(w * lp / lengths).sum(-1)), rtol=1e-5)
    # tau -> 0: SFT on the best response only
    cold = distill.fuserl_sft_loss(lp, r, temperature=1e-4)
    np.testing.assert_allclose(float(cold), -np.mean(lp[np.arange(B), r.argmax(-1)]), rtol=1e-5)
    # the gradient is the weights (rewards are constants)
    g = jax.grad(lambda x: distill.fuserl_sft_loss(x, r, temperature=0.7))(jnp.asarray(lp))
    np.testing.assert_allclose(np.asarray(g), -w / B, rtol=1e-5, atol=1e-7)
    pc, pr, rc, rr = (logps(s, B, M) for s in range(21, 25))
    out = distill.fuserl_po_loss(pc, pr, rc, rr, r, beta=0.1, temperature=0.7)
    ref = (w * np_dpo(pc, pr, rc, rr, 0.1, 0.0)).sum(-1)
    np.testing.assert_allclose(np.asarray(out.losses), ref, rtol=1e-5)
    # one source per prompt: FusePO is DPO
    one = distill.fuserl_po_loss(pc[:, :1], pr[:, :1], rc[:, :1], rr[:, :1], r[:, :1], beta=0.1)
    d = distill.dpo_loss(pc[:, 0], pr[:, 0], rc[:, 0], rr[:, 0], beta=0.1)
    np.testing.assert_allclose(np.asarray(one.losses), np.asarray(d.losses), rtol=1e-6)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda a: distill.dpo_loss(a, a[:3], a, a), ValueError, "policy_rejected"),
        (lambda a: distill.dpo_loss(a, a, a, a, beta=0.0), ValueError, "beta"),
        (lambda a: distill.dpo_loss(a, a, a, a, label_smoothing=0.7), ValueError, "label_smoothing"),
        (lambda a: distill.dpo_loss(a.astype(np.int32), a, a, a), TypeError, "policy_chosen"),
        (lambda a: distill.dpo_loss(a, a, a, a, where=np.ones(B)), TypeError, "where"),
        (lambda a: distill.simpo_loss(a, a, np.zeros(B), np.ones(B)), ValueError, "chosen_length"),
        (lambda a: distill.simpo_loss(a, a, np.ones(B), np.ones(B), gamma=-1), ValueError, "gamma"),
        (lambda a: distill.wrpo_loss(a, a, a, a, a, a, alpha=1.5), ValueError, "alpha"),
        (lambda a: distill.wrpo_alpha(3, 0, alpha_max=0.5), ValueError, "total_steps"),
        (lambda a: distill.wrpo_alpha(3, 10, alpha_max=2.0), ValueError, "alpha_max"),
        (lambda a: distill.fuserl_weights(a), ValueError, "rewards"),
        (lambda a: distill.fuserl_weights(a.reshape(2, 3), temperature=0), ValueError, "temperature"),
        (lambda a: distill.fuserl_sft_loss(a.reshape(2, 3), a.reshape(3, 2)), ValueError, "rewards"),
    ],
)
def test_bad_inputs_name_the_parameter(call, exc, match):
    with pytest.raises(exc, match=match):
        call(logps(0))
