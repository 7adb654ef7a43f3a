"""``merge`` and ``chain``: the entry points every merging method goes through.

What costs time, and what is done about it:

* *Compiles.* Every leaf is merged by one jitted kernel whose arguments are the
  resolved step (a pytree: hyperparameters are traced values, the method is its
  static structure), the base leaf and the fine-tuned leaves. The kernel is
  compiled once per method and leaf shape/dtype: new step objects, new
  hyperparameter values and per-leaf values never recompile.
* *Memory.* Leaves are read from the sources, merged and handed to the sink one
  at a time; the stacked ``[T, *params]`` task vectors never exist, and a
  kernel's stacked ``[T, ...]`` leaf is fused away by XLA where the steps are
  written row by row.
* *Model-wide steps* (a :class:`fusionjax._src.base.Statistic`, e.g. TIES trimmed
  over the whole model) cost one extra read of every leaf per statistic pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import kernels
from fusionjax._src import keys as keys_lib
from fusionjax._src import paths as paths_lib
from fusionjax._src import stream
from fusionjax._src import validation
from fusionjax._src.base import Chain
from fusionjax._src.base import LeafInfo
from fusionjax._src.base import LeafValue
from fusionjax._src.base import Params
from fusionjax._src.base import PRNGKey
from fusionjax._src.base import Step
from fusionjax._src.base import check_extras
from fusionjax._src.base import num_layers
from fusionjax._src.base import run_statistics
from fusionjax._src.per_leaf import Partition

keystr = jax.tree_util.keystr


def chain(*steps: Step) -> Step:
    """Chains merging steps, like :func:`optax.chain` chains transformations.

    Task-vector steps (``[T, ...] -> [T, ...]``) come first, then at most one
    merger (``[T, ...] -> [...]``), which makes the chain a merger; only
    elementwise steps such as :func:`fusionjax.merging.scale` may follow it.
    Nested chains are flattened. A random step ``j`` of the chain draws from
    ``jax.random.fold_in(leaf_key, j)``. The chain is a pytree whose children are
    its steps, so chains built with different hyperparameter values share their
    compiled kernels.

    Args:
      *steps: :class:`fusionjax.Step` objects, e.g. from :mod:`fusionjax.merging`.

    Returns:
      A :class:`fusionjax.Step`.

    Raises:
      TypeError: if an argument is not a step, or a merger is not last.

    Examples:
      >>> import fusionjax as fj
      >>> ties_dare = fj.chain(fj.merging.drop_and_rescale(drop_rate=0.5),
      ...                      fj.merging.ties(density=1.0))
      >>> ties_dare.reduces
      True
    """
    if not steps:
        raise TypeError("chain needs at least one step.")
    flat: list[Step] = []
    for s in steps:
        if not isinstance(s, Step):
            raise TypeError(
                f"chain takes fusionjax steps (e.g. fusionjax.merging.trim(...)), got "
                f"{type(s).__name__}. Did you forget to call the factory?"
            )
        flat.extend(s.parts if isinstance(s, Chain) else (s,))
    reducers = [j for j, s in enumerate(flat) if s.reduces]
    if len(reducers) > 1:
        raise TypeError(
            f"a chain can merge only once, but {flat[reducers[0]].name} and "
            f"{flat[reducers[1]].name} both merge the models into one."
        )
    if reducers:
        for s in flat[reducers[0] + 1 :]:
            if not s.elementwise:
                raise TypeError(
                    f"{s.name} works on stacked task vectors [T, ...] and cannot follow the "
                    f"merger {flat[reducers[0]].name}."
                )
    return Chain(tuple(flat))


# -- checks at the entry ------------------------------------------------------


def _check_merger(merger: Any, *, reduces: bool = True) -> None:
    if not isinstance(merger, Step):
        raise TypeError(
            f"merger must be a fusionjax step such as fusionjax.merging.ties(), got "
            f"{type(merger).__name__}."
        )
    if reduces and not merger.reduces:
        raise TypeError(
            f"{merger.name} maps task vectors to task vectors; end it with a merger, e.g. "
            "fusionjax.chain(step, fusionjax.merging.mean())."
        )


# -- the jitted kernels -------------------------------------------------------


def _merge_leaf_impl(step, base, finetuned, key, extras, check_finite, sharded=True):
    b, tv = kernels.stacked_tv(base, finetuned)
    if sharded:
        merged = kernels.apply_auto(step, tv, key, b, extras)
    else:  # a group of small host leaves: nothing to keep sharded
        merged = step.apply(tv, key=key, base=b, extras=extras)
    if merged.shape != base.shape:
        raise ValueError(
            f"the merger returned shape {merged.shape} for a parameter of shape {base.shape}."
        )
    out = (b + merged).astype(base.dtype)
    if not check_finite:
        return out, None
    return out, kernels.all_finite((base, *finetuned))


_merge_leaf = jax.jit(_merge_leaf_impl, static_argnums=(5,))


@functools.partial(jax.jit, static_argnums=(4,))
def _merge_group(steps, base, finetuned, keys, check_finite):
    """``_merge_leaf`` vmapped over a group of small leaves, flattened and zero-padded."""

    def one(step, b, fts, key):
        return _merge_leaf_impl(step, b, fts, key, {}, check_finite, sharded=False)

    return jax.vmap(one, (0, 0, 0, None if keys is None else 0))(steps, base, finetuned, keys)


# Leaves of at most SMALL_LEAF entries, whose step is ``flat``, are merged in
# groups: flattened, zero-padded to a power-of-two bucket (at least MIN_BUCKET)
# and stacked GROUP_ENTRIES entries at a time, so a model with thousands of
# small leaves of a hundred shapes compiles a few programs and makes a few
# calls, not one of each per leaf.
SMALL_LEAF = 1 << 14
MIN_BUCKET = 256
GROUP_ENTRIES = 1 << 18


def _bucket(size: int) -> int:
    return max(MIN_BUCKET, 1 << max(size - 1, 0).bit_length())


@jax.jit
def _average_leaf(finetuned):
    dt = validation.compute_dtype(finetuned[0].dtype)
    acc = finetuned[0].astype(dt)
    for f in finetuned[1:]:
        acc = acc + f.astype(dt)
    return (acc / len(finetuned)).astype(finetuned[0].dtype)


def _equal(a, b) -> bool:
    """Whether two pass-through leaves are equal (``True`` when traced)."""
    if not (validation.is_concrete(a) and validation.is_concrete(b)):
        return True
    if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
    if isinstance(a, (jax.Array, np.ndarray)):
        if a.shape != b.shape:
            return False
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return bool(np.array_equal(a, b))
        eq = jnp.array_equal(a, b)
        return bool(eq) if validation.is_concrete(eq) else True  # traced under an outer jit
    return validation.values_equal(a, b)


def _own(x):
    """A leaf the caller may not mutate through the input: NumPy arrays are copied."""
    return np.array(x, copy=True) if isinstance(x, np.ndarray) else x


# -- the engine ---------------------------------------------------------------


class _Plan:
    """What the engine decided for every leaf, from metadata alone."""

    def __init__(self, base_src, num_models, step, extras, running_stats):
        self.paths = base_src.paths
        self.kinds = base_src.kinds
        n_layers = num_layers(self.paths)
        size = sum(
            math.prod(s.shape) for s, k in zip(base_src.specs, self.kinds, strict=True)
            if k == stream.PARAM
        )
        self.infos: list[LeafInfo | None] = []
        self.steps: list[Step | None] = []
        template = base_src.treedef.unflatten(list(base_src.specs))
        self.extras = {k: paths_lib.broadcast_leaves(template, v, k) for k, v in extras.items()}
        # A step with no per-leaf value resolves the same for every leaf of one
        # shape and dtype: resolve once per (shape, dtype).
        cache = {} if not _path_dependent(step) else None
        self.structures: list = []
        for path, spec, kind in zip(base_src.paths, base_src.specs, base_src.kinds, strict=True):
            if kind != stream.PARAM:
                self.infos.append(None)
                self.steps.append(None)
                self.structures.append(None)
                continue
            info = LeafInfo(path, tuple(spec.shape), spec.dtype, num_models, n_layers, size)
            ck = (info.shape, jnp.dtype(info.dtype))
            if cache is not None and ck in cache:
                resolved, structure = cache[ck]
            else:
                try:
                    resolved = step.resolve(info)
                except (ValueError, TypeError) as e:
                    raise type(e)(f"{step.name} at {keystr(path)}: {e}") from e
                structure = jax.tree.structure(resolved)
                if cache is not None:
                    cache[ck] = (resolved, structure)
            self.infos.append(info)
            self.steps.append(resolved)
            self.structures.append(structure)
        if running_stats not in ("average", "base"):
            raise ValueError(f"running_stats must be 'average' or 'base', got {running_stats!r}.")
        self.running_stats = running_stats

    def leaf_extras(self, i):
        return {k: v[i] for k, v in self.extras.items()}

    def mergeable(self):
        return [i for i, s in enumerate(self.steps) if s is not None]


def _path_dependent(step: Step) -> bool:
    """Whether resolving ``step`` depends on the leaf's path (per-leaf values, partitions)."""
    if isinstance(step, Partition):
        return True
    if any(isinstance(v, LeafValue) for v in step.hparams.values()):
        return True
    return any(_path_dependent(p) for p in step.parts)


