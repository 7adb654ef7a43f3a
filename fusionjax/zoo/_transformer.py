"""A small pre-LN transformer classifier over a sequence of tokens."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class TransformerBlock(nn.Module):
    """``x + attn(ln1(x))``, then ``+ mlp_out(gelu(mlp_in(ln2(x))))``.

    Attention is ``nn.MultiHeadDotProductAttention`` named ``attn`` (``query, key,
    value`` kernels ``[d, heads, d/heads]``, ``out`` kernel ``[heads, d/heads, d]``).
    """

    heads: int
    mlp_width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block to ``[B, T, d]``."""
        y = nn.LayerNorm(name="ln1")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, y)
        y = nn.LayerNorm(name="ln2")(x)
        y = nn.Dense(self.mlp_width, name="mlp_in")(y)
        return x + nn.Dense(x.shape[-1], name="mlp_out")(nn.gelu(y))


class Transformer(nn.Module):
    """A pre-LN transformer classifier over a short sequence of tokens.

    Tokens ``[B, T, f]`` -> ``embed`` + ``pos_embedding`` -> blocks -> ``ln_final`` ->
    mean over tokens -> ``head``.

    For 8x8 digits, each image row is one token (``T = 8``, ``f = 8``); images
    ``[B, H, W]`` or ``[B, H, W, 1]`` are read that way.

    Attributes:
      dim: Residual-stream width ``d``.
      depth: Number of :class:`TransformerBlock` (named ``block_0, ...``).
      heads: Attention heads.
      mlp_width: Hidden width of each block's MLP.
      num_classes: Output width.
    """

    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_width: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[B, T, f]`` tokens (or ``[B, H, W, 1]`` images) to ``[B, num_classes]`` logits."""
        if x.ndim == 4:
            x = x[..., 0]
        x = nn.Dense(self.dim, name="embed")(x)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), x.shape[-2:])
        x = x + pos[None]
        for i in range(self.depth):
            x = TransformerBlock(self.heads, self.mlp_width, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="ln_final")(x)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=-2))
