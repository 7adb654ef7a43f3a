"""The encoder (a plain stack of ``nn.Dense``) and the fixed, CLIP-like task heads."""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Encoder(nn.Module):
    """MLP encoder ``64 -> widths[0] -> ... -> widths[-1]`` with GELU between layers.

    The layers are plain ``nn.Dense`` named ``Dense_0, Dense_1, ...`` with nothing else in
    between but the activation, so the input of every layer can be captured with
    ``nn.intercept_methods`` (as RegMean needs). The output is the unnormalized feature
    vector; the heads normalize it.

    Attributes:
      widths: Output width of each Dense layer; the last is the feature dimension.
    """

    widths: Sequence[int] = (512, 512, 128)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[..., 64]`` images to ``[..., widths[-1]]`` features."""
        for i, width in enumerate(self.widths):
            x = nn.Dense(width)(x)
            if i < len(self.widths) - 1:
                x = nn.gelu(x)
        return x


def normalize(x: jax.Array) -> jax.Array:
    """Scales the last axis to unit Euclidean norm."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def head_logits(features: jax.Array, head: jax.Array, scale: float) -> jax.Array:
    """Cosine logits ``scale * <f / |f|, h_c>`` of ``[..., d]`` features, ``[C, d]`` head."""
    return scale * (normalize(features) @ head.T)


# The testbed's functions as jax.tree_util.Partial objects (see Testbed.logits): the Python
# function is cached per (widths, scale), so it is the same object for every seed and
# keys a compiled loop; the heads are the Partial's array leaves, passed as arguments.


@functools.lru_cache(maxsize=16)
def features_fn(widths: tuple[int, ...]) -> Callable[..., jax.Array]:
    """``fn(params, x) -> [..., d]``: the encoder's unnormalized features."""
    encoder = Encoder(widths)

    def features(params, x):
        return encoder.apply({"params": params}, x)

    return features


@functools.lru_cache(maxsize=16)
def logits_fn(widths: tuple[int, ...], scale: float) -> Callable[..., jax.Array]:
    """``fn(heads, params, task_index, x) -> [..., C]``: a task's logits, heads a tuple."""
    features = features_fn(widths)

    def logits(heads, params, task_index, x):
        return head_logits(features(params, x), heads[task_index], scale)

    return logits


@functools.lru_cache(maxsize=16)
def task_logits_fn(widths: tuple[int, ...], scale: float) -> Callable[..., jax.Array]:
    """``fn(head, params, x) -> [..., C]``: logits through one given head."""
    features = features_fn(widths)

    def logits(head, params, x):
        return head_logits(features(params, x), head, scale)

    return logits


@functools.lru_cache(maxsize=16)
def head_logits_fn(scale: float) -> Callable[..., jax.Array]:
    """``fn(heads, task_index, features) -> [..., C]``: a task's head on features."""

    def logits(heads, task_index, features):
        return head_logits(features, heads[task_index], scale)

    return logits


def gap_basis(features: np.ndarray, dim: int) -> np.ndarray:
    """Directions the features barely use: the ``dim`` smallest eigenvectors, ``[d, dim]``.

    Eigenvectors of the uncentered second moment :math:`E[f f^T]`, so both the mean
    feature and the main variations are avoided.
    """
    moment = features.T.astype(np.float64) @ features.astype(np.float64) / features.shape[0]
    _, vectors = np.linalg.eigh(moment)  # ascending eigenvalues
    return vectors[:, :dim]


def make_head(
    prototypes: np.ndarray, gap: np.ndarray, semantic_weight: float, rng: np.random.Generator
) -> np.ndarray:
    r"""Builds one task's fixed head from its class prototypes, with a "modality gap".

    Row :math:`c` is :math:`h_c = \mathrm{normalize}(\epsilon\,\hat p_c +
    \sqrt{1-\epsilon^2}\,\nu_c)`: the unit prototype :math:`\hat p_c` (the "semantic"
    part, which alone decides the pretrained model's predictions) plus an orthonormal
    direction :math:`\nu_c` drawn at random inside the gap subspace, where pretrained
    features have almost no energy, like CLIP's text embeddings sit apart from its image
    embeddings. Pretrained logits are therefore low-contrast and fine-tuning must rotate
    features towards the :math:`\nu_c`.

    Args:
      prototypes: ``[C, d]`` class prototypes (any norm).
      gap: ``[d, k]`` orthonormal basis of the gap subspace, ``k >= C``.
      semantic_weight: :math:`\epsilon \in [0, 1]`.
      rng: Source of the random gap directions.

    Returns:
      ``[C, d]`` float32 head with unit rows.
    """
    num_classes = prototypes.shape[0]
    unit = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
    q, _ = np.linalg.qr(rng.standard_normal((gap.shape[1], num_classes)))
    nu = (gap @ q).T
    head = semantic_weight * unit + np.sqrt(1.0 - semantic_weight**2) * nu
    return (head / np.linalg.norm(head, axis=1, keepdims=True)).astype(np.float32)