def merge(
    base: Params,
    finetuned: Sequence[Params],
    merger: Step,
    *,
    key: PRNGKey | None = None,
    running_stats: Literal["average", "base"] = "average",
    check_finite: bool = True,
    sink: stream.LeafSink | None = None,
    **extra_args: Any,
) -> Any:
    r"""Merges fine-tuned models that share a base model.

    Computes the task vectors :math:`\tau_t = \theta_t - \theta_0`, merges them
    with ``merger`` into one :math:`\tau` and returns :math:`\theta_0 + \tau`,
    leaf by leaf: each leaf is read from every model, merged by one jitted
    kernel (compiled once per method and leaf shape, whatever the
    hyperparameter values) and handed on; the stacked ``[T, *params]`` task
    vectors never exist.

    What happens to each leaf:

    * floating-point parameters are merged (in at least float32, then cast back
      to their dtype);
    * running statistics — leaves under a linen ``batch_stats`` collection and
      nnx ``BatchStat`` variables — are never extrapolated: by default they get
      the plain average of the fine-tuned models' statistics (a convex
      combination, so variances stay positive); ``running_stats="base"`` keeps
      the base's. Re-estimate them on data for the best accuracy
      (:func:`fusionjax.alignment.reset_batch_stats`);
    * every other leaf (integers, bools, PRNG keys, Python scalars) must be equal
      in all models and is passed through; complex leaves are an error.

    Outputs never alias inputs (NumPy leaves passed through are copied).

    Args:
      base: Base parameters :math:`\theta_0`: any pytree (a dict, flax linen
        variables, ``nnx.State``, equinox arrays from ``eqx.partition``), or a
        :class:`fusionjax.LeafSource` that reads leaves lazily.
      finetuned: Non-empty list of fine-tuned models (pytrees or sources), each
        with the structure, shapes and dtypes of ``base``.
      merger: A :class:`fusionjax.Step` that reduces, e.g.
        ``fusionjax.merging.ties()``.
      key: PRNG key for random mergers (DARE, DELLA). Each leaf draws from a key
        derived from ``key`` and its path, so the result does not depend on how
        the model is read.
      running_stats: ``"average"`` or ``"base"``, see above.
      check_finite: Raise if an input has NaN or Inf (checked while the leaves are
        read, by the merge kernel; skipped under :func:`jax.jit`).
      sink: Where merged leaves go (a :class:`fusionjax.LeafSink`); by default
        they are assembled into a pytree like ``base``.
      **extra_args: Per-parameter inputs that some mergers require, as pytrees
        with the structure of ``base`` (or a prefix of it), e.g. ``fishers=`` for
        :func:`fusionjax.merging.fisher_merging`. Unknown names are an error.

    Returns:
      The merged parameters, with the structure and dtypes of ``base`` (or what
      ``sink.finish()`` returns).

    Raises:
      ValueError: if ``finetuned`` is empty, a model differs from ``base`` in
        structure, shape, dtype or a pass-through leaf, an input has NaN/Inf, a
        hyperparameter does not fit (e.g. per-model values for another number of
        models), or a merger's own checks fail. The message names the model and
        the path; everything decidable from metadata is checked before any leaf
        is read.
      TypeError: if ``merger`` is not a merger, or an extra is unknown or missing.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(3)}
      >>> fts = [{"w": jnp.array([1.0, 0.0, 0.0])}, {"w": jnp.array([0.0, 2.0, 0.0])}]
      >>> fj.merge(base, fts, fj.merging.task_arithmetic(scaling=0.5))
      {'w': Array([0.5, 1. , 0. ], dtype=float32)}
    """
    _check_merger(merger)
    if "base" in extra_args:
        raise TypeError("merge passes `base` to the merger itself; do not pass it as an extra.")
    validation.check_nonempty(finetuned)
    base_src = stream.as_source(base)
    ft_srcs = [stream.as_source(f) for f in finetuned]
    validation.check_sources(base_src, ft_srcs)
    mesh = _explicit_mesh([base_src, *ft_srcs])
    if mesh is not None:  # arrays on an explicit mesh, no jax.set_mesh: set it for them
        with jax.set_mesh(mesh):
            return merge(
                base_src, ft_srcs, merger, key=key, running_stats=running_stats,
                check_finite=check_finite, sink=sink, **extra_args,
            )
    check_extras(merger, extra_args)
    if merger.needs_key:
        keys_lib.require_key(key, merger.name)
    plan = _Plan(base_src, len(ft_srcs), merger, extra_args, running_stats)
    out_sink = sink if sink is not None else stream.TreeSink(base_src.treedef)

    def read_inputs(i):
        return kernels.to_device(base_src.read(i)), [kernels.to_device(s.read(i)) for s in ft_srcs]

    if not merger.leafwise:
        run_statistics(plan, merger, key, read_inputs, stacked_input=False)

    flag_idx, flags = [], []  # leaf indices and their all-finite flags
    grouped = set()
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((merger, key)))
    if not extra_args and not traced:
        for idx in _groups(plan, base_src):
            finite = _merge_chunk(idx, plan, base_src, ft_srcs, key, check_finite, out_sink)
            if finite is not False:
                grouped.update(idx)
            if finite is not False and finite is not None:
                flag_idx.extend(idx)
                flags.extend(finite)
    for i, path in enumerate(plan.paths):
        if i in grouped:
            continue
        kind = plan.kinds[i]
        if kind == stream.OTHER:
            b = base_src.read(i)
            for j, s in enumerate(ft_srcs):
                if not _equal(b, s.read(i)):
                    what = "PRNG key" if _is_key(b) else validation.describe(b)
                    raise ValueError(
                        f"finetuned[{j}] differs from base at {keystr(path)}: this {what} leaf "
                        "is not a floating-point array, so it is not merged and must be equal in "
                        "every model."
                    )
            out_sink.write(i, _own(b))
            continue
        if kind == stream.RUNNING_STAT:
            if plan.running_stats == "base":
                out_sink.write(i, _own(base_src.read(i)))
            else:
                out_sink.write(i, _average_leaf([kernels.to_device(s.read(i)) for s in ft_srcs]))
            continue
        b, fts = read_inputs(i)
        concrete = validation.is_concrete(b) and all(validation.is_concrete(f) for f in fts)
        try:
            merged, finite = _merge_leaf(
                plan.steps[i],
                b,
                fts,
                keys_lib.leaf_key(key, path),
                plan.leaf_extras(i),
                check_finite and concrete,
            )
        except (ValueError, TypeError) as e:
            raise type(e)(f"{merger.name} at {keystr(path)}: {e}") from e
        out_sink.write(i, merged)
        # Under an outer jit the flags are traced even when the inputs are
        # closed-over constants; they can only be checked when concrete.
        if finite is not None and validation.is_concrete(finite):
            flag_idx.append(i)
            flags.append(finite)
    if flags:
        for i, ok in zip(flag_idx, jax.device_get(flags), strict=True):
            if not ok:  # read the leaf again to name the first model with NaN/Inf
                b, fts = read_inputs(i)
                bad = int(np.argmin(jax.device_get(kernels.finite_each([b, *fts]))))
                who = "base" if bad == 0 else f"finetuned[{bad - 1}]"
                raise ValueError(f"{who} has NaN or Inf values at {keystr(plan.paths[i])}.")
    return out_sink.finish()


