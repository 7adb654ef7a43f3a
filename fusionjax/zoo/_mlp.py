"""A plain multilayer perceptron."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """``in -> widths[0] -> ... -> widths[-1] -> num_classes`` with ReLU between layers.

    Layers are ``nn.Dense`` named ``Dense_0 ... Dense_L`` (``L = len(widths)``);
    ``Dense_L`` is the classifier.

    Attributes:
      widths: Hidden widths.
      num_classes: Output width.
    """

    widths: Sequence[int] = (512, 512, 512)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[..., in]`` inputs (flattened images) to ``[..., num_classes]`` logits."""
        x = x.reshape(*x.shape[:-3], -1) if x.ndim >= 4 else x
        for i, width in enumerate(self.widths):
            x = nn.relu(nn.Dense(width, name=f"Dense_{i}")(x))
        return nn.Dense(self.num_classes, name=f"Dense_{len(self.widths)}")(x)
