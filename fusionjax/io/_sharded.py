"""Sharded and multi-process merges: parameters stay on their mesh.

:func:`fusionjax.merge` takes leaves that are sharded :class:`jax.Array` s as
they are: each leaf's merge kernel runs under the leaf's own
:class:`~jax.sharding.NamedSharding` (model-wide statistics such as TIES's
whole-model threshold are reduced across the mesh by XLA collectives), and the
merged leaf comes back with the input's sharding. Nothing is gathered to one
device or to the host; only a few finite-check flags and statistic scalars are.
The same holds across processes (``jax.distributed.initialize``): every process
runs the same program on the global arrays, holding only its shards.

This module supplies the pieces around that: a sharding per leaf from a mesh
and path rules (:func:`shardings_for`), placing in-memory leaves on them
(:func:`shard_like`), restoring Orbax checkpoints straight onto a mesh —
each process reads only the slices its devices hold — (:func:`load_sharded`),
writing one checkpoint from every process (:func:`save_sharded`), and the
three together (:func:`merge_sharded`).

What costs time, and what is done about it:

* *Reads.* A sharded restore reads each shard from the checkpoint once, on the
  process that holds it; nothing is read on the host and then scattered.
* *Collectives.* Leafwise methods (task arithmetic, TIES with a per-leaf
  threshold, DARE) need no communication between shards beyond the finite
  check; model-wide statistics add one small reduction per leaf and pass.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from fusionjax._src import merge as merge_lib
from fusionjax._src import paths as paths_lib
from fusionjax._src import stream
from fusionjax._src import validation
from fusionjax.io import _orbax

keystr = jax.tree_util.keystr

Rules = Mapping[str, PartitionSpec] | Callable[[str, jax.ShapeDtypeStruct], PartitionSpec] | None


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def default_spec(shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Rows over the mesh's first axis and columns over its second, where they divide.

    Leaves of rank at least 2 split dimension ``d`` over mesh axis ``d`` (for
    ``d < `` the number of mesh axes) when the mesh axis size divides it; other
    dimensions, and every dimension of vectors and scalars, are replicated.

    Args:
      shape: The leaf's shape.
      mesh: The device mesh.

    Returns:
      A :class:`~jax.sharding.PartitionSpec` of length ``len(shape)``.

    Examples:
      >>> import jax
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> default_spec((8, 4), mesh), default_spec((4,), mesh)
      (P('x', None), P(None,))
    """
    if len(shape) < 2:
        return PartitionSpec(*([None] * len(shape)))
    axes = []
    for d, n in enumerate(shape):
        name = mesh.axis_names[d] if d < len(mesh.axis_names) else None
        axes.append(name if name is not None and n % mesh.shape[name] == 0 else None)
    return PartitionSpec(*axes)


def _check_spec(spec: PartitionSpec, shape: tuple, mesh: Mesh, where: str) -> None:
    if len(spec) > len(shape):
        raise ValueError(
            f"{where}: partition spec {spec} has {len(spec)} entries for a leaf of shape {shape}."
        )
    for d, entry in enumerate(spec):
        names = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        size = 1
        for name in names:
            if name not in mesh.shape:
                raise ValueError(
                    f"{where}: partition spec {spec} names mesh axis {name!r}, but the mesh "
                    f"has axes {tuple(mesh.axis_names)}."
                )
            size *= mesh.shape[name]
        if shape[d] % size:
            raise ValueError(
                f"{where}: dimension {d} of shape {shape} is not divisible by {size} devices "
                f"(partition spec {spec})."
            )


