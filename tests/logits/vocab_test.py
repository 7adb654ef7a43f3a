"""Vocabulary matching: explicit padding and truncation."""

import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import logits as fl


def test_pad_and_truncate():
    x = jnp.arange(6.0).reshape(2, 3)
    padded = fl.match_vocab(x, 5, mode="pad")
    assert padded.shape == (2, 5) and jnp.all(jnp.isneginf(padded[:, 3:]))
    np.testing.assert_array_equal(padded[:, :3], x)
    np.testing.assert_array_equal(fl.match_vocab(x, 2, mode="truncate"), x[:, :2])
    np.testing.assert_array_equal(fl.match_vocab(x, 3, mode="pad"), x)


def test_wrong_directions_and_modes_raise():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="use mode='truncate'"):
        fl.match_vocab(x, 2, mode="pad")
    with pytest.raises(ValueError, match="use mode='pad'"):
        fl.match_vocab(x, 4, mode="truncate")
    with pytest.raises(ValueError, match="mode must be"):
        fl.match_vocab(x, 4, mode="crop")
    with pytest.raises(ValueError, match="size"):
        fl.match_vocab(x, 0, mode="pad")


def test_stack_logits():
    a, b = jnp.zeros((4, 3)), jnp.ones((4, 5))
    with pytest.raises(ValueError, match=r"different vocabulary sizes \[3, 5\]"):
        fl.stack_logits([a, b])
    assert fl.stack_logits([a, b], mode="pad").shape == (2, 4, 5)
    assert fl.stack_logits([a, b], mode="truncate").shape == (2, 4, 3)
    with pytest.raises(ValueError, match=r"logits\[1\] has batch shape"):
        fl.stack_logits([a, jnp.ones((3, 3))])
    with pytest.raises(ValueError, match="empty"):
        fl.stack_logits([])


def test_padded_tokens_stay_masked_through_a_pool():
    out = fl.linear_pool(fl.stack_logits([jnp.zeros((2, 3)), jnp.zeros((2, 4))], mode="pad"))
    assert jnp.all(jnp.isfinite(out[:, 3]))  # the larger model allows it: the mixture keeps it
    out = fl.log_linear_pool(fl.stack_logits([jnp.zeros((2, 3)), jnp.zeros((2, 4))], mode="pad"))
    assert jnp.all(jnp.isneginf(out[:, 3])) and not jnp.any(jnp.isnan(out))
