r"""A small pre-LN causal transformer language model with a key/value cache.

One forward serves training and decoding: ``tokens [B, L]`` at ``positions [B, L]`` attend
to every earlier position of their row, either within the call (training, no cache) or
through a cache of past keys and values (decoding). Positions are explicit, so rows may
hold prompts of different lengths: left-pad a prompt and give its pad tokens position
``-1``; they are neither written to the cache nor attended to, and their logits are
meaningless. Real tokens of a row must occupy positions ``0, 1, 2, ...`` in order.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Cache = dict[str, dict[str, jax.Array]]


def _causal_attention(q, k, v, q_pos, k_pos):
    """Softmax attention of ``q [B, L, H, e]`` over ``k, v [B, S, H, e]``.

    Query ``i`` sees key ``j`` iff ``0 <= k_pos[j] <= q_pos[i]``. A query that sees nothing
    (a pad query) gets zeros, not NaN.
    """
    scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
    scores = jnp.einsum("blhe,bshe->bhls", q, k) * scale
    visible = (k_pos[:, None, None, :] <= q_pos[:, None, :, None]) & (k_pos[:, None, None, :] >= 0)
    scores = jnp.where(visible, scores, jnp.asarray(-jnp.inf, scores.dtype))
    top = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhls,bshe->blhe", weights, v)


class DecoderBlock(nn.Module):
    """``x + out(attn(ln1(x)))``, then ``+ mlp_out(gelu(mlp_in(ln2(x))))``.

    Query, key and value kernels are ``[d, heads, d/heads]`` (``query``, ``key``, ``value``)
    and the output kernel ``[heads, d/heads, d]`` (``out``), as flax's attention lays them out.
    """

    heads: int
    mlp_width: int

    @nn.compact
    def __call__(self, x, positions, cache: dict[str, jax.Array] | None):
        """Applies the block to ``x [B, L, d]``; returns ``(x, cache)``."""
        d = x.shape[-1]
        proj = lambda name: nn.DenseGeneral((self.heads, d // self.heads), name=name)  # noqa: E731
        y = nn.LayerNorm(name="ln1")(x)
        q, k, v = proj("query")(y), proj("key")(y), proj("value")(y)
        if cache is None:
            keys, values, k_pos = k, v, positions
        else:
            size = cache["key"].shape[1]
            slots = jnp.where(positions >= 0, positions, size)  # pads land out of range: dropped
            rows = jnp.arange(x.shape[0])[:, None]
            keys = cache["key"].at[rows, slots].set(k.astype(cache["key"].dtype), mode="drop")
            values = cache["value"].at[rows, slots].set(v.astype(cache["value"].dtype), mode="drop")
            cache = {"key": keys, "value": values}
            k_pos = jnp.broadcast_to(jnp.arange(size), (x.shape[0], size))
        att = _causal_attention(q, keys.astype(q.dtype), values.astype(q.dtype), positions, k_pos)
        x = x + nn.DenseGeneral(d, axis=(-2, -1), name="out")(att)
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.Dense(self.mlp_width, name="mlp_in")(y)
        return x + nn.Dense(d, name="mlp_out")(nn.gelu(y)), cache


class Decoder(nn.Module):
    """A pre-LN causal transformer language model (GPT-style) over a token vocabulary.

    ``embed`` (``[vocab_size, d]``) + ``pos_embedding`` (``[max_length, d]``) -> blocks
    (``block_0, ...``) -> ``ln_final`` -> ``head`` (``[d, vocab_size]``).

    ``module.apply(variables, tokens)`` gives next-token logits ``[B, L, V]`` for training;
    ``module.apply(variables, tokens, positions, cache, method="decode")`` gives
    ``(logits, cache)`` with the new keys and values written at ``positions``, and
    :meth:`init_cache` makes the empty cache (no parameters needed).

    Attributes:
      vocab_size: Number of token ids ``V`` (256 for bytes).
      dim: Residual-stream width ``d``.
      depth: Number of blocks.
      heads: Attention heads (``d`` must be a multiple).
      mlp_width: Hidden width of each block's MLP.
      max_length: Longest sequence (positions ``0 .. max_length - 1``).
    """

    vocab_size: int = 256
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_width: int = 256
    max_length: int = 256

    def setup(self):
        """Declares the submodules."""
        if self.dim % self.heads:
            raise ValueError(f"Decoder: dim={self.dim} is not a multiple of heads={self.heads}.")
        self.embed = nn.Embed(
            self.vocab_size, self.dim, embedding_init=nn.initializers.normal(0.02)
        )
        self.pos_embedding = self.param(
            "pos_embedding", nn.initializers.normal(0.02), (self.max_length, self.dim)
        )
        self.blocks = [
            DecoderBlock(self.heads, self.mlp_width, name=f"block_{i}") for i in range(self.depth)
        ]
        self.ln_final = nn.LayerNorm()
        self.head = nn.Dense(self.vocab_size)

    def _forward(self, tokens, positions, cache: Cache | None):
        x = self.embed(tokens) + self.pos_embedding[jnp.clip(positions, 0, self.max_length - 1)]
        new_cache = {} if cache is not None else None
        for i, block in enumerate(self.blocks):
            name = f"block_{i}"
            x, c = block(x, positions, None if cache is None else cache[name])
            if cache is not None:
                new_cache[name] = c
        return self.head(self.ln_final(x)), new_cache

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Next-token logits ``[B, L, V]`` of ``tokens [B, L]`` (positions ``0 .. L-1``)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1]), tokens.shape)
        return self._forward(tokens, positions, None)[0]

    def decode(
        self, tokens: jax.Array, positions: jax.Array, cache: Cache
    ) -> tuple[jax.Array, Cache]:
        """Logits ``[B, L, V]`` of ``tokens`` at ``positions`` given the cache, and the new cache.

        Args:
          tokens: ``[B, L]`` token ids (``L`` = the prompt length when prefilling, 1 per step).
          positions: ``[B, L]`` positions of ``tokens``; ``-1`` marks pads.
          cache: From :meth:`init_cache` or the previous call.

        Returns:
          ``(logits, cache)``.
        """
        return self._forward(tokens, positions, cache)

    def init_cache(
        self, batch_size: int, length: int | None = None, dtype: Any = jnp.float32
    ) -> Cache:
        """An empty cache for ``batch_size`` rows of up to ``length`` (``max_length``) tokens.

        Args:
          batch_size: Rows ``B``.
          length: Cache slots ``S`` (positions ``0 .. S-1``); ``max_length`` by default.
          dtype: Dtype of the stored keys and values.

        Returns:
          ``{"block_i": {"key": [B, S, H, d/H], "value": [B, S, H, d/H]}}`` of zeros.
        """
        length = self.max_length if length is None else length
        if not 0 < length <= self.max_length:
            raise ValueError(f"Decoder.init_cache: length={length} not in 1..{self.max_length}.")
        shape = (batch_size, length, self.heads, self.dim // self.heads)
        zeros = lambda: jnp.zeros(shape, dtype)  # noqa: E731
        return {f"block_{i}": {"key": zeros(), "value": zeros()} for i in range(self.depth)}