def shardings_for(target: Any, mesh: Mesh, *, rules: Rules = None) -> Any:
    """A :class:`~jax.sharding.NamedSharding` per array leaf of ``target``.

    Args:
      target: A pytree of arrays or :class:`jax.ShapeDtypeStruct` (only shapes
        are read), e.g. ``jax.eval_shape(init, ...)``.
      mesh: The device mesh (all processes' devices in a multi-process run).
      rules: How to split each leaf. ``None``: :func:`default_spec` (rows and
        columns over the first two mesh axes where they divide). A mapping
        ``{regex: PartitionSpec}``: the first pattern found (:func:`re.search`)
        in the leaf's path name (``dense/kernel``) gives the spec, other
        leaves get :func:`default_spec`. A callable ``(path name, spec) ->
        PartitionSpec`` decides for every leaf.

    Returns:
      A pytree like ``target`` with a ``NamedSharding`` in place of each array
      leaf (other leaves are kept).

    Raises:
      ValueError: if a spec has more entries than the leaf has dimensions,
        names an axis the mesh lacks, or splits a dimension its devices do not
        divide; the message names the leaf's path.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> s = shardings_for({"w": jnp.zeros((4, 2))}, mesh)
      >>> s["w"].spec
      P('x', None)
    """
    if isinstance(rules, Mapping):
        items = list(rules.items())
        for pattern, _ in items:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(
                    f"rules pattern {pattern!r} is not a regular expression: {e}"
                ) from None
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    out = []
    for path, x in flat:
        if not _is_array(x):
            out.append(x)
            continue
        shape = tuple(x.shape)
        name = paths_lib.path_name(path)
        spec = None
        if callable(rules):
            spec = rules(name, jax.ShapeDtypeStruct(shape, x.dtype))
        elif rules is not None:
            spec = next((s for p, s in items if re.search(p, name)), None)
        if spec is None:
            spec = default_spec(shape, mesh)
        if not isinstance(spec, PartitionSpec):
            raise TypeError(f"rules gave {spec!r} for {keystr(path)}; expected a PartitionSpec.")
        _check_spec(spec, shape, mesh, f"leaf {keystr(path)}")
        out.append(NamedSharding(mesh, spec))
    return treedef.unflatten(out)


def _sharding_leaves(tree: Any, shardings: Any) -> list:
    if isinstance(shardings, jax.sharding.Sharding):
        return [shardings] * jax.tree.structure(tree).num_leaves
    return paths_lib.broadcast_leaves(tree, shardings, "shardings")


def shard_like(tree: Any, shardings: Any) -> Any:
    """Places every array leaf of ``tree`` on its sharding, one shard per device.

    Host leaves (NumPy arrays, process-local :class:`jax.Array` s) are cut into
    the shards each of this process's devices holds and only those are copied,
    so in a multi-process run every process passes the same (e.g. memory-mapped)
    host value and gets its part of the global array
    (:func:`jax.make_array_from_callback`). Leaves that already span devices of
    other processes are resharded by :func:`jax.device_put`.

    Args:
      tree: A pytree of arrays (non-array leaves are passed through).
      shardings: A :class:`jax.sharding.Sharding` for every leaf, or a pytree of
        them with the structure of ``tree`` (or a prefix of it), e.g. from
        :func:`shardings_for`.

    Returns:
      ``tree`` with every array leaf a :class:`jax.Array` on its sharding.

    Raises:
      ValueError: if ``shardings`` does not fit the structure of ``tree``, or a
        leaf's shape does not fit its sharding (the message names the path).

    Examples:
      >>> import jax, numpy as np
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> tree = shard_like({"w": np.ones((2, 2), np.float32)}, shardings_for({"w": np.ones((2, 2))}, mesh))
      >>> tree["w"].sharding.spec
      P('x', None)
    """  # noqa: E501
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    per_leaf = _sharding_leaves(tree, shardings)
    out = []
    for (path, x), sharding in zip(flat, per_leaf, strict=True):
        if not isinstance(x, (jax.Array, np.ndarray)) or sharding is None:
            out.append(x)
            continue
        try:
            sharding.shard_shape(x.shape)
        except ValueError as e:
            raise ValueError(
                f"leaf {keystr(path)}: shape {x.shape} does not fit {sharding}: {e}"
            ) from None
        if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
            out.append(jax.device_put(x, sharding))
            continue
        value = np.asarray(x)
        out.append(jax.make_array_from_callback(value.shape, sharding, lambda i, v=value: v[i]))
    return treedef.unflatten(out)


