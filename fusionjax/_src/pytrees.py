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
