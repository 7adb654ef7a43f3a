"""Model stock: interpolate the average of fine-tuned models towards the base."""

from __future__ import annotations

import itertools
from typing import Literal

import jax
import jax.numpy as jnp

from fusionjax._src.base import Step
from fusionjax.merging._linear import sum_rows
from fusionjax.merging._ties import check_choice

_HIGHEST = jax.lax.Precision.HIGHEST


def _at_least_two(hp, info):
    if info.num_models < 2:
        raise ValueError(f"model_stock needs at least 2 models, got {info.num_models}.")
    return hp


def _model_stock(x, *, filter_wise=False, axis=-1, convention="fusionjax", **_):
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 models, got {n}.")
    if filter_wise and x.ndim > 2:
        ax = axis % (x.ndim - 1) + 1
        flat = jnp.moveaxis(x, ax, -1)  # [n, ..., filter entries]
    else:
        flat = x.reshape(n, -1)
    norms = [jnp.sqrt(jnp.sum(flat[i] * flat[i], axis=-1)) for i in range(n)]
    cosines = []
    for i, j in itertools.combinations(range(n), 2):
        d = norms[i] * norms[j]
        dot = jnp.sum(flat[i] * flat[j], axis=-1)
        if convention == "mergekit":
            cosines.append(jnp.clip(dot / jnp.maximum(d, 1e-6), -1.0, 1.0))
        else:
            cosines.append(jnp.where(d > 0, dot / jnp.where(d > 0, d, 1.0), 0.0))
    cos = sum(cosines) / len(cosines)
    if convention == "mergekit":
        den = 1.0 + (n - 1) * cos
        singular = jnp.abs(den) < 1e-6
        ratio = jnp.where(singular, 0.0, n * cos / jnp.where(singular, 1.0, den))
    else:
        cos = jnp.clip(cos, 0.0, 1.0)
        ratio = n * cos / (1.0 + (n - 1) * cos)
    avg = sum_rows(x) / n
    if filter_wise and x.ndim > 2:
        return jnp.moveaxis(ratio[..., None] * jnp.moveaxis(avg, ax - 1, -1), -1, ax - 1)
    return ratio * avg


def model_stock(
    *,
    filter_wise: bool = False,
    axis: int = -1,
    convention: Literal["fusionjax", "mergekit"] = "fusionjax",
) -> Step:
    r"""Model Stock: the average of fine-tuned models, pulled towards the base per layer.

    For each leaf (or each filter, ``filter_wise``), with :math:`\cos\theta` the
    mean pairwise cosine similarity of the task vectors (the angle between
    fine-tuned models seen from the base),
    :math:`t = \frac{T\cos\theta}{1 + (T-1)\cos\theta}` and
    :math:`\theta = \theta_0 + t\,\frac1T\sum_t\tau_t`. Negative mean cosines are
    clipped to 0 (then :math:`t=0` and the leaf stays at the base).

    ``convention="mergekit"``: each pairwise cosine is
    :math:`\mathrm{clip}(\langle a,b\rangle/\max(\|a\|\|b\|, 10^{-6}), -1, 1)`,
    the mean is not clipped at 0 (so :math:`t` may be negative), and :math:`t=0`
    where :math:`|1+(T-1)\cos\theta| < 10^{-6}`.

    Args:
      filter_wise: One :math:`t` per filter instead of per leaf (mergekit's
        ``filter_wise``): the vectors are the leaf's entries along ``axis``, one per
        index of the other axes (mergekit: each row of torch's ``(out, in)``
        weight, ``axis=-1``; on a flax ``Dense`` kernel ``(in, out)`` that is
        ``axis=0``). Vectors (1-D leaves) are one filter.
      axis: The axis a filter's entries lie along (with ``filter_wise``).
      convention: ``"fusionjax"`` or ``"mergekit"`` (see above).

    Returns:
      A merger for :func:`fusionjax.merge` that needs at least two models.

    References:
      Jang et al, `Model Stock: All we need is just a few fine-tuned models
      <https://arxiv.org/abs/2403.19522>`_, ECCV 2024
    """
    check_choice("convention", convention, ("fusionjax", "mergekit"))
    if not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {axis!r}.")
    options = {}
    if filter_wise:
        options.update(filter_wise=True, axis=int(axis))
    if convention != "fusionjax":
        options["convention"] = convention
    return Step(
        "model_stock",
        _model_stock,
        reduces=True,
        prepare=_at_least_two,
        flat=not filter_wise,
        options=options,
    )