# -- Orbax: restores through fusionjax.io.load_orbax; saves from every process --


def _abs(path: str | os.PathLike) -> str:
    return os.path.abspath(os.fspath(path))


def checkpoint_specs(path: str | os.PathLike) -> Any:
    """The abstract tree of an Orbax checkpoint, from its metadata (no tensor data is read).

    Args:
      path: An Orbax checkpoint directory (written by :func:`save_sharded`,
        ``orbax.checkpoint.StandardCheckpointer`` or
        :func:`fusionjax.io.save_orbax`).

    Returns:
      A pytree of :class:`jax.ShapeDtypeStruct` (no shardings).

    Raises:
      FileNotFoundError: if ``path`` is not an Orbax checkpoint.
    """
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)),
        _orbax.metadata_tree(path),
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
    )


def sharded_target(target: Any, mesh: Mesh, *, rules: Rules = None) -> Any:
    """``target`` as :class:`jax.ShapeDtypeStruct` s that carry their mesh sharding.

    Args:
      target: An Orbax checkpoint path (its metadata is read, no tensor data),
        or a pytree of arrays / abstract arrays.
      mesh: The device mesh.
      rules: How to split each leaf, as in :func:`shardings_for`.

    Returns:
      A pytree of ``ShapeDtypeStruct(shape, dtype, sharding=NamedSharding)``,
      the target of a sharded restore.

    Raises:
      FileNotFoundError: if ``target`` is a path that does not exist.
      ValueError: if a rule does not fit a leaf (see :func:`shardings_for`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> sharded_target({"w": jnp.zeros((4, 2))}, mesh)["w"].sharding.spec
      P('x', None)
    """
    if isinstance(target, (str, os.PathLike)):
        target = checkpoint_specs(target)
    shardings = shardings_for(target, mesh, rules=rules)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s) if _is_array(x) else x,
        target,
        shardings,
    )


def load_sharded(
    path: str | os.PathLike, mesh: Mesh | None = None, *, rules: Rules = None, target: Any = None
) -> Any:
    """Restores an Orbax checkpoint onto a mesh; each process reads only its shards.

    Every process of a multi-process run calls it with the same arguments.

    Args:
      path: The Orbax checkpoint directory.
      mesh: The device mesh; the shardings come from ``rules``. Not needed when
        ``target`` carries shardings.
      rules: How to split each leaf, as in :func:`shardings_for`.
      target: An abstract tree whose leaves carry shardings (e.g. from
        :func:`sharded_target`); by default built from the checkpoint's
        metadata, ``mesh`` and ``rules``.

    Returns:
      The restored pytree of sharded :class:`jax.Array` s.

    Raises:
      FileNotFoundError: if ``path`` is not an Orbax checkpoint.
      ValueError: if neither ``mesh`` nor ``target`` is given, or a rule does not
        fit a leaf.

    Examples:
      >>> import jax, jax.numpy as jnp, tempfile, os
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> d = os.path.join(tempfile.mkdtemp(), "ckpt")
      >>> save_sharded({"w": jnp.ones((4, 2))}, d)
      >>> load_sharded(d, mesh)["w"].sharding.spec
      P('x', None)
    """
    if target is None:
        if mesh is None:
            raise ValueError("load_sharded needs a mesh (or a target that carries shardings).")
        target = sharded_target(path, mesh, rules=rules)
    return _orbax.load_orbax(path, target)


