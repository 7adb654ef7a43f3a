r"""Objectives for learning merging coefficients: entropy (AdaMerging) and cross-entropy (aTLAS).

Both are pure functions of the coefficients, so they compose with any optax optimizer:

.. code-block:: python

  loss, grads = jax.value_and_grad(fj.learned.adamerging_loss)(
      coefficients, batches, base=base, task_vectors=tvs, logits_fn=logits_fn)

``logits_fn(params, task_index, x)`` returns the logits of task ``task_index`` (a Python
int, so every task may have its own head and number of classes) for inputs ``x``.
``batches`` holds one batch per task, as a list (task ``t`` is position ``t``) or a dict
``{task_index: batch}``.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fusionjax._src.base import Params
from fusionjax._src.base import Stacked
from fusionjax.learned import _coefficients
from fusionjax.learned._coefficients import Clamp
from fusionjax.learned._coefficients import Coefficients

LogitsFn = Callable[[Params, int, Any], jax.Array]
Batches = Sequence[Any] | Mapping[int, Any]


def entropy(logits: jax.Array, axis: int = -1) -> jax.Array:
    r"""Shannon entropy :math:`H(p) = -\sum_c p_c \log p_c` of :math:`p = \mathrm{softmax}(z)`.

    Computed from logits in log space (stable for large logits).

    Args:
      logits: Logits :math:`z`, ``[..., C]``.
      axis: The class axis.

    Returns:
      Entropies in nats, ``[...]``.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> round(float(fj.learned.entropy(jnp.zeros(4))), 4)  # log 4
      1.3863
    """
    logp = jax.nn.log_softmax(logits, axis=axis)
    return -jnp.sum(jnp.exp(logp) * logp, axis=axis)


def task_batches(batches: Batches) -> list[tuple[int, Any]]:
    """``(task_index, batch)`` pairs of a list or a ``{task_index: batch}`` dict (not empty)."""
    if isinstance(batches, Mapping):
        items = sorted(batches.items())
    elif isinstance(batches, (list, tuple)):
        items = list(enumerate(batches))
    else:
        raise TypeError(
            "batches must be a list (one batch per task) or a dict {task_index: batch}, "
            f"got {type(batches).__name__}."
        )
    if not items:
        raise ValueError("batches is empty: pass at least one task's batch.")
    return items


def _summed_over_tasks(task_loss, coefficients, batches, base, task_vectors, partition, clamp):
    """Merges with the coefficients once, then sums ``task_loss(params, t, batch)`` over tasks."""
    params = _coefficients.combine(
        base, task_vectors, coefficients, partition=partition, clamp=clamp
    )
    total = jnp.zeros((), jnp.float32)
    for t, batch in task_batches(batches):
        total = total + task_loss(params, t, batch)
    return total


def adamerging_loss(
    coefficients: Coefficients,
    batches: Batches,
    *,
    base: Params,
    task_vectors: Stacked,
    logits_fn: LogitsFn,
    partition: Params | None = None,
    clamp: Clamp = None,
) -> jax.Array:
    r"""AdaMerging's test-time objective: prediction entropy of the merged model, summed over tasks.

    .. math::
      \mathcal{L}(\lambda) = \sum_t \frac{1}{|B_t|}\sum_{x\in B_t}
      H\big(\mathrm{softmax}\, f_t(x;\ \theta_0 + \textstyle\sum_k \lambda_k\odot\tau_k)\big)

    with each task's own head :math:`f_t` and unlabeled test batches :math:`B_t`.
    Entropy is a surrogate for the loss the paper measures to correlate with it.

    Args:
      coefficients: Merging coefficients (differentiated), see
        :func:`fusionjax.learned.init_coefficients`.
      batches: Unlabeled inputs, one batch per task.
      base: Base parameters :math:`\theta_0`.
      task_vectors: Stacked task vectors ``[T, ...]`` (held fixed).
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]`` logits.
      partition: Block ids for block-wise coefficients.
      clamp: ``(low, high)`` clip of the coefficients in the forward pass.

    Returns:
      The scalar objective.

    References:
      Yang et al, `AdaMerging: Adaptive Model Merging for Multi-Task Learning
      <https://arxiv.org/abs/2310.02575>`_, ICLR 2024
    """

    def task_loss(params, t, x):
        return jnp.mean(entropy(logits_fn(params, t, x).astype(jnp.float32)))

    return _summed_over_tasks(
        task_loss, coefficients, batches, base, task_vectors, partition, clamp
    )


def atlas_loss(
    coefficients: Coefficients,
    batches: Batches,
    *,
    base: Params,
    task_vectors: Stacked,
    logits_fn: LogitsFn,
    partition: Params | None = None,
    clamp: Clamp = None,
) -> jax.Array:
    r"""The supervised objective of aTLAS: cross-entropy of the merged model on labeled batches.

    .. math::
      \mathcal{L}(\Lambda) = \sum_t \frac{1}{|B_t|}\sum_{(x,y)\in B_t}
      -\log \mathrm{softmax}\, f_t(x;\ \theta_0 + \textstyle\sum_k \Lambda_k\odot\tau_k)_y

    Args:
      coefficients: Merging coefficients (block-wise in aTLAS).
      batches: One ``(x, y)`` batch per task, integer labels ``y``.
      base: Base parameters.
      task_vectors: Stacked task vectors ``[T, ...]``.
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]`` logits.
      partition: Block ids for block-wise coefficients.
      clamp: Optional clip of the coefficients.

    Returns:
      The scalar objective.

    References:
      Zhang et al, `Knowledge Composition using Task Vectors with Learned Anisotropic
      Scaling <https://arxiv.org/abs/2407.02880>`_, NeurIPS 2024
    """

    def task_loss(params, t, batch):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                f"atlas_loss needs (x, y) batches; task {t} has {type(batch).__name__}."
            )
        x, y = batch
        logits = logits_fn(params, t, x).astype(jnp.float32)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return _summed_over_tasks(
        task_loss, coefficients, batches, base, task_vectors, partition, clamp
    )
