r"""Linear interpolation between two models and the barrier along it.

Two networks are *linearly mode connected* when the loss along the segment
:math:`\theta(t) = (1 - t)\,\theta_A + t\,\theta_B` stays at the level of the
endpoints. The barrier is the largest excess over the straight line between the
endpoints' values (Frankle et al., 2020; Entezari et al., 2022; the quantity Git
Re-Basin reduces by aligning :math:`\theta_B` first):

.. math::
  B = \max_t \; L(\theta(t)) - \big[(1 - t) L(\theta_A) + t L(\theta_B)\big].

References:
  Frankle et al., `Linear Mode Connectivity and the Lottery Ticket Hypothesis
  <https://arxiv.org/abs/1912.05671>`_, ICML 2020;
  Entezari et al., `The Role of Permutation Invariance in Linear Mode Connectivity of
  Neural Networks <https://arxiv.org/abs/2110.06296>`_, ICLR 2022
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import pytrees as _pytree
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax._src.tree import compute_dtype
from fusionjax._src.tree import is_mergeable


def interpolate(a: Params, b: Params, t: ArrayLike) -> Params:
    r"""The point :math:`(1 - t)\,a + t\,b` on the segment between two models.

    Args:
      a: First model (returned at ``t = 0``).
      b: Second model with the same structure, shapes and dtypes (``t = 1``).
      t: Interpolation weight, a scalar (may be traced, so ``jax.vmap`` over ``t``
        works).

    Returns:
      A pytree like ``a``; floating-point leaves are interpolated (in at least
      float32), other leaves (integers such as step counters, an equinox module's
      functions) are taken from ``a``.

    Raises:
      ValueError: if the structures, shapes or dtypes differ (the message names the path).

    Examples:
      >>> import jax.numpy as jnp
      >>> interpolate({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, 0.25)
      {'w': Array([0.25, 0.25], dtype=float32)}
    """
    validation.check_same_structure(a, b, name="b", ref_name="a")

    def mix(x, y):
        if not is_mergeable(x):
            return x
        dt = compute_dtype(x.dtype)
        tt = jnp.asarray(t, dt)
        return ((1 - tt) * jnp.asarray(x, dt) + tt * jnp.asarray(y, dt)).astype(x.dtype)

    return jax.tree.map(mix, a, b)


class InterpolationCurve(NamedTuple):
    """Values of a metric along the segment between two models.

    Attributes:
      t: Interpolation weights ``[num]``, from 0 (``a``) to 1 (``b``).
      values: The metric at each weight, ``[num, ...]`` (a pytree if the metric
        returns one).
    """

    t: jax.Array
    values: Any


def interpolation_curve(
    metric_fn: Callable[[Params], Any], a: Params, b: Params, *, num: int = 11
) -> InterpolationCurve:
    r"""Evaluates ``metric_fn`` at ``num`` evenly spaced points from ``a`` to ``b``.

    The points are evaluated with one :func:`jax.vmap` over ``t`` inside one
    :func:`jax.jit`, so ``metric_fn`` must be traceable (a loss or an accuracy
    over a fixed batch). The compiled program is cached per ``metric_fn`` object (and
    shapes): pass the same function for every pair to compile once.

    Args:
      metric_fn: ``metric_fn(params) -> array or pytree of arrays``.
      a: Model at ``t = 0``: any pytree, equinox modules included (leaves that are not
        arrays are held static and given to ``metric_fn`` as they are in ``a``).
      b: Model at ``t = 1``.
      num: Number of points, at least 2 (both endpoints included).

    Returns:
      An :class:`InterpolationCurve`.

    Examples:
      >>> import jax.numpy as jnp
      >>> curve = interpolation_curve(lambda p: jnp.sum(p["w"] ** 2),
      ...                             {"w": jnp.array([1.0, 0.0])},
      ...                             {"w": jnp.array([-1.0, 0.0])}, num=3)
      >>> curve.values
      Array([1., 0., 1.], dtype=float32)
    """
    if not isinstance(num, int) or isinstance(num, bool) or num < 2:
        raise ValueError(f"num must be an int >= 2, got {num!r}")
    validation.check_same_structure(a, b, name="b", ref_name="a")
    # Jit over the array leaves; the rest (an equinox module's functions) stays static.
    (a, rest), (b, _) = _pytree.partition(a), _pytree.partition(b)
    rest_leaves, rest_def = jax.tree.flatten(rest)
    static = (metric_fn, num, rest_def, tuple(rest_leaves))
    try:
        hash(static)
        run = functools.partial(_curve_values_jit, *static)
    except TypeError:  # an unhashable metric or static leaf: compile for this call only
        run = jax.jit(functools.partial(_curve_values, *static))
    return InterpolationCurve(jnp.linspace(0.0, 1.0, num), run(a, b))


def _curve_values(metric_fn, num, rest_def, rest_leaves, a, b):
    rest = jax.tree.unflatten(rest_def, rest_leaves)
    ts = jnp.linspace(0.0, 1.0, num)
    return jax.vmap(lambda t: metric_fn(_pytree.combine(interpolate(a, b, t), rest)))(ts)


# Compiled once per (metric_fn, num, static leaves, shapes): a sweep over model pairs
# that passes the same metric_fn object compiles once.
_curve_values_jit = jax.jit(_curve_values, static_argnums=(0, 1, 2, 3))


def barrier(curve: InterpolationCurve, *, higher_is_better: bool = False) -> jax.Array:
    r"""The barrier of a curve: the largest gap to the line between its endpoints.

    For a loss (``higher_is_better=False``),
    :math:`\max_t L(t) - [(1 - t) L(0) + t L(1)]`; for an accuracy, the largest
    drop below the line, :math:`\max_t [(1 - t) A(0) + t A(1)] - A(t)`. It is 0 for
    a curve that never rises above (falls below) the line.

    Args:
      curve: An :class:`InterpolationCurve` whose ``values`` are ``[num]``.
      higher_is_better: Whether the metric is an accuracy rather than a loss.

    Returns:
      A scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> ts = jnp.linspace(0.0, 1.0, 3)
      >>> round(float(barrier(InterpolationCurve(ts, jnp.array([0.1, 0.9, 0.3])))), 4)
      0.7
    """
    values = jnp.asarray(curve.values)
    if values.ndim != 1 or values.shape[0] != np.shape(curve.t)[0]:
        raise ValueError(
            f"barrier needs one value per point, got values of shape {values.shape} "
            f"for {np.shape(curve.t)[0]} points"
        )
    t = jnp.asarray(curve.t, values.dtype)
    line = (1 - t) * values[0] + t * values[-1]
    gap = values - line if not higher_is_better else line - values
    return jnp.maximum(jnp.max(gap), 0.0)
