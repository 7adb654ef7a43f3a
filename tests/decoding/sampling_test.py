"""Samplers on log-probabilities: greedy, temperature, top-k, top-p, -inf safety, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import decoding

sample = jax.jit(decoding.sample)  # one compile per config structure, not an op-by-op run
mask_top_k = jax.jit(decoding.mask_top_k)
mask_top_p = jax.jit(decoding.mask_top_p)


_vmapped_sample = jax.jit(jax.vmap(decoding.sample, (0, None, None)))
N_DRAWS = 200  # one key count for every test: one split program


def draws(log_probs, cfg):
    keys = jax.random.split(jax.random.key(0), N_DRAWS)
    return np.asarray(_vmapped_sample(keys, log_probs, cfg))


@pytest.fixture(scope="module")
def log_probs():
    # NumPy draws and edits: no random-number kernel or eager scatter to compile.
    logits = (np.random.default_rng(1).standard_normal((6, 20)) * 2.0).astype(np.float32)
    logits[0, 3] = -np.inf
    logits[1, :] = -np.inf
    logits[1, 7] = 0.0
    return jax.nn.log_softmax(jnp.asarray(logits))


def test_greedy_is_argmax_and_needs_no_key(log_probs):
    out = sample(None, log_probs, decoding.greedy())
    np.testing.assert_array_equal(out, np.argmax(log_probs, axis=-1))
    assert out.dtype == jnp.int32


def test_top_k_1_is_greedy_for_every_key(log_probs):
    greedy = decoding.sample(None, log_probs, decoding.greedy())
    cfg = decoding.sampling(temperature=2.0, top_k=1)  # the top-k test's compiled draws
    np.testing.assert_array_equal(draws(log_probs, cfg), np.broadcast_to(greedy, (N_DRAWS, 6)))


def test_temperature_zero_is_greedy_and_sampling_is_reproducible(log_probs):
    greedy = decoding.sample(None, log_probs, decoding.greedy())
    zero = sample(jax.random.key(3), log_probs, decoding.sampling(temperature=0.0))
    np.testing.assert_array_equal(zero, greedy)
    cfg = decoding.sampling(temperature=1.0, top_p=0.9)
    a = sample(jax.random.key(7), log_probs, cfg)
    b = sample(jax.random.key(7), log_probs, cfg)
    np.testing.assert_array_equal(a, b)


def test_masks_keep_exactly_top_k_and_the_nucleus():
    lp = jnp.log(jnp.array([[0.05, 0.5, 0.2, 0.25], [0.25, 0.25, 0.25, 0.25]]))
    kept = np.isfinite(mask_top_k(lp, 2))
    np.testing.assert_array_equal(kept, [[0, 1, 0, 1], [1, 1, 0, 0]])  # ties: lower ids first
    kept = np.isfinite(mask_top_p(lp, 0.7))
    np.testing.assert_array_equal(kept, [[0, 1, 0, 1], [1, 1, 1, 0]])
    kept = np.isfinite(mask_top_p(lp, 1e-3))  # the first token always stays
    np.testing.assert_array_equal(kept.sum(axis=1), [1, 1])


def test_minus_inf_entries_are_never_drawn_and_give_no_nan(log_probs):
    cfg = decoding.sampling(temperature=1.5, top_k=5, top_p=0.95)
    out = draws(log_probs, cfg)
    assert not np.any(out[:, 0] == 3)
    assert np.all(out[:, 1] == 7)
    # Rows with no finite entry give token 0 for every key (the draws compiled above), and
    # the nucleus mask of such rows has no NaN (the [2, 4] mask compiled by the mask test).
    np.testing.assert_array_equal(draws(jnp.full((6, 20), -jnp.inf), cfg), 0)
    assert not np.any(np.isnan(mask_top_p(jnp.full((2, 4), -jnp.inf), 0.5)))


def test_top_k_draws_only_from_the_top_k(log_probs):
    cfg = decoding.sampling(temperature=1.0, top_k=3)
    out = draws(log_probs, cfg)
    top3 = np.argsort(-np.asarray(log_probs), axis=-1, kind="stable")[:, :3]
    for row in (0, 2, 3, 4, 5):
        assert set(out[:, row]) <= set(top3[row])
        assert len(set(out[:, row])) > 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_settings_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decoding.sampling(**kwargs)


def test_sampling_without_a_key_raises(log_probs):
    with pytest.raises(ValueError, match="key"):
        decoding.sample(None, log_probs, decoding.sampling())