def save_sharded(tree: Any, path: str | os.PathLike) -> None:
    """Writes a pytree of (possibly sharded, multi-process) arrays as one Orbax checkpoint.

    Every process of a multi-process run calls it: each writes the shards its
    devices hold (replicated shards once), and process 0 commits the checkpoint
    once all of them finished (through :func:`fusionjax.io.save_orbax`, which
    stages it next to ``path`` and renames it into place between barriers).
    Returns when the checkpoint is complete.

    Args:
      tree: The pytree to save.
      path: The checkpoint directory; it must not exist (missing parent
        directories are created).

    Raises:
      FileExistsError: if ``path`` exists (checked before anything is written).
    """
    path = _abs(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; not overwriting it.")
    os.makedirs(os.path.dirname(path), exist_ok=True)  # as Orbax does
    _orbax.save_orbax(tree, path, overwrite=False)


def merge_sharded(
    base: Any,
    finetuned: Sequence[Any],
    merger: Any,
    out: str | os.PathLike | None = None,
    *,
    mesh: Mesh,
    rules: Rules = None,
    key: jax.Array | None = None,
    **merge_kwargs: Any,
) -> Any:
    """Merges models sharded over a mesh, restoring checkpoints straight onto it.

    Checkpoint paths are restored with :func:`load_sharded` (in-memory pytrees
    are placed with :func:`shard_like`), every model with the same shardings;
    structures, shapes and dtypes are checked from metadata first, then
    :func:`fusionjax.merge` merges leaf by leaf on the mesh and the result
    keeps those shardings. With ``out``, it is saved with :func:`save_sharded`.
    In a multi-process run every process calls it with the same arguments.

    Args:
      base: The base model: an Orbax checkpoint path or a pytree.
      finetuned: The fine-tuned models, each a path or a pytree.
      merger: A :class:`fusionjax.Step` that reduces, e.g.
        ``fusionjax.merging.ties()``.
      out: Where to save the merged model as an Orbax checkpoint (must not
        exist), or ``None`` to only return it.
      mesh: The device mesh.
      rules: How to split each leaf, as in :func:`shardings_for`.
      key: PRNG key for random mergers.
      **merge_kwargs: Passed to :func:`fusionjax.merge` (``running_stats``,
        per-parameter extras such as ``fishers=``).

    Returns:
      The merged pytree of sharded :class:`jax.Array` s.

    Raises:
      FileNotFoundError: if a checkpoint path does not exist.
      FileExistsError: if ``out`` exists.
      ValueError: if the models differ in structure, shape or dtype (the
        message names the model and path), or a rule does not fit a leaf; all
        raised before any tensor is read.

    Examples:
      >>> import jax, jax.numpy as jnp, fusionjax as fj
      >>> mesh = jax.make_mesh((1,), ("x",))
      >>> base = {"w": jnp.zeros((2, 2))}
      >>> fts = [{"w": jnp.ones((2, 2))}, {"w": 3 * jnp.ones((2, 2))}]
      >>> out = merge_sharded(base, fts, fj.merging.task_arithmetic(scaling=0.5), mesh=mesh)
      >>> out["w"].sharding.spec, float(out["w"][0, 0])
      (P('x', None), 2.0)
    """
    if out is not None and os.path.exists(_abs(out)):
        raise FileExistsError(f"{_abs(out)} exists; not overwriting it.")
    validation.check_nonempty(finetuned)
    models = [base, *finetuned]
    specs = [
        checkpoint_specs(m) if isinstance(m, (str, os.PathLike)) else jax.tree.map(
            stream.spec_of, m
        )
        for m in models
    ]
    validation.check_sources(stream.as_source(specs[0]), [stream.as_source(s) for s in specs[1:]])
    target = sharded_target(specs[0], mesh, rules=rules)
    placed = [
        load_sharded(m, target=target)
        if isinstance(m, (str, os.PathLike))
        else shard_like(m, jax.tree.map(lambda t: getattr(t, "sharding", None), target))
        for m in models
    ]
    merged = merge_lib.merge(placed[0], placed[1:], merger, key=key, **merge_kwargs)
    if out is not None:
        save_sharded(merged, out)
    return merged
