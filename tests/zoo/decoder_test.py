"""The zoo's causal decoder: cached decoding equals the full forward, pads are inert."""

import jax
import numpy as np
import pytest

from fusionjax import zoo

MODEL = zoo.Decoder(dim=32, depth=2, heads=4, mlp_width=64, max_length=32)
# Jitted once here: an eager flax apply compiles every op of the model one by one.
APPLY = jax.jit(MODEL.apply, static_argnames="method")


@pytest.fixture(scope="module")
def setup():
    # NumPy draws and slices: no random-number kernel or eager slice to compile.
    tokens = np.random.default_rng(0).integers(0, 256, (2, 10)).astype(np.int32)
    variables = jax.jit(MODEL.init)(jax.random.key(1), tokens)
    return tokens, variables, APPLY(variables, tokens)  # the full forward, [2, 10, V]


def test_prefill_then_steps_equal_the_full_forward(setup):
    tokens, variables, full = setup
    positions = np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10))
    cache = MODEL.init_cache(2, 16)
    logits, cache = APPLY(variables, tokens[:, :6], positions[:, :6], cache, method="decode")
    outs = [logits]
    for t in range(6, 10):
        logits, cache = APPLY(
            variables, tokens[:, t : t + 1], positions[:, t : t + 1], cache, method="decode"
        )
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5)


def test_left_padded_rows_equal_their_unpadded_forward(setup):
    tokens, variables, full = setup
    padded = tokens.copy()
    padded[1, :3] = 7
    positions = np.stack([np.arange(10), np.arange(10) - 3]).astype(np.int32)
    logits, cache = APPLY(
        variables, padded, positions, MODEL.init_cache(2, 16), method="decode"
    )
    logits, full = np.asarray(logits), np.asarray(full)  # sliced in NumPy: no eager slices
    # Row 1's unpadded forward: its 7 tokens first, then any 3 (causal attention: columns
    # 0..6 see only those 7), in a [2, 10] batch, the shape the fixture's forward compiled.
    shifted = tokens.copy()
    shifted[1] = np.roll(shifted[1], -3)
    unpadded = np.asarray(APPLY(variables, shifted))[1, :7]
    np.testing.assert_allclose(logits[1, 3:], unpadded, atol=1e-5)
    np.testing.assert_allclose(logits[0], full[0], atol=1e-5)  # row 0 has no pads
    assert np.isfinite(logits).all()
    # Pads are not written: row 1 fills slots 0..6 only.
    assert float(np.abs(np.asarray(cache["block_0"]["key"])[1, 7:]).max()) == 0.0


def test_cache_shapes_and_bad_lengths():
    cache = MODEL.init_cache(3)
    assert cache["block_1"]["value"].shape == (3, 32, 4, 8)
    with pytest.raises(ValueError, match="length=40"):
        MODEL.init_cache(1, 40)
