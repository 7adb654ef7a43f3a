"""Core types: parameter pytrees, merging steps and their composition.

A *task vector* is the difference between a fine-tuned model and its base,
:math:`\\tau_t = \\theta_t - \\theta_0` (Ilharco et al., 2023). Merging methods in
fusionjax are written as short chains of *steps* over stacked task vectors:

* a :class:`TaskVectorFn` maps stacked task vectors ``[T, ...]`` to stacked task
  vectors ``[T, ...]`` (trim, drop-and-rescale, sign election, ...);
* a :class:`Merger` maps stacked task vectors ``[T, ...]`` to one merged task
  vector ``[...]`` (sum, mean, disjoint mean, ...).

Both are :class:`Step` objects. A step is *leafwise* when it treats every leaf of
the pytree on its own; :func:`fusionjax.merge` then streams a model leaf by leaf
and never materialises the stacked ``[T, *params]`` tree. A *global* step (for
example whole-model magnitude trimming) sees the whole stacked tree at once and
says so in its docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Optional

import jax

Params = Any
"""Any pytree of arrays: a nested dict, flax ``nnx.State``, an equinox module."""

Stacked = Any
"""The same pytree with a leading model axis ``T`` on every (inexact) leaf."""

PRNGKey = jax.Array
ArrayLike = jax.typing.ArrayLike

LeafFn = Callable[..., jax.Array]
TreeFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Step:
    """A merging step over stacked task vectors.

    Attributes:
      name: Short name used in error messages, e.g. ``"trim"``.
      reduces: ``True`` for a :class:`Merger` (``[T, ...] -> [...]``), ``False``
        for a :class:`TaskVectorFn` (``[T, ...] -> [T, ...]``).
      leaf_fn: For leafwise steps, ``leaf_fn(x, *, key, **extra) -> array`` where
        ``x`` is one stacked leaf ``[T, ...]`` in the compute dtype, ``key`` is a
        PRNG key for that leaf (or ``None``) and ``extra`` holds this leaf's slice
        of every extra argument (``None`` where a tree has no value).
      tree_fn: For global steps, ``tree_fn(tvs, *, key, **extra)`` over the whole
        stacked tree.
      needs_key: Whether the step is random and requires a PRNG key.
      elementwise: Whether the step works on arrays of any shape (e.g.
        :func:`fusionjax.merging.scale`), so it may also follow a merger.
      parts: For a :func:`fusionjax.chain`, the steps it chains.
    """

    name: str
    reduces: bool
    leaf_fn: Optional[LeafFn] = None
    tree_fn: Optional[TreeFn] = None
    needs_key: bool = False
    elementwise: bool = False
    parts: tuple = ()

    def __post_init__(self):
        if (self.leaf_fn is None) == (self.tree_fn is None):
            raise TypeError(f"Step {self.name!r} needs exactly one of leaf_fn and tree_fn.")

    @property
    def leafwise(self) -> bool:
        """Whether the step treats every leaf independently."""
        return self.leaf_fn is not None

    def __call__(self, tvs: Stacked, *, key: Optional[PRNGKey] = None, **extra_args) -> Any:
        """Applies the step to a stacked pytree of task vectors ``[T, ...]``."""
        from fusionjax._src import tree as tree_lib  # pylint: disable=g-import-not-at-top

        if self.needs_key and key is None:
            raise ValueError(
                f"{self.name} is random and needs a PRNG key, e.g. key=jax.random.key(0)."
            )
        if self.tree_fn is not None:
            return self.tree_fn(tvs, key=key, **extra_args)
        return tree_lib.map_leafwise(self.leaf_fn, tvs, key=key, **extra_args)

    def __repr__(self) -> str:
        return f"<fusionjax step {self.name}>"


TaskVectorFn = Step
"""A :class:`Step` with ``reduces=False``: ``[T, ...] -> [T, ...]``."""

Merger = Step
"""A :class:`Step` with ``reduces=True``: ``[T, ...] -> [...]``."""
