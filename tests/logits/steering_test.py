"""Steering: proxy-tuning, DExperts, contrastive decoding and guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import logits as fl

B, V = 4, 12


def _z(seed):  # NumPy draws: no random-number kernel to compile
    return jnp.asarray(np.random.default_rng(seed).standard_normal((B, V), np.float32) * 2.0)


def _lsm(x):
    return jax.nn.log_softmax(x, axis=-1)


def _close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_proxy_tuning_with_expert_equal_to_base_returns_the_strong_model(maybe_jit):
    s, e = _z(0), _z(1)
    _close(maybe_jit(fl.proxy_tuning)(s, e, e), _lsm(s))
    _close(fl.proxy_tuning(s, e, _z(2), alpha=0.0), _lsm(s))


def test_proxy_tuning_formula_and_per_example_alpha():
    s, e, b = _z(3), _z(4), _z(5)
    alpha = jnp.array([0.0, 0.5, 1.0, 2.0])
    want = _lsm(_lsm(s) + alpha[:, None] * (_lsm(e) - _lsm(b)))
    _close(fl.proxy_tuning(s, e, b, alpha=alpha), want)
    # The raw-logit form (Liu et al.) is the same distribution.
    _close(fl.proxy_tuning(s, e, b), _lsm(s + e - b))
    with pytest.raises(ValueError, match="alpha must be a scalar or have the batch shape"):
        fl.proxy_tuning(s, e, b, alpha=jnp.ones(3))
    with pytest.raises(ValueError, match="expert_logits must have the shape of strong_logits"):
        fl.proxy_tuning(s, e[:, :-1], b)


def test_dexperts_top_p_mask_is_the_base_nucleus():
    b, e, a = _z(6), _z(7), _z(8)
    out = fl.dexperts(b, e, a, alpha=2.0, top_p=0.6)
    p = np.asarray(jax.nn.softmax(b, axis=-1))
    for row in range(B):
        order = np.argsort(-p[row])
        before = np.cumsum(p[row][order]) - p[row][order]
        keep = np.zeros(V, bool)
        keep[order[before < 0.6]] = True
        np.testing.assert_array_equal(np.isfinite(np.asarray(out[row])), keep)
    inside = np.isfinite(np.asarray(out))
    want = _lsm(jnp.where(inside, _lsm(b) + 2.0 * (_lsm(e) - _lsm(a)), -jnp.inf))
    _close(jnp.where(inside, out, 0.0), jnp.where(inside, want, 0.0))


def test_dexperts_without_anti_expert_uses_the_base_and_top_p_one_masks_nothing():
    b, e = _z(9), _z(10)
    _close(fl.dexperts(b, e, alpha=0.5), _lsm(_lsm(b) + 0.5 * (_lsm(e) - _lsm(b))))
    assert jnp.all(jnp.isfinite(fl.dexperts(b, e, top_p=1.0)))
    with pytest.raises(ValueError, match="top_p"):
        fl.dexperts(b, e, top_p=0.0)


def test_contrastive_decoding_plausibility_mask_and_scores():
    e, a = _z(11), _z(12)
    alpha = 0.1
    out = fl.contrastive_decoding(e, a, alpha=alpha)
    le, la = _lsm(e), _lsm(a)
    head = le >= jnp.log(alpha) + jnp.max(le, axis=-1, keepdims=True)
    np.testing.assert_array_equal(jnp.isfinite(out), head)
    _close(jnp.where(head, out, 0.0), jnp.where(head, _lsm(jnp.where(head, le - la, -jnp.inf)), 0))
    beta = 0.5
    ob = fl.contrastive_decoding(e, a, alpha=alpha, beta=beta)
    want = _lsm(jnp.where(head, (1 + beta) * e - beta * a, -jnp.inf))  # raw logits, O'Brien & Lewis
    _close(jnp.where(head, ob, 0.0), jnp.where(head, want, 0.0))
    only_top = fl.contrastive_decoding(e, a, alpha=1.0)
    np.testing.assert_array_equal(jnp.argmax(only_top, -1), jnp.argmax(e, -1))
    assert jnp.all(jnp.sum(jnp.isfinite(only_top), -1) == 1)
    with pytest.raises(ValueError, match="alpha"):
        fl.contrastive_decoding(e, a, alpha=1.5)


def test_contrastive_guidance_formula_and_mask():
    m, e, b = _z(13), _z(14), _z(15)
    out = fl.contrastive_guidance(m, e, b, gamma=1.5, alpha=0.05)
    lm = _lsm(m)
    head = lm >= jnp.log(0.05) + jnp.max(lm, -1, keepdims=True)
    np.testing.assert_array_equal(jnp.isfinite(out), head)
    want = _lsm(jnp.where(head, lm + 1.5 * (_lsm(e) - _lsm(b)), -jnp.inf))
    _close(jnp.where(head, out, 0.0), jnp.where(head, want, 0.0))
    # With the expert as the sampled model: (1 + gamma) log p_E - gamma log p_B.
    _close(fl.contrastive_guidance(e, e, b, gamma=2.0, alpha=None), _lsm(3 * e - 2 * b))


def test_masked_tokens_never_make_nan():
    s, e, b = _z(16), _z(17), _z(18)
    s = s.at[:, 0].set(-jnp.inf)  # strong rules out token 0
    e = e.at[:, 1].set(-jnp.inf).at[:, 3].set(-jnp.inf)  # expert rules out 1 and 3
    b = b.at[:, 2].set(-jnp.inf).at[:, 3].set(-jnp.inf)  # base rules out 2 and 3
    outs = [
        fl.proxy_tuning(s, e, b),
        fl.dexperts(s, e, b, top_p=0.9),
        fl.contrastive_decoding(s, b, alpha=0.0),
        fl.contrastive_decoding(s, b, alpha=0.0, beta=1.0),
        fl.contrastive_guidance(s, e, b, alpha=0.0),
    ]
    for out in outs:
        assert not jnp.any(jnp.isnan(out)) and not jnp.any(out == jnp.inf)
        assert jnp.all(jnp.isneginf(out[:, 0]))
        _close(jax.nn.logsumexp(out, -1), jnp.zeros(B), 1e-5)
    pt = outs[0]
    assert jnp.all(jnp.isneginf(pt[:, 1])) and jnp.all(jnp.isneginf(pt[:, 2]))  # one side
    assert jnp.all(jnp.isfinite(pt[:, 3]))  # both small models rule it out: no evidence


def test_where_and_vmap():
    s, e, b = _z(19), _z(20), _z(21)
    where = jnp.arange(V) % 3 != 0
    out = fl.proxy_tuning(s, e, b, where=where)
    assert jnp.all(jnp.isneginf(out[:, ~where])) and jnp.all(jnp.isfinite(out[:, where]))
    _close(jax.vmap(fl.proxy_tuning)(s, e, b), fl.proxy_tuning(s, e, b))
    _close(jax.vmap(lambda x, y: fl.contrastive_decoding(x, y))(e, b), fl.contrastive_decoding(e, b))
