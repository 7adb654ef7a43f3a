"""Pools and votes over stacked logits: identities, weights, masks, errors, jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import logits as fl
from tests._testing import F32
from tests._testing import np_log_softmax
from tests._testing import np_logsumexp

POOLS = [fl.mean_logits, fl.linear_pool, fl.log_linear_pool]
ALL_POOLS = POOLS + [lambda z, w=None, **kw: fl.max_logits(z, **kw)]


Z3, Z2 = (3, 4, 6), (2, 4, 6)  # the stacked shapes most tests share: each new one compiles


# Inputs and references stay NumPy arrays: the pools' compiled kernels take them as they
# are, while every eager jnp op (asarray, stack, .at[].set, a reference log_softmax)
# compiles a program per shape.
def _logits(seed, shape):  # NumPy draws: no random-number kernel to compile per shape
    return np.random.default_rng(seed).standard_normal(shape, np.float32) * 2.0


def _f32(x):
    return np.asarray(x, np.float32)


def _close(a, b, **tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **(tol or F32))


@pytest.mark.parametrize("pool", ALL_POOLS)
def test_identical_models_give_the_model(pool, maybe_jit):
    z = _logits(0, Z3[1:])
    stacked = np.stack([z, z, z])
    if pool is fl.log_linear_pool:  # exponents must sum to one to give the model back
        out = maybe_jit(pool)(stacked, np.full((3,), 1 / 3, np.float32))
    else:
        out = maybe_jit(pool)(stacked)
    _close(out, np_log_softmax(z), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("pool", POOLS)
def test_one_hot_weights_select_a_model(pool):
    z = _logits(1, Z3)
    out = pool(z, _f32([0.0, 1.0, 0.0]))
    _close(out, np_log_softmax(z[1]), rtol=1e-5, atol=2e-6)


def test_per_example_one_hot_weights_select_per_example():
    z = _logits(2, Z3)
    w = _f32([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])  # [M, batch]
    out = fl.linear_pool(z, w)
    want = np.where(w[0][:, None] > 0, np_log_softmax(z[0]), np_log_softmax(z[1]))
    _close(out, want, rtol=1e-5, atol=2e-6)


def test_product_of_a_model_with_itself_is_temperature_one_half():
    z = _logits(3, Z2[1:])
    out = fl.log_linear_pool(np.stack([z, z]), _f32([1.0, 1.0]))
    _close(out, np_log_softmax(z / 0.5), rtol=1e-5, atol=1e-5)


def test_mixture_of_a_model_with_itself_is_the_model():
    z = _logits(4, Z2[1:])
    out = fl.linear_pool(np.stack([z, z]), _f32([0.3, 0.7]))
    _close(out, np_log_softmax(z), rtol=1e-5, atol=2e-6)


def test_linear_pool_is_the_mixture():
    z = _logits(5, Z3)
    w = _f32([0.2, 0.3, 0.5])
    want = np.log(np.einsum("m,mbv->bv", np.float64(w), np.exp(np_log_softmax(z))))
    _close(fl.linear_pool(z, w), want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("pool", POOLS)
def test_per_model_shifts_change_nothing_and_outputs_are_normalised(pool):
    z = _logits(6, Z3)
    shift = _logits(7, (3, 4, 1)) * 10.0
    w = _f32([0.5, 1.0, 2.0])
    a, b = pool(z, w), pool(z + shift, w)
    _close(a, b, rtol=1e-5, atol=1e-5)
    _close(np_logsumexp(a), np.zeros(4), atol=1e-5)


def test_masked_tokens_make_no_nan():
    z = _logits(8, Z3)
    z[0, :, 1], z[1, :, 2], z[:, :, 4] = -np.inf, -np.inf, -np.inf
    w = _f32([0.0, 0.5, 0.5])  # the model masking token 1 has weight 0
    for pool in POOLS:
        out = np.asarray(pool(z, w))
        assert not np.any(np.isnan(out)), pool.__name__
        assert np.all(np.isfinite(out[:, 1])), pool.__name__  # weight-0 model's mask ignored
        assert np.all(np.isneginf(out[:, 4])), pool.__name__  # everyone masks token 4
    # A weighted model's mask rules the token out of the product, not out of the mixture.
    assert np.all(np.isneginf(np.asarray(fl.log_linear_pool(z, w))[:, 2]))
    assert np.all(np.isneginf(np.asarray(fl.mean_logits(z, w))[:, 2]))
    assert np.all(np.isfinite(np.asarray(fl.linear_pool(z, w))[:, 2]))
    assert not np.any(np.isnan(np.asarray(fl.max_logits(z))))


def test_negative_product_weights_with_masked_tokens_make_no_nan():
    z = _logits(9, Z2)
    z[1, :, 3] = -np.inf
    out = np.asarray(fl.log_linear_pool(z, _f32([2.0, -1.0])))
    assert not np.any(np.isnan(out)) and np.all(np.isneginf(out[:, 3]))


def test_where_restricts_every_model():
    z = _logits(10, Z3)
    where = np.array([True, False, True, True, False, True])
    for pool in ALL_POOLS:
        out = np.asarray(pool(z, where=where))
        assert np.all(np.isneginf(out[:, ~where])) and np.all(np.isfinite(out[:, where]))
        _close(np_logsumexp(out), np.zeros(4), atol=1e-5)


@pytest.mark.parametrize("pool", POOLS + [fl.majority_vote, fl.runoff_vote])
def test_weight_shapes_are_validated(pool):
    z = _logits(11, Z3)
    for bad in (_f32(np.ones(s)) for s in (4, (3, 1), (4, 3), (3, 4, 6))):
        with pytest.raises(ValueError, match=r"weights must have shape \[M\]"):
            pool(z, bad)
    with pytest.raises(ValueError, match="where must have shape"):
        pool(z, where=np.ones(5, bool))


@pytest.mark.parametrize("pool", [fl.mean_logits, fl.linear_pool, fl.majority_vote])
def test_negative_or_zero_weights_are_refused_where_they_make_no_sense(pool):
    z = _logits(12, Z2)
    with pytest.raises(ValueError, match="weights"):
        pool(z, _f32([1.0, -1.0]))
    with pytest.raises(ValueError, match="positive sum"):
        pool(z, _f32([0.0, 0.0]))


def test_lists_with_different_vocabularies_need_a_mode():
    with pytest.raises(ValueError, match="mode='truncate'"):
        fl.linear_pool([jnp.zeros((2, 5)), jnp.zeros((2, 6))])
    out = fl.linear_pool([jnp.zeros((2, 5)), jnp.zeros((2, 5))])
    assert out.shape == (2, 5)


def test_pools_jit_and_vmap():
    z = _logits(13, Z3)
    w = _f32([0.2, 0.3, 0.5])
    for pool in POOLS:
        eager = pool(z, w)
        _close(jax.jit(pool)(z, w), eager, rtol=1e-5, atol=1e-6)
        mapped = jax.vmap(pool, in_axes=(1, None))(z, w)  # over the batch axis
        _close(mapped, eager, rtol=1e-5, atol=1e-6)


def test_majority_vote_counts_weights_and_breaks_ties_by_probability():
    # Two models disagree with equal weight: the tie goes to the larger summed probability.
    z = _f32([[[2.0, 1.9, -5.0]], [[-5.0, 3.0, 0.0]]])  # model 0 -> 0, model 1 -> 1
    assert int(fl.majority_vote(z)[0]) == 1  # p(1) is larger summed over the two models
    assert int(fl.majority_vote(z, _f32([2.0, 1.0]))[0]) == 0
    # Exact ties everywhere fall to the lowest index.
    assert int(fl.majority_vote(np.zeros((2, 1, 4), np.float32))[0]) == 0
    # Per-example weights.
    w = _f32([[1.0, 0.0], [0.0, 1.0]])
    zz = np.concatenate([z, z], axis=1)
    np.testing.assert_array_equal(fl.majority_vote(zz, w), [0, 1])


def _irv_reference(z, w):
    """Instant runoff in plain Python with the documented tie rules."""
    m, v = z.shape
    e = np.exp(z - z.max(-1, keepdims=True))
    pooled = (w[:, None] * e / e.sum(-1, keepdims=True)).sum(0)
    alive = {int(np.argmax(z[i])) for i in range(m)}
    while len(alive) > 1:
        tally = dict.fromkeys(alive, 0.0)
        for i in range(m):
            tally[max(alive, key=lambda t, i=i: (z[i, t], -t))] += w[i]
        fewest = min(tally.values())
        tied = [t for t in alive if tally[t] <= fewest]
        alive.remove(min(tied, key=lambda t: (float(pooled[t]), -t)))
    return alive.pop()


def test_runoff_vote_matches_a_reference():
    z = np.random.default_rng(14).integers(0, 4, (5, 40, 6)).astype(np.float32)
    z = z + _logits(15, (5, 40, 6)) * 1e-3  # distinct rankings
    w = np.array([1.0, 1.0, 2.0, 0.5, 1.0], np.float32)
    got = np.asarray(jax.jit(fl.runoff_vote)(z, w))
    want = [_irv_reference(z[:, i], w) for i in range(z.shape[1])]
    np.testing.assert_array_equal(got, want)


def test_runoff_vote_differs_from_plurality_when_transfers_matter():
    z = _f32([[3.0, 2.0, 1.0]] * 2 + [[2.0, 3.0, 1.0]] * 2 + [[1.0, 2.0, 3.0]])
    assert int(fl.runoff_vote(z)) == 1
    assert int(fl.majority_vote(z)) in (0, 1)


def test_votes_respect_where_and_vmap():
    z = _logits(16, Z3)
    where = np.array([False, True, True, True, True, True])
    for vote in (fl.majority_vote, fl.runoff_vote):
        assert np.all(np.asarray(vote(z, where=where)) != 0)
        np.testing.assert_array_equal(jax.vmap(vote, in_axes=1)(z), vote(z))


def test_votes_with_one_model_give_its_argmax():
    z = _logits(17, (1, *Z3[1:]))
    for vote in (fl.majority_vote, fl.runoff_vote):
        np.testing.assert_array_equal(vote(z), np.argmax(z[0], axis=-1))


def test_identical_voters_agree_with_argmax():
    z = _logits(18, Z3[1:])
    for vote in (fl.majority_vote, fl.runoff_vote):
        np.testing.assert_array_equal(vote(np.stack([z] * 3)), np.argmax(z, axis=-1))
