"""Pytree utilities: task vectors, stacking, leafwise mapping."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax._src.base import Stacked
from fusionjax._src.keys import leaf_key  # noqa: F401  (re-exported for subpackages)
from fusionjax._src.paths import broadcast_leaves  # noqa: F401  (re-exported)
from fusionjax._src.validation import compute_dtype

keystr = jax.tree_util.keystr


def _is_none(x) -> bool:
    return x is None


def is_mergeable(x: Any) -> bool:
    """Whether a leaf takes part in merging: a real floating-point array."""
    return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating)


def task_vector(base: Params, finetuned: Params) -> Params:
    r"""Task vector :math:`\tau = \theta_{ft} - \theta_0` of one fine-tuned model.

    Args:
      base: Base (pretrained) parameters :math:`\theta_0`.
      finetuned: Fine-tuned parameters :math:`\theta_{ft}` with the same structure.

    Returns:
      A pytree like ``base``: the difference on floating-point leaves (computed in
      at least float32 and cast back), ``None`` on every other leaf.

    Raises:
      ValueError: if the structures, shapes or dtypes differ (the message names
        the path).

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> fj.task_vector({"w": jnp.zeros(2)}, {"w": jnp.ones(2)})
      {'w': Array([1., 1.], dtype=float32)}

    References:
      Ilharco et al, `Editing Models with Task Arithmetic
      <https://arxiv.org/abs/2212.04089>`_, ICLR 2023
    """
    validation.check_models(base, [finetuned], check_values=False)
    return _task_vector(base, finetuned)


def _task_vector(base: Params, finetuned: Params) -> Params:
    """:func:`task_vector` without the checks (the caller has validated)."""

    def sub(b, f):
        if not is_mergeable(b):
            return None
        dt = compute_dtype(b.dtype)
        return (jnp.asarray(f, dt) - jnp.asarray(b, dt)).astype(b.dtype)

    return jax.tree.map(sub, base, finetuned)


def task_vectors(base: Params, finetuned: Sequence[Params]) -> list[Params]:
    """Task vectors of several fine-tuned models; see :func:`task_vector`.

    Args:
      base: Base parameters.
      finetuned: Fine-tuned models with the structure of ``base``.

    Returns:
      A list with one task-vector pytree per fine-tuned model.
    """
    validation.check_models(base, finetuned, check_values=False)
    return [_task_vector(base, ft) for ft in finetuned]


def apply_task_vector(base: Params, tv: Params, scaling: ArrayLike = 1.0) -> Params:
    r"""Adds a (scaled) task vector to a model: :math:`\theta_0 + \lambda\tau`.

    Args:
      base: Base parameters :math:`\theta_0`.
      tv: Task vector, ``None`` on leaves that are not merged.
      scaling: Multiplier :math:`\lambda`.

    Returns:
      Parameters with the structure and dtypes of ``base``; leaves where ``tv`` is
      ``None`` are taken from ``base`` unchanged.
    """

    def add(b, t):
        if t is None:
            return b
        if np.shape(t) != np.shape(b):
            raise ValueError(f"task vector shape {np.shape(t)} != parameter shape {np.shape(b)}")
        dt = compute_dtype(b.dtype)
        out = jnp.asarray(b, dt) + jnp.asarray(scaling, dt) * jnp.asarray(t, dt)
        return out.astype(b.dtype)

    return jax.tree.map(add, base, tv, is_leaf=_is_none)


def stack(trees: Sequence[Params]) -> Stacked:
    """Stacks pytrees of equal structure along a new leading axis ``T``.

    ``None`` leaves stay ``None``. Note that stacking ``T`` models costs ``T``
    times their memory; :func:`fusionjax.merge` streams leaf by leaf instead.

    Args:
      trees: A non-empty sequence of pytrees with the same structure.

    Returns:
      One pytree whose leaves have a leading axis of size ``len(trees)``.
    """
    if not trees:
        raise ValueError("stack needs at least one tree, got an empty sequence.")
    return _stack(list(trees))


@jax.jit
def _stack(trees):
    # One compiled program per structure (eager jnp.stack compiled one per leaf shape).
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Stacked) -> list[Params]:
    """Inverse of :func:`stack`: splits the leading axis into a list of pytrees.

    Args:
      tree: A pytree whose leaves share a leading axis ``T``.

    Returns:
      A list of ``T`` pytrees (empty if ``tree`` has no leaves).
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return []
    return _unstack(tree, int(np.shape(leaves[0])[0]))


@functools.partial(jax.jit, static_argnums=1)
def _unstack(tree, n):
    # One compiled program per structure (eager indexing compiled one per leaf shape).
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]
