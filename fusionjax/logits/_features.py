r"""Feature-level ensembles of :math:`K` models with per-sample weights (Neural Ligand's ensemble).

:func:`expert_features` stacks the frozen models' features of the same inputs
``[K, n, d]``; :func:`ensemble_logits` mixes them with per-sample weights
:math:`w(x)` — at the features, :math:`h_t(\sum_k w_k(x) f_k(x))` (the paper), or at the
logits, :math:`\sum_k w_k(x) h_t(f_k(x))`. The per-sample *merge* of parameters, which
needs the models' weights, stays in :mod:`fusionjax.learned`.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp

from fusionjax._src import validation
from fusionjax._src.base import Params

FeaturesFn = Callable[[Params, Any], jax.Array]
HeadFn = Callable[[int, jax.Array], jax.Array]
Level = Literal["features", "logits"]
_HIGHEST = jax.lax.Precision.HIGHEST


def check_features(features: jax.Array, name: str = "features") -> None:
    """Raises unless ``features`` are floating point and stacked ``[K, ..., d]``."""
    if jnp.ndim(features) < 2:
        raise ValueError(
            f"{name} must be stacked [K, ..., d] (one row of features per model), got shape "
            f"{jnp.shape(features)}."
        )
    if not jnp.issubdtype(jnp.result_type(features), jnp.floating):
        raise TypeError(f"{name} must be floating point, got {jnp.result_type(features)}.")


def expert_features(finetuned: Sequence[Params], x: Any, features_fn: FeaturesFn) -> jax.Array:
    """The features of every model on the same inputs, stacked ``[K, n, d]``.

    Args:
      finetuned: The :math:`K` collaborating models.
      x: Inputs, ``[n, ...]`` (anything ``features_fn`` takes).
      features_fn: ``features_fn(params, x) -> [n, d]``.

    Returns:
      ``[K, n, d]`` features (the models stay frozen: compute these once and reuse them).
    """
    validation.check_nonempty(finetuned)
    feats = [jnp.asarray(features_fn(p, x)) for p in finetuned]
    for i, f in enumerate(feats):
        if f.ndim != 2 or f.shape != feats[0].shape:
            raise ValueError(
                f"features_fn(finetuned[{i}], x) must return [n, d] features like "
                f"finetuned[0]'s {feats[0].shape}, got shape {f.shape}."
            )
    return jnp.stack(feats)


def ensemble_logits(
    weights: jax.Array,
    features: jax.Array,
    head_fn: HeadFn,
    task_index: int,
    *,
    level: Level = "features",
) -> jax.Array:
    r"""The weighted ensemble of :math:`K` models, through task ``task_index``'s head.

    Args:
      weights: ``[n, K]`` per-sample weights (e.g. from :func:`fusionjax.learned.portland_weights`).
      features: ``[K, n, d]`` the models' features of the same inputs.
      head_fn: ``head_fn(task_index, features) -> [n, C]``, the task's (fixed) head.
      task_index: Which task's head; a Python int.
      level: ``"features"`` (the paper): :math:`h_t(\sum_k w_k f_k)`; ``"logits"``:
        :math:`\sum_k w_k h_t(f_k)`. They agree when the head is affine.

    Returns:
      ``[n, C]`` logits.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> head = lambda t, f: f @ jnp.eye(2)
      >>> feats = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # K = 2 models, n = 1
      >>> fj.logits.ensemble_logits(jnp.array([[0.25, 0.75]]), feats, head, 0)
      Array([[0.25, 0.75]], dtype=float32)
    """
    check_features(features)
    k = jnp.shape(features)[0]
    if jnp.shape(weights) != jnp.shape(features)[1:-1] + (k,):
        raise ValueError(
            f"weights must have shape {jnp.shape(features)[1:-1] + (k,)} for features of shape "
            f"{jnp.shape(features)} ([K, ..., d]), got {jnp.shape(weights)}."
        )
    w = jnp.asarray(weights, jnp.float32)
    if level == "features":
        mixed = jnp.einsum("...k,k...d->...d", w, features.astype(jnp.float32), precision=_HIGHEST)
        return head_fn(task_index, mixed)
    if level == "logits":
        logits = jnp.stack([head_fn(task_index, features[i]) for i in range(k)])
        return jnp.einsum("...k,k...c->...c", w, logits.astype(jnp.float32), precision=_HIGHEST)
    raise ValueError(f"level must be 'features' or 'logits', got {level!r}.")
