"""A VGG-style convolutional network."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class VGG(nn.Module):
    """3x3 convolutions with ReLU, ``"M"`` = 2x2 max pooling, global average pool, linear head.

    Convolutions are named ``Conv_0, Conv_1, ...`` in order (pooling entries get no
    name), the classifier ``Dense_0``.

    Attributes:
      features: Channels per convolution, with ``"M"`` for a max pool, e.g.
        ``(16, "M", 32, "M", 64)``.
      num_classes: Output width.
    """

    features: Sequence[int | str] = (32, "M", 64, "M", 128)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[B, H, W, C]`` images to ``[B, num_classes]`` logits."""
        i = 0
        for f in self.features:
            if f == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            else:
                x = nn.relu(nn.Conv(int(f), (3, 3), padding="SAME", name=f"Conv_{i}")(x))
                i += 1
        x = jnp.mean(x, axis=(-3, -2))
        return nn.Dense(self.num_classes, name="Dense_0")(x)
