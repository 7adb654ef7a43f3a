r"""Neural Ligand's two collaborations with per-sample weights: the ensemble and the merge.

The ensemble mixes the :math:`K` models' features, :math:`h_t(\sum_k w_k(x) f_k(x))`
(:func:`ensemble_logits`, which lives in :mod:`fusionjax.logits` with
:func:`expert_features`; both are re-exported here); the merge mixes their
parameters, one model per input,
:math:`h_t(f(\theta_0 + \sum_k w_k(x)\tau_k, x))` (:func:`merged_logits`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from fusionjax._src import pytrees
from fusionjax._src import validation
from fusionjax._src.base import Params
from fusionjax._src.base import Stacked
from fusionjax.learned import _coefficients
from fusionjax.logits._features import FeaturesFn
from fusionjax.logits._features import HeadFn
from fusionjax.logits._features import Level
from fusionjax.logits._features import ensemble_logits
from fusionjax.logits._features import expert_features

__all__ = [
    "FeaturesFn",
    "HeadFn",
    "Level",
    "ensemble_logits",
    "expert_features",
    "features_of",
    "merged_features",
    "merged_logits",
]


def merged_features(
    base: Params,
    task_vectors: Stacked,
    weights: jax.Array,
    x: jax.Array,
    *,
    features_fn: FeaturesFn,
    batch_size: int = 32,
) -> jax.Array:
    r"""Features of the per-sample merge :math:`\theta(x_i) = \theta_0 + \sum_k w_{ik}\tau_k`.

    Each input gets its own merged model (the paper's parameter-level collaboration);
    with weights on the simplex this is :math:`\sum_k w_{ik}\theta_k`. Samples are
    processed ``batch_size`` at a time (``batch_size`` merged copies of the model in
    memory at once). The result does not depend on the task, so one compiled program
    serves every task's head (see :func:`merged_logits`).

    Args:
      base: Base parameters :math:`\theta_0`.
      task_vectors: Stacked task vectors ``[K, ...]``.
      weights: ``[n, K]`` per-sample weights; one shared ``[K]`` vector is also accepted.
      x: ``[n, ...]`` inputs.
      features_fn: ``features_fn(params, x) -> [n, d]`` (jit-compatible).
      batch_size: Samples merged and evaluated together.

    Returns:
      ``[n, d]`` features, row :math:`i` computed with :math:`\theta(x_i)`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> base, tvs = {"w": jnp.zeros(2)}, {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> features_fn = lambda p, x: x * p["w"][None]
      >>> weights = jnp.array([[1.0, 0.0], [0.5, 0.5]])  # one merge per input
      >>> fj.learned.merged_features(base, tvs, weights, jnp.ones((2, 2)), features_fn=features_fn)
      Array([[1. , 0. ],
             [0.5, 0.5]], dtype=float32)
    """
    validation.check_hparam("batch_size", batch_size, lower=1)
    k = _coefficients.num_tasks(task_vectors)
    n = jnp.shape(x)[0] if jnp.ndim(x) else None
    w = jnp.asarray(weights, jnp.float32)
    if w.shape == (k,) and n is not None:
        w = jnp.broadcast_to(w, (n, k))
    if n is None or w.shape != (n, k):
        raise ValueError(
            f"weights must be [n, K] = ({n}, {k}) for {n} inputs and {k} task vectors (or "
            f"[K]), got shape {jnp.shape(weights)}."
        )
    dynamic, static = pytrees.jit_partition(features_fn)
    return _merged_features_jit(static, int(batch_size), dynamic, base, task_vectors, w, x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _merged_features_jit(static, batch_size, dynamic, base, task_vectors, w, x):
    features_fn = pytrees.jit_combine(dynamic, static)

    def one(args):
        wi, xi = args
        params = _coefficients.combine(base, task_vectors, wi)
        return features_fn(params, xi[None])[0]

    return jax.lax.map(one, (w, x), batch_size=min(batch_size, int(w.shape[0])))


def merged_logits(
    base: Params,
    task_vectors: Stacked,
    weights: jax.Array,
    x: jax.Array,
    *,
    features_fn: FeaturesFn,
    head_fn: HeadFn,
    task_index: int,
    batch_size: int = 32,
) -> jax.Array:
    r"""Logits of the per-sample merge: :math:`h_t(f(\theta(x_i), x_i))`, one merge per input.

    :math:`\theta(x_i) = \theta_0 + \sum_k w_{ik}\tau_k`; see :func:`merged_features`.

    Args:
      base: Base parameters :math:`\theta_0`.
      task_vectors: Stacked task vectors ``[K, ...]``.
      weights: ``[n, K]`` per-sample weights; one shared ``[K]`` vector is also accepted.
      x: ``[n, ...]`` inputs.
      features_fn: ``features_fn(params, x) -> [n, d]`` (jit-compatible).
      head_fn: ``head_fn(task_index, features) -> [n, C]``.
      task_index: Which task's head; a Python int.
      batch_size: Samples merged and evaluated together.

    Returns:
      ``[n, C]`` logits; see :func:`merged_features`.
    """
    feats = merged_features(
        base, task_vectors, weights, x, features_fn=features_fn, batch_size=batch_size
    )
    return head_fn(task_index, feats)


def features_of(features_fn: FeaturesFn, params: Params, x: Any) -> jax.Array:
    """``features_fn(params, x)``, compiled once per static part of ``features_fn`` and shapes.

    A :class:`jax.tree_util.Partial` ``features_fn`` has its arrays passed as arguments
    (see :func:`fusionjax._src.pytrees.jit_partition`), so equal functions of different
    models or seeds share the compiled forward pass.
    """
    dynamic, static = pytrees.jit_partition(features_fn)
    return _features_jit(static, dynamic, params, x)


@functools.partial(jax.jit, static_argnums=0)
def _features_jit(static, dynamic, params, x):
    return pytrees.jit_combine(dynamic, static)(params, x)
