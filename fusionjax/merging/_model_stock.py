"""Model stock: interpolate the average of fine-tuned models towards the base."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from fusionjax._src.base import Step
from fusionjax.merging._linear import sum_rows

_HIGHEST = jax.lax.Precision.HIGHEST


def _at_least_two(hp, info):
    if info.num_models < 2:
        raise ValueError(f"model_stock needs at least 2 models, got {info.num_models}.")
    return hp


def _model_stock(x, **_):
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 models, got {n}.")
    flat = x.reshape(n, -1)
    norms = [jnp.sqrt(jnp.vdot(flat[i], flat[i], precision=_HIGHEST)) for i in range(n)]
    cosines = []
    for i, j in itertools.combinations(range(n), 2):
        d = norms[i] * norms[j]
        dot = jnp.vdot(flat[i], flat[j], precision=_HIGHEST)
        cosines.append(jnp.where(d > 0, dot / jnp.where(d > 0, d, 1.0), 0.0))
    cos = jnp.clip(sum(cosines) / len(cosines), 0.0, 1.0)
    ratio = n * cos / (1.0 + (n - 1) * cos)
    return ratio * sum_rows(x) / n


def model_stock() -> Step:
    r"""Model Stock: the average of fine-tuned models, pulled towards the base per layer.

    For each leaf, with :math:`\cos\theta` the mean pairwise cosine similarity of
    the task vectors (the angle between fine-tuned models seen from the base),
    :math:`t = \frac{T\cos\theta}{1 + (T-1)\cos\theta}` and
    :math:`\theta = \theta_0 + t\,\frac1T\sum_t\tau_t`. Negative mean cosines are
    clipped to 0 (then :math:`t=0` and the leaf stays at the base).

    Returns:
      A merger for :func:`fusionjax.merge` that needs at least two models.

    References:
      Jang et al, `Model Stock: All we need is just a few fine-tuned models
      <https://arxiv.org/abs/2403.19522>`_, ECCV 2024
    """
    return Step("model_stock", _model_stock, reduces=True, prepare=_at_least_two, flat=True)
