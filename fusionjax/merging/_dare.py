"""DARE: drop and rescale task-vector entries at random."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike, Step
from fusionjax._src.merge import chain
from fusionjax.merging._linear import task_arithmetic
from fusionjax.merging._ties import elect_sign, disjoint_mean
from fusionjax.merging._linear import scale


def drop_and_rescale(*, drop_rate: ArrayLike = 0.9) -> Step:
    r"""DARE: drops each task-vector entry with probability :math:`p`, rescales the rest.

    :math:`\hat\tau_t = m_t \odot \tau_t / (1 - p)` with
    :math:`m_t \sim \mathrm{Bernoulli}(1-p)` drawn independently per entry and
    per model, so :math:`\mathbb{E}[\hat\tau_t] = \tau_t`. Random: needs ``key``.
    The mask of a leaf depends only on ``key`` and the leaf's path.

    Args:
      drop_rate: :math:`p\in[0, 1)`, the fraction of entries dropped. The paper
        drops 90% (and up to 99%) of the delta parameters of large language
        models; small models tolerate less.

    Returns:
      A random task-vector :class:`fusionjax.Step` ``[T, ...] -> [T, ...]``.

    References:
      Yu et al, `Language Models are Super Mario: Absorbing Abilities from
      Homologous Models as a Free Lunch <https://arxiv.org/abs/2311.03099>`_,
      ICML 2024
    """
    validation.check_hparam("drop_rate", drop_rate, lower=0.0, upper=1.0, upper_open=True)

    def leaf_fn(x, *, key=None, **_):
        if key is None:
            raise ValueError("drop_and_rescale is random and needs a PRNG key.")
        keep = 1.0 - jnp.asarray(drop_rate, x.dtype)
        mask = jax.random.bernoulli(key, keep, x.shape)
        return jnp.where(mask, x / keep, jnp.zeros((), x.dtype))

    return Step("drop_and_rescale", reduces=False, leaf_fn=leaf_fn, needs_key=True)


def dare(
    *, drop_rate: ArrayLike = 0.9, merger: Optional[Step] = None
) -> Step:
    r"""DARE followed by a merger (task arithmetic by default).

    ``dare(drop_rate=p, merger=m)`` is ``chain(drop_and_rescale(drop_rate=p), m)``.

    Args:
      drop_rate: :math:`p`, see :func:`drop_and_rescale`.
      merger: The merger applied to the sparsified task vectors; default
        :func:`task_arithmetic` with its default :math:`\lambda`. Any merger
        works, e.g. :func:`ties` (``density=1.0`` to keep DARE's sparsity only).

    Returns:
      A random merger for :func:`fusionjax.merge` (pass ``key=``).

    Examples:
      >>> import jax, jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(3)}
      >>> fts = [{"w": jnp.ones(3)}, {"w": 2 * jnp.ones(3)}]
      >>> m = fj.merging.dare(drop_rate=0.0, merger=fj.merging.mean())
      >>> fj.merge(base, fts, m, key=jax.random.key(0))
      {'w': Array([1.5, 1.5, 1.5], dtype=float32)}

    References:
      Yu et al, `Language Models are Super Mario
      <https://arxiv.org/abs/2311.03099>`_, ICML 2024
    """
    return chain(drop_and_rescale(drop_rate=drop_rate), merger or task_arithmetic())


def dare_ties(*, drop_rate: ArrayLike = 0.9, scaling: ArrayLike = 1.0) -> Step:
    r"""DARE sparsification with TIES sign election and disjoint mean.

    ``chain(drop_and_rescale(p), elect_sign(), disjoint_mean(), scale(λ))``: DARE
    replaces TIES' magnitude trimming (mergekit's ``dare_ties``).

    Args:
      drop_rate: :math:`p`, see :func:`drop_and_rescale`.
      scaling: :math:`\lambda`.

    Returns:
      A random merger for :func:`fusionjax.merge` (pass ``key=``).

    References:
      Yu et al, `Language Models are Super Mario
      <https://arxiv.org/abs/2311.03099>`_, ICML 2024
    """
    return chain(drop_and_rescale(drop_rate=drop_rate), elect_sign(), disjoint_mean(), scale(scaling))
