"""Types every knowledge-fusion function shares: truncated distributions.

A teacher's next-token distribution over a large vocabulary is usually kept as its ``k``
most likely tokens (FuseLLM stores the top 10 per position); :class:`TopK` is that pair of
arrays, a pytree that crosses :func:`jax.jit` and :func:`jax.vmap`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fusionjax._src import validation


class TopK(NamedTuple):
    """A truncated distribution: the ``k`` most likely token ids and their log-probabilities.

    Attributes:
      ids: ``[..., k]`` int32 token ids, most likely first; ``-1`` marks an empty slot.
      log_probs: ``[..., k]`` log-probabilities of those ids (``-inf`` at empty slots), not
        renormalised: their ``logsumexp`` is the mass the top ``k`` hold.
    """

    ids: jax.Array
    log_probs: jax.Array


def top_k(log_probs: jax.Array, k: int) -> TopK:
    r"""The ``k`` most likely tokens of ``log_probs`` ``[..., V]`` as a :class:`TopK`.

    Args:
      log_probs: Log-probabilities (or logits, if the caller normalises later) ``[..., V]``.
      k: How many tokens to keep, ``1 <= k <= V``.

    Returns:
      ``TopK(ids [..., k] int32, log_probs [..., k])``, most likely first; a ``-inf`` entry
      keeps its id (a masked token is still a valid id, with zero mass).

    Raises:
      ValueError: if ``k`` is not an integer in ``[1, V]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusionjax import distill
      >>> out = distill.top_k(jnp.log(jnp.array([0.1, 0.6, 0.3])), 2)
      >>> out.ids.tolist()
      [1, 2]
    """
    log_probs = jnp.asarray(log_probs)
    if log_probs.ndim < 1:
        raise ValueError(f"log_probs must have a vocabulary axis, got shape {log_probs.shape}")
    v = log_probs.shape[-1]
    validation.check_int("k", k, lower=1)
    if k > v:
        raise ValueError(f"k must be at most the vocabulary size {v}, got {k}")
    values, ids = jax.lax.top_k(log_probs, k)
    return TopK(ids.astype(jnp.int32), values)
