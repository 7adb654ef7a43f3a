"""A ResNet-20-like network (He et al. 2016, CIFAR variant) for small images."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _norm(kind: str, train: bool, name: str) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    if kind == "layer":
        return nn.LayerNorm(name=name)
    raise ValueError(f"norm must be 'batch' or 'layer', got {kind!r}")


class Block(nn.Module):
    """Basic residual block: ``relu(x' + norm2(conv2(relu(norm1(conv1(x))))))``.

    ``x'`` is ``x``, or ``shortcut_norm(shortcut_conv(x))`` (1x1, strided) when the
    width or the resolution changes.
    """

    features: int
    strides: int = 1
    norm: str = "batch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Applies the block to ``[B, H, W, C]``."""
        y = nn.Conv(
            self.features, (3, 3), self.strides, padding="SAME", use_bias=False, name="conv1"
        )(x)
        y = nn.relu(_norm(self.norm, train, "norm1")(y))
        y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv2")(y)
        y = _norm(self.norm, train, "norm2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False, name="shortcut_conv")(
                x
            )
            x = _norm(self.norm, train, "shortcut_norm")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet-20-like: a stem, three stages of ``blocks`` residual blocks, a linear head.

    Widths ``16w, 32w, 64w`` (``w = width``); stages 2 and 3 halve the resolution.
    Names: ``stem_conv``, ``stem_norm``, ``stage{s}_block{b}`` (each a :class:`Block`
    with ``conv1, norm1, conv2, norm2`` and, for the first block of stages 2-3,
    ``shortcut_conv, shortcut_norm``), ``head``. ``blocks=3`` is ResNet-20.

    Attributes:
      blocks: Residual blocks per stage.
      width: Width multiplier ``w``.
      num_classes: Output width.
      norm: ``"batch"`` (BatchNorm; pass ``train=True`` and ``mutable=["batch_stats"]``
        to train) or ``"layer"`` (LayerNorm over channels).
    """

    blocks: int = 3
    width: int = 1
    num_classes: int = 10
    norm: str = "batch"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Maps ``[B, H, W, C]`` images to ``[B, num_classes]`` logits."""
        x = nn.Conv(16 * self.width, (3, 3), padding="SAME", use_bias=False, name="stem_conv")(x)
        x = nn.relu(_norm(self.norm, train, "stem_norm")(x))
        for s, mult in enumerate((1, 2, 4)):
            for b in range(self.blocks):
                strides = 2 if (s > 0 and b == 0) else 1
                x = Block(16 * mult * self.width, strides, self.norm, name=f"stage{s}_block{b}")(
                    x, train
                )
        x = jnp.mean(x, axis=(-3, -2))
        return nn.Dense(self.num_classes, name="head")(x)
