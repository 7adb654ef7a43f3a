"""The jitted kernels that run a resolved step on one stacked leaf.

Shared by :func:`fusionjax.merge` (leaves streamed from sources) and
:meth:`fusionjax.Step.__call__` (task vectors already stacked in memory). Steps and
statistics are used through their methods only (``apply``, ``update``, ...), so
this module sits below :mod:`fusionjax._src.base` and imports nothing that imports it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import keys as keys_lib
from fusionjax._src import validation


def stacked_tv(base, finetuned):
    """``(base, task vectors [T, ...])`` in the compute dtype (at least float32)."""
    dt = validation.compute_dtype(base.dtype)
    b = base.astype(dt)
    return b, jnp.stack([f.astype(dt) - b for f in finetuned])


def all_finite(xs) -> jax.Array:
    """Whether every entry of every array in ``xs`` is finite: one boolean scalar.

    ``isfinite`` of each input, and-ed elementwise, then one reduction: XLA fuses
    it into a single pass over the inputs in their own dtype. The per-input
    ``isfinite(sum(x - x))`` reductions it replaces cost ~7x the merge for
    bfloat16 leaves on XLA:CPU (each one converts and reduces separately).
    """
    ok = functools.reduce(jnp.logical_and, [jnp.isfinite(x) for x in xs])
    return jnp.all(ok)


@jax.jit
def finite_each(xs) -> jax.Array:
    """``[len(xs)]`` booleans, whether each array is all finite (to name a bad input)."""
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])


def masked_mean(values, counted=None, axis=None):
    """Mean of ``values`` over the ``counted`` entries (all if ``None``); 0 where none count.

    Args:
      values: A floating array.
      counted: ``None`` or a boolean array broadcastable to ``values``.
      axis: Axes to reduce (all if ``None``).

    Returns:
      ``sum(values * counted) / max(count, 1)`` over ``axis``.
    """
    if counted is None:
        return jnp.mean(values, axis=axis)
    total = jnp.sum(jnp.where(counted, values, 0.0), axis=axis)
    count = jnp.sum(counted, axis=axis).astype(values.dtype)
    return total / jnp.maximum(count, 1.0)


def to_device(x):
    """A leaf as a :class:`jax.Array`, like :func:`jax.numpy.asarray`, copied at most once.

    On a CPU backend, with no mesh set, a NumPy array of a canonical dtype (e.g. a
    read-only view of a memory-mapped checkpoint) is copied once into a fresh
    64-byte-aligned buffer that :func:`jax.device_put` then uses without copying
    (it owns the buffer: nothing else writes to it). ``jnp.asarray`` copies twice
    and ``device_put`` of an unaligned array copies page by page: 4-15x slower for
    a 64 MB leaf. Anything else goes through ``jnp.asarray``.
    """
    if (
        type(x) is np.ndarray
        and x.dtype == jax.dtypes.canonicalize_dtype(x.dtype)
        and jax.default_backend() == "cpu"
        and jax.sharding.get_abstract_mesh().empty
    ):
        raw = np.empty(x.nbytes + 64, np.uint8)
        start = -raw.ctypes.data % 64
        buf = raw[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
        np.copyto(buf, x)
        return jax.device_put(buf)
    return jnp.asarray(x)


def explicit_axes(x=None) -> tuple:
    """Mesh axes in explicit sharding mode (inside a trace), or ``()``.

    With ``x``, only if ``x`` itself carries a sharding over that mesh (host
    arrays merged inside a mesh context carry none).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return ()
    if x is not None and jax.typeof(x).sharding.mesh.empty:
        return ()
    return tuple(
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == jax.sharding.AxisType.Explicit
    )


def apply_auto(step, tv, key, base, extras):
    """``step.apply``, run with compiler-chosen shardings under an explicit mesh.

    A step's internals (a radix select's flattened histogram, a per-unit sort)
    need not keep the leaf's sharding; the merged leaf gets it back.
    """
    axes = explicit_axes(tv)
    if not axes:
        return step.apply(tv, key=key, base=base, extras=extras)
    fn = jax.sharding.auto_axes(
        lambda step, tv, key, base, extras: step.apply(tv, key=key, base=base, extras=extras),
        axes=axes,
        out_sharding=jax.typeof(base).sharding if step.reduces else jax.typeof(tv).sharding,
    )
    return fn(step, tv, key, base, extras)


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def stat_leaf(statistic, stacked_input, prefix, state, base, finetuned, pass_index, key, extras):
    """Adds one leaf to a model-wide statistic's state, after the chain's ``prefix`` steps."""
    if stacked_input:
        b, tv = base, finetuned
    else:
        b, tv = stacked_tv(base, finetuned)
    for j, p in enumerate(prefix):
        tv = apply_auto(p, tv, keys_lib.fold_in(key, j), b, extras)
    axes = explicit_axes(tv)
    if not axes:
        return statistic.update(state, tv, pass_index)
    fn = jax.sharding.auto_axes(
        lambda s, x: statistic.update(s, x, pass_index),
        axes=axes,
        out_sharding=jax.tree.map(lambda a: jax.typeof(a).sharding, state),
    )
    return fn(state, tv)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def stat_begin_end(statistic, state, pass_index, end):
    """``statistic.begin`` (or ``.end`` when ``end``) of pass ``pass_index``, jitted."""
    return statistic.end(state, pass_index) if end else statistic.begin(state, pass_index)


@jax.jit
def apply_leaf(step, tv, key, base, extras):
    """A resolved step on one stacked leaf, jitted (no sharding handling)."""
    return step.apply(tv, key=key, base=base, extras=extras)
