r"""Merging coefficients as an ordinary pytree of parameters, and the merge they define.

A *coefficient merge* is :math:`\theta = \theta_0 + \sum_t \lambda_t \odot \tau_t`, where
the coefficients :math:`\lambda` are trained (AdaMerging, aTLAS) and the task vectors
:math:`\tau_t` stay fixed. The coefficients come at one of three granularities:

* **task-wise**: one scalar per task, an array ``[T]``;
* **layer-wise**: one scalar per task per parameter tensor, a pytree with the structure
  of the parameters whose leaves are ``[T]`` (``None`` on leaves that are not merged,
  such as integer counters), as in the AdaMerging code;
* **block-wise**: one scalar per task per *block* of a tensor, leaves ``[T, B]``, with a
  *partition* pytree of integer block ids in ``[0, B)`` (one per entry, or any shape that
  broadcasts to the leaf). :func:`random_blocks` draws the aTLAS-style random partition.

The coefficients are the only differentiated input: :func:`combine` reads the task
vectors as constants, so ``jax.grad`` with respect to the coefficients never builds
gradients for (or copies) the task vectors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import tree as tree_lib
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax._src.base import PRNGKey
from fusionjax._src.base import Stacked

keystr = jax.tree_util.keystr
Granularity = Literal["task", "layer", "block"]
Coefficients = Any
"""An array ``[T]`` (task-wise) or a pytree of ``[T]`` / ``[T, B]`` leaves."""
Clamp = tuple[float, float] | None


def _is_none(x) -> bool:
    return x is None


def stacked_task_vectors(
    base: Params, finetuned: Sequence[Params], task_vector_fn: Any = None, *, key=None
) -> Stacked:
    r"""Task vectors :math:`\tau_t = \theta_t - \theta_0`, stacked ``[T, ...]``.

    Args:
      base: Base parameters :math:`\theta_0`.
      finetuned: Fine-tuned models with the structure of ``base``.
      task_vector_fn: Optional task-vector :class:`fusionjax.Step` applied to the stack
        (``[T, ...] -> [T, ...]``), e.g. ``fj.chain(fj.merging.trim(density=0.2),
        fj.merging.elect_sign())`` for AdaMerging++.
      key: PRNG key, for a random ``task_vector_fn``.

    Returns:
      The stacked task vectors: ``[T, *shape]`` on floating-point leaves, ``None`` on
      every other leaf.
    """
    validation.check_nonempty(finetuned)
    validation.check_models(base, finetuned)
    tvs = tree_lib.stack(tree_lib.task_vectors(base, finetuned))
    if task_vector_fn is not None:
        if getattr(task_vector_fn, "reduces", True):
            raise TypeError(
                "task_vector_fn must map [T, ...] -> [T, ...] (e.g. trim, elect_sign), "
                f"got the merger {getattr(task_vector_fn, 'name', task_vector_fn)!r}."
            )
        # Compiled: a task-vector step run op by op (e.g. TIES' radix-select trim) is slow.
        tvs = jax.jit(lambda x, k: task_vector_fn(x, key=k))(tvs, key)
    return tvs


def num_tasks(task_vectors: Stacked) -> int:
    """The number of stacked task vectors ``T``; checks that every leaf agrees."""
    leaves = jax.tree_util.tree_flatten_with_path(task_vectors)[0]
    if not leaves:
        raise ValueError("task_vectors has no floating-point leaves to merge.")
    first, x0 = leaves[0]
    t = np.shape(x0)[0] if np.ndim(x0) else None
    for path, x in leaves:
        if not np.ndim(x) or np.shape(x)[0] != t:
            raise ValueError(
                f"task_vectors must be stacked [T, ...] with one T for every leaf, but the "
                f"leaf at {keystr(path)} has shape {np.shape(x)} and the leaf at "
                f"{keystr(first)} has shape {np.shape(x0)}."
            )
    return t


def init_coefficients(
    task_vectors: Stacked,
    *,
    granularity: Granularity = "layer",
    init: ArrayLike = 0.3,
    partition: Params | None = None,
) -> Coefficients:
    r"""Initial merging coefficients at a given granularity.

    Args:
      task_vectors: Stacked task vectors ``[T, ...]`` (see :func:`stacked_task_vectors`).
      granularity: ``"task"`` (an array ``[T]``), ``"layer"`` (a pytree of ``[T]``, one per
        parameter tensor) or ``"block"`` (a pytree of ``[T, B]``; needs ``partition``).
      init: Initial value of every coefficient (0.3 in AdaMerging), or an array ``[T]``
        of per-task initial values.
      partition: For ``"block"``: a pytree like the parameters with integer block ids
        (see :func:`random_blocks`); leaf ``i`` gets ``B_i = max(id) + 1`` blocks.

    Returns:
      Coefficients, a pytree of float32 arrays to optimise with optax.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> tvs = {"w": jnp.ones((3, 4)), "b": jnp.ones((3,))}  # T = 3
      >>> fj.learned.init_coefficients(tvs, granularity="task")
      Array([0.3, 0.3, 0.3], dtype=float32)
      >>> fj.learned.init_coefficients(tvs)["w"].shape
      (3,)
    """
    t = num_tasks(task_vectors)
    start = jnp.asarray(init, jnp.float32)
    if start.ndim not in (0, 1) or (start.ndim == 1 and start.shape[0] != t):
        raise ValueError(f"init must be a scalar or have shape ({t},), got shape {start.shape}.")
    start = jnp.broadcast_to(start, (t,))
    if granularity == "task":
        return start
    if granularity == "layer":
        return jax.tree.map(lambda x: None if x is None else start, task_vectors, is_leaf=_is_none)
    if granularity == "block":
        if partition is None:
            raise ValueError(
                'granularity="block" needs a partition, e.g. fj.learned.random_blocks.'
            )
        leaves, treedef = jax.tree.flatten(task_vectors, is_leaf=_is_none)
        ids = tree_lib.broadcast_leaves(
            treedef.unflatten([0] * len(leaves)), partition, "partition"
        )
        out = []
        for x, p in zip(leaves, ids, strict=False):
            if x is None:
                out.append(None)
                continue
            b = int(np.max(np.asarray(p))) + 1 if p is not None else 1
            out.append(jnp.broadcast_to(start[:, None], (t, b)))
        return treedef.unflatten(out)
    raise ValueError(f"granularity must be 'task', 'layer' or 'block', got {granularity!r}.")


def random_blocks(params: Params, num_blocks: int, key: PRNGKey) -> Params:
    r"""An aTLAS-style random partition of every tensor into ``num_blocks`` blocks.

    Each entry of each floating-point leaf gets a block id drawn uniformly from
    ``[0, num_blocks)`` (leaves with fewer entries than ``num_blocks`` get ids
    ``0..size-1``). With ``granularity="block"`` every block of every tensor then
    has its own coefficient per task, ``num_blocks`` times as many as layer-wise.

    Args:
      params: Parameters (or task vectors without the leading axis) whose leaves
        to partition.
      num_blocks: Blocks per tensor, :math:`\ge 1`.
      key: PRNG key; the ids of a leaf depend on ``key`` and the leaf's path.

    Returns:
      A pytree like ``params`` of ``int32`` id arrays (``None`` on leaves not merged).

    References:
      Zhang et al, `Knowledge Composition using Task Vectors with Learned Anisotropic
      Scaling <https://arxiv.org/abs/2407.02880>`_, NeurIPS 2024
    """
    validation.check_hparam("num_blocks", num_blocks, lower=1)

    def ids(path, x):
        if not tree_lib.is_mergeable(x):
            return None
        k = tree_lib.leaf_key(key, path)
        b = min(int(num_blocks), max(int(np.size(x)), 1))
        return jax.random.randint(k, np.shape(x), 0, b, jnp.int32)

    return jax.tree_util.tree_map_with_path(ids, params)


def _leaf_coefficients(coefficients: Coefficients, base: Params) -> list:
    """One coefficient array (``[T]`` or ``[T, B]``, or ``None``) per leaf of ``base``."""
    if isinstance(coefficients, (jax.Array, np.ndarray)) or np.isscalar(coefficients):
        return [coefficients] * jax.tree.structure(base).num_leaves
    return tree_lib.broadcast_leaves(base, coefficients, "coefficients")


def _check_leaf(path, lam, x, block_ids) -> None:
    t = x.shape[0]
    if lam is None:
        raise ValueError(f"coefficients have no value for the merged leaf at {keystr(path)}.")
    if lam.ndim == 0 or lam.shape[0] != t or lam.ndim > 2:
        raise ValueError(
            f"coefficients at {keystr(path)} must have shape ({t},) or ({t}, B), got {lam.shape}."
        )
    if lam.ndim == 2 and block_ids is None:
        raise ValueError(
            f"coefficients at {keystr(path)} are block-wise {lam.shape} but no partition was given."
        )


def combine(
    base: Params,
    task_vectors: Stacked,
    coefficients: Coefficients,
    *,
    partition: Params | None = None,
    clamp: Clamp = None,
) -> Params:
    r"""The merged model :math:`\theta_0 + \sum_t \lambda_t \odot \tau_t`, differentiable in λ.

    Args:
      base: Base parameters :math:`\theta_0`.
      task_vectors: Stacked task vectors ``[T, ...]`` (``None`` on leaves not merged).
      coefficients: From :func:`init_coefficients`: ``[T]``, or a pytree with ``[T]``
        (layer-wise) or ``[T, B]`` (block-wise) leaves; a prefix of the parameter tree
        applies one coefficient vector to a whole subtree.
      partition: Block ids for block-wise coefficients (see :func:`random_blocks`).
      clamp: ``(low, high)`` to clip the coefficients to in the forward pass (AdaMerging
        clips to ``(0, 1)``; the gradient is zero outside), or ``None``.

    Returns:
      Parameters with the structure and dtypes of ``base``; leaves that are not merged
      are ``base``'s own.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(2)}
      >>> tvs = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> fj.learned.combine(base, tvs, jnp.array([0.5, 2.0]))
      {'w': Array([0.5, 2. ], dtype=float32)}
    """
    num_tasks(task_vectors)
    base_paths, treedef = jax.tree_util.tree_flatten_with_path(base)
    tv_leaves = tree_lib.broadcast_leaves(base, task_vectors, "task_vectors")
    lams = _leaf_coefficients(coefficients, base)
    ids = tree_lib.broadcast_leaves(base, partition, "partition")
    out = []
    for (path, b), x, lam, block_ids in zip(base_paths, tv_leaves, lams, ids, strict=False):
        if x is None:
            out.append(b)
            continue
        lam = jnp.asarray(lam)
        _check_leaf(path, lam, x, block_ids)
        if x.shape[1:] != np.shape(b):
            raise ValueError(
                f"task_vectors at {keystr(path)} have shape {x.shape}, expected "
                f"(T,) + {np.shape(b)}."
            )
        dt = tree_lib.compute_dtype(b.dtype)
        lam = lam.astype(dt)
        if clamp is not None:
            lam = jnp.clip(lam, clamp[0], clamp[1])
        xs = x.astype(dt)
        if lam.ndim == 1:
            # A [T] x [T, N] product: one GEMV (and its transpose in the gradient), never
            # a reduction over the stacking axis (slow on XLA:CPU).
            delta = jnp.tensordot(lam, xs, axes=1, precision=jax.lax.Precision.HIGHEST)
        else:
            per_entry = jnp.take(lam, jnp.broadcast_to(block_ids, np.shape(b)), axis=1)
            delta = jnp.einsum("t...,t...->...", per_entry, xs)
        out.append((jnp.asarray(b, dt) + delta).astype(b.dtype))
    return treedef.unflatten(out)


def effective(coefficients: Coefficients, clamp: Clamp = None) -> Coefficients:
    r"""The coefficients :func:`combine` uses: clipped to ``clamp`` if given.

    With ``clamp = (a, b)`` every entry becomes :math:`\min(\max(\lambda, a), b)`, the
    values that enter :math:`\theta_0 + \sum_t \lambda_t \odot \tau_t` in the forward
    pass; a learned merge trains (and returns, in
    :attr:`~fusionjax.learned.LearnedMergeOutput.coefficients`) the unclipped ones.

    Args:
      coefficients: Task-wise ``[T]``, or a pytree of layer-wise ``[T]`` / block-wise
        ``[T, B]`` leaves (``None`` leaves stay ``None``).
      clamp: ``(low, high)``, or ``None`` to return ``coefficients`` unchanged.

    Returns:
      Coefficients with the structure, shapes and dtypes of ``coefficients``.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> fj.learned.effective(jnp.array([-0.5, 0.3, 1.5]), clamp=(0.0, 1.0))
      Array([0. , 0.3, 1. ], dtype=float32)
    """
    if clamp is None:
        return coefficients
    return jax.tree.map(lambda c: jnp.clip(c, clamp[0], clamp[1]), coefficients)


def coefficient_table(coefficients: Coefficients) -> tuple[list[str], np.ndarray]:
    """Layer names and a ``[L, T]`` (or ``[L, T, B]`` averaged to ``[L, T]``) table of values.

    Args:
      coefficients: Task-wise (one row, named ``"*"``) or layer-/block-wise coefficients.

    Returns:
      ``(names, table)``: the leaf paths and their coefficients per task.
    """
    if isinstance(coefficients, (jax.Array, np.ndarray)):
        return ["*"], np.asarray(coefficients, np.float64)[None]
    leaves = jax.tree_util.tree_flatten_with_path(coefficients)[0]
    names = [keystr(p) for p, _ in leaves]
    rows = [np.asarray(c, np.float64).reshape(np.shape(c)[0], -1).mean(axis=1) for _, c in leaves]
    return names, np.stack(rows)