def _explicit_mesh(sources):
    """The mesh of the first leaf sharded over explicit mesh axes, if no mesh is set."""
    if not jax.sharding.get_abstract_mesh().empty:
        return None
    explicit = jax.sharding.AxisType.Explicit
    for src in sources:
        for spec in src.specs:
            if isinstance(spec, jax.core.Tracer) or not isinstance(
                spec, (jax.Array, jax.ShapeDtypeStruct)
            ):
                continue
            sharding = spec.sharding
            if isinstance(sharding, jax.sharding.NamedSharding) and explicit in (
                sharding.mesh.axis_types
            ):
                return sharding.mesh
    return None


def _groups(plan, base_src):
    """Chunks of leaf indices to merge together (same method structure, dtype, bucket)."""
    by_key: dict = {}
    for i in plan.mergeable():
        spec, step = base_src.specs[i], plan.steps[i]
        sharding = getattr(spec, "sharding", None)
        if (
            not step.flat
            or plan.infos[i].size > SMALL_LEAF
            or (sharding is not None and len(sharding.device_set) > 1)
        ):
            continue
        k = (plan.structures[i], jnp.dtype(spec.dtype), _bucket(plan.infos[i].size))
        by_key.setdefault(k, []).append(i)
    for (_, _, bucket), idx in by_key.items():
        per = max(1, GROUP_ENTRIES // bucket)
        for c in range(0, len(idx), per):
            yield idx[c : c + per]


def _merge_chunk(idx, plan, base_src, ft_srcs, key, check_finite, out_sink):
    """Merges one group of small leaves in one call.

    Returns ``False`` if they must go one by one, else their all-finite flags
    ``[len(idx)]`` (``None`` without the check).
    """
    bases = [base_src.read(i) for i in idx]
    fts = [[s.read(i) for i in idx] for s in ft_srcs]
    for x in [*bases, *(f for row in fts for f in row)]:
        if isinstance(x, jax.core.Tracer) or (
            # spread over devices (a source whose specs do not say so): merge it where it is
            isinstance(x, jax.Array)
            and (not x.is_fully_addressable or len(x.sharding.device_set) > 1)
        ):
            return False
    info0 = plan.infos[idx[0]]
    bucket = _bucket(max(plan.infos[i].size for i in idx))
    rows = max(1, GROUP_ENTRIES // bucket)  # fixed per bucket: one compile per bucket

    def pack(leaves):
        buf = np.zeros((rows, bucket), info0.dtype)
        for j, x in enumerate(leaves):
            flat = np.asarray(x).reshape(-1)
            buf[j, : flat.size] = flat
        return buf

    steps = [plan.steps[i] for i in idx]
    if all(s is steps[0] for s in steps):  # one resolved step for the whole group
        stacked = jax.tree.map(
            lambda x: np.broadcast_to(np.asarray(x), (rows, *np.shape(x))), steps[0]
        )
    else:
        steps += [steps[0]] * (rows - len(idx))
        stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *steps)
    pad_paths = [plan.paths[idx[0]]] * (rows - len(idx))
    keys = keys_lib.leaf_keys(key, [plan.paths[i] for i in idx] + pad_paths)
    out, finite = _merge_group(stacked, pack(bases), [pack(f) for f in fts], keys, check_finite)
    out = np.asarray(out)
    leaves = [out[j, : plan.infos[i].size].reshape(plan.infos[i].shape) for j, i in enumerate(idx)]
    # Leaves on a 1-device mesh get their NamedSharding back.
    shardings = [getattr(x, "sharding", None) for x in bases]
    named = [isinstance(s, jax.sharding.NamedSharding) for s in shardings]
    if any(named):
        placed = [jax.device_put(x, s) if n else jax.device_put(x)
                  for x, s, n in zip(leaves, shardings, named, strict=True)]
    else:
        placed = jax.device_put(leaves)
    for i, leaf in zip(idx, placed, strict=True):
        out_sink.write(i, leaf)
    return None if finite is None else np.asarray(finite)[: len(idx)]


def _is_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


