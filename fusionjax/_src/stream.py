"""Leaf streams: where :func:`fusionjax.merge` reads leaves from and writes them to.

A *source* describes a model by metadata alone — its tree structure, every
leaf's path, and a spec per leaf (:class:`jax.ShapeDtypeStruct` for an array,
the value itself for a non-array leaf such as a Python float) — and reads one
leaf's value when asked. A *sink* takes merged leaves one at a time and
returns the result at the end. :func:`fusionjax.merge` validates everything it
can from the sources' metadata before it reads a value, then streams: each leaf
is read from every source, merged, written to the sink and dropped, so peak
memory is the sink's output plus a few leaves (an in-memory sink holds the
merged model; a checkpoint writer holds nothing).

In-memory pytrees are the default (:class:`TreeSource`, :class:`TreeSink`);
checkpoint readers and writers implement the same two small protocols. A
source's leaf may be a sharded :class:`jax.Array`: it is handed to the merge
as it is (never copied to the host), and so is the merged leaf to the sink.
"""

from __future__ import annotations

import functools
from typing import Any
from typing import Protocol
from typing import runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import paths as paths_lib

# What a leaf is, for merging (see :func:`fusionjax.merge`).
PARAM = "param"
"""A floating-point parameter: merged by the merger."""
RUNNING_STAT = "running_stat"
"""A running statistic (linen ``batch_stats``, nnx ``BatchStat``): never extrapolated."""
OTHER = "other"
"""Anything else (integers, bools, PRNG keys, Python scalars): must be equal, passed through."""


@runtime_checkable
class LeafSource(Protocol):
    """A model read leaf by leaf.

    Attributes:
      treedef: The model's tree structure.
      paths: Every leaf's key path, in ``treedef`` order.
      specs: Per leaf, a :class:`jax.ShapeDtypeStruct` (arrays) or the value
        itself (non-array leaves).
      kinds: Per leaf, :data:`PARAM`, :data:`RUNNING_STAT` or :data:`OTHER`.
    """

    treedef: Any
    paths: list
    specs: list
    kinds: list

    def read(self, index: int) -> Any:
        """The value of leaf ``index`` (an array, or the non-array leaf)."""
        ...


@runtime_checkable
class LeafSink(Protocol):
    """Takes merged leaves one at a time; :meth:`finish` returns the result."""

    def write(self, index: int, value: Any) -> None:
        """Stores leaf ``index``."""
        ...

    def finish(self) -> Any:
        """Completes the output and returns it (e.g. the merged pytree)."""
        ...


def is_array_like(x: Any) -> bool:
    """Whether ``x`` is an array or an abstract array (:class:`jax.ShapeDtypeStruct`)."""
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or _is_numpy_scalar(x)


def _is_numpy_scalar(x: Any) -> bool:
    return isinstance(x, np.generic) and x.dtype.kind in "biufc"


def spec_of(x: Any) -> Any:
    """The metadata of a leaf: a :class:`jax.ShapeDtypeStruct` for arrays, else the leaf."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if _is_numpy_scalar(x):
        return jax.ShapeDtypeStruct((), x.dtype)
    # An array is its own metadata: only .shape, .dtype (and .sharding) are read.
    return x


@functools.cache
def _is_float(dtype) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _is_batch_stat_variable(x: Any) -> bool:
    # flax.nnx.BatchStat, recognised without importing flax.
    return any(
        c.__name__ == "BatchStat" and c.__module__.startswith("flax") for c in type(x).__mro__
    )


def leaf_kinds(tree: Any, leaf_paths: list, specs: list) -> list[str]:
    """:data:`PARAM`, :data:`RUNNING_STAT` or :data:`OTHER` for every leaf of ``tree``.

    Running statistics are the leaves under a linen ``batch_stats`` collection
    and the values of nnx ``BatchStat`` variables; they are floating point but
    not trained by gradient, so they are never extrapolated.
    """
    stat = [
        any(isinstance(k, jax.tree_util.DictKey) and k.key == "batch_stats" for k in p)
        for p in leaf_paths
    ]
    nodes = jax.tree.leaves(tree, is_leaf=_is_batch_stat_variable)
    if any(_is_batch_stat_variable(x) for x in nodes):
        marks = jax.tree.map(_is_batch_stat_variable, tree, is_leaf=_is_batch_stat_variable)
        per_leaf = paths_lib.broadcast_leaves(tree, marks, "batch stats")
        stat = [a or bool(b) for a, b in zip(stat, per_leaf, strict=True)]
    out = []
    for s, spec in zip(stat, specs, strict=True):
        if is_array_like(spec) and _is_float(spec.dtype):
            out.append(RUNNING_STAT if s else PARAM)
        else:
            out.append(OTHER)
    return out


class TreeSource:
    """A :class:`LeafSource` over an in-memory pytree (arrays or abstract arrays)."""

    def __init__(self, tree: Any):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        self.paths = [p for p, _ in flat]
        self._leaves = [x for _, x in flat]
        self.specs = [spec_of(x) for x in self._leaves]
        self.kinds = leaf_kinds(tree, self.paths, self.specs)

    def read(self, index: int) -> Any:
        x = self._leaves[index]
        if isinstance(x, jax.ShapeDtypeStruct):
            raise ValueError(
                f"the leaf at {paths_lib.keystr(self.paths[index])} is abstract "
                "(a ShapeDtypeStruct): it has metadata but no value to merge."
            )
        return x


class TreeSink:
    """A :class:`LeafSink` that assembles the merged pytree in memory."""

    def __init__(self, treedef: Any):
        self.treedef = treedef
        self._out: list = [None] * treedef.num_leaves

    def write(self, index: int, value: Any) -> None:
        self._out[index] = value

    def finish(self) -> Any:
        return self.treedef.unflatten(self._out)


def as_source(x: Any) -> LeafSource:
    """``x`` if it is a :class:`LeafSource`, else a :class:`TreeSource` over it."""
    return x if isinstance(x, LeafSource) and not isinstance(x, dict) else TreeSource(x)
