"""Arrays versus the rest: how an entry point accepts any pytree (equinox modules included).

An equinox module is a pytree whose leaves are its arrays *and* its other fields (the
activation function of an ``eqx.nn.MLP``, ``None`` biases, Python numbers). Such leaves
cannot be :func:`jax.jit` arguments (``jax.nn.relu`` is a ``custom_jvp`` object), so
every alignment entry point splits a model into its array leaves, which it computes
on, and the rest, which it holds static and puts back in the result: the
``eqx.partition(model, eqx.is_array)`` / ``eqx.combine`` pattern, written here without
importing equinox (a test dependency only) and valid for any pytree.

Paths are unchanged by the split (``None`` takes a removed leaf's place, and ``None``
is an empty subtree), so a spec written for the model names the same leaves in its
array part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def is_array(x: Any) -> bool:
    """Whether ``x`` is an array leaf (a JAX array or tracer, or a NumPy array/scalar)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def partition(tree: Any) -> tuple[Any, Any]:
    """``(arrays, rest)``: two trees like ``tree``, with ``None`` in the other's places."""
    arrays = jax.tree.map(lambda x: x if is_array(x) else None, tree)
    rest = jax.tree.map(lambda x: None if is_array(x) else x, tree)
    return arrays, rest


def combine(arrays: Any, rest: Any) -> Any:
    """The inverse of :func:`partition`: ``rest``'s leaves where ``arrays`` has ``None``."""
    return jax.tree.map(
        lambda a, r: r if a is None else a, arrays, rest, is_leaf=lambda x: x is None
    )


def has_static(tree: Any) -> bool:
    """Whether ``tree`` has a leaf that is not an array."""
    return not all(is_array(x) for x in jax.tree.leaves(tree))


class StaticDict(dict):
    """An immutable, hashable dict that JAX treats as static (a pytree with no leaves).

    For metadata held by an output pytree (OT fusion's read/write roles), so the output
    can be returned from :func:`jax.jit` whole.
    """

    def __hash__(self):
        return hash(tuple(sorted(self.items(), key=repr)))

    def _immutable(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is immutable")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = _immutable


jax.tree_util.register_static(StaticDict)


# -- For jit: the arrays as arguments, the rest as one hashable static argument --


def _jit_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def jit_partition(
    tree: Any, is_array: Callable[[Any], bool] | None = None
) -> tuple[list, tuple]:
    """Splits a pytree into its array leaves and a hashable rest (structure, other leaves).

    ``jit_combine(*jit_partition(tree))`` rebuilds ``tree``. As ``equinox.partition`` with
    ``is_array``, but the rest is one hashable tuple, ready to be a static argument (it
    is hashable when the other leaves are).

    Args:
      tree: Any pytree (a ``Partial``, a function, a dict of arrays and numbers).
      is_array: Which leaves go into ``arrays`` (the jit arguments); by default
        ``jax.Array`` and ``np.ndarray`` leaves. E.g. also ``jax.ShapeDtypeStruct``
        for a function traced with :func:`jax.make_jaxpr`.

    Returns:
      ``(arrays, static)``: the leaves ``is_array`` selects, in order, and
      ``(treedef, ((index, leaf), ...))`` for the other leaves.

    Examples:
      >>> import jax.numpy as jnp
      >>> arrays, static = jit_partition({"a": jnp.ones(2), "b": 3})
      >>> len(arrays), static[1]
      (1, ((1, 3),))
      >>> jit_combine(arrays, static)["b"]
      3
    """
    is_array = _jit_array if is_array is None else is_array
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [x for x in leaves if is_array(x)]
    rest = tuple((i, x) for i, x in enumerate(leaves) if not is_array(x))
    return arrays, (treedef, rest)


def jit_combine(arrays: list, static: tuple) -> Any:
    """Inverse of :func:`jit_partition`.

    Args:
      arrays: The array leaves (or tracers standing for them), in order.
      static: The second output of :func:`jit_partition`.

    Returns:
      The pytree.
    """
    treedef, rest = static
    fixed = dict(rest)
    it = iter(arrays)
    leaves = [fixed[i] if i in fixed else next(it) for i in range(treedef.num_leaves)]
    return jax.tree.unflatten(treedef, leaves)
