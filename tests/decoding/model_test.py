"""DecoderModel adapters: linen (zoo.Decoder) and a tiny nnx causal decoder, stacked and mixed."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fusionjax as fj
from fusionjax import decoding
from fusionjax import zoo
from tests.decoding.conftest import VOCAB


class NnxDecoder(nnx.Module):
    """One attention + MLP block over embeddings; cache ``{"key", "value"}: [B, S, d]``."""

    def __init__(self, vocab_size, dim, max_length, *, rngs):
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (max_length, dim)) * 0.1)
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.mlp = nnx.Linear(dim, dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab_size, rngs=rngs)
        self.dim, self.max_length = dim, max_length

    def init_cache(self, batch_size, length):
        zeros = jnp.zeros((batch_size, length, self.dim))
        return {"key": zeros, "value": zeros}

    def __call__(self, tokens, positions, cache):
        b = tokens.shape[0]
        x = self.embed(tokens) + self.pos[jnp.clip(positions, 0, self.max_length - 1)]
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        size = cache["key"].shape[1]
        slots = jnp.where(positions >= 0, positions, size)
        rows = jnp.arange(b)[:, None]
        keys = cache["key"].at[rows, slots].set(k, mode="drop")
        values = cache["value"].at[rows, slots].set(v, mode="drop")
        scores = jnp.einsum("bld,bsd->bls", q, keys) / np.sqrt(self.dim).astype(np.float32)
        visible = jnp.arange(size)[None, None, :] <= positions[:, :, None]
        scores = jnp.where(visible, scores, -jnp.inf)
        weights = jax.nn.softmax(jnp.where(positions[:, :, None] >= 0, scores, 0.0), axis=-1)
        x = x + jnp.einsum("bls,bsd->bld", weights, values)
        x = x + nnx.gelu(self.mlp(x))
        return self.head(x) * 8.0, {"key": keys, "value": values}


def test_from_linen_is_the_modules_decode(lms):
    model, module, variables = lms["strong"]
    tokens, positions = jnp.array([[3, 4, 5]]), jnp.array([[0, 1, 2]])
    cache = model.init_cache(1, 8)

    @jax.jit
    def both(variables, cache):
        a = model.apply(variables, tokens, cache, positions)
        return a, module.apply(variables, tokens, positions, cache, method="decode")

    a, b = both(variables, cache)
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert model.max_length == module.max_length


def test_adapters_refuse_models_without_the_method():
    with pytest.raises(TypeError, match="no method 'generate'"):
        decoding.from_linen(zoo.Decoder(), method="generate")
    with pytest.raises(TypeError, match="no init_cache"):
        decoding.from_linen(zoo.MLP(), method="__call__")


def test_nnx_stacked_experts_mixed_with_linen_decode_as_by_hand(lms):
    experts = [NnxDecoder(VOCAB, 16, 32, rngs=nnx.Rngs(seed)) for seed in (1, 2)]
    model, params = decoding.from_nnx(experts[0])
    assert model.max_length == 32 and isinstance(params, nnx.State)
    stacked = fj.stack([params, nnx.split(experts[1], nnx.Param, ...)[1]])
    prompt = np.array([[5, 6, 7, 8, 9, 10], [11, 3, 2, 1, 4, 4]], np.int32)
    strong_model, _, strong_vars = lms["strong"]
    members = [
        decoding.Member(strong_model, strong_vars, jnp.array([[1, 2, 3], [4, 5, 6]])),
        decoding.Member(model, stacked, prompt, stacked=True),
    ]
    out = decoding.generate(
        members, lambda logits: jax.nn.log_softmax(logits[1][1]), max_new_tokens=5
    )

    # By hand: expert 1 alone, full forwards over a buffer of the final width (no reuse of
    # a cache between steps), greedy.
    n, width = 5, prompt.shape[1]
    seq = np.zeros((2, width + n), np.int32)
    seq[:, :width] = prompt
    positions = jnp.broadcast_to(jnp.arange(width + n), seq.shape)
    forward = nnx.jit(lambda m, t: m(t, positions, m.init_cache(2, width + n))[0])
    for i in range(n):
        logits = np.asarray(forward(experts[1], jnp.asarray(seq)))
        seq[:, width + i] = np.argmax(logits[:, width + i - 1], axis=-1)
    np.testing.assert_array_equal(out.tokens, seq[:, width:])
