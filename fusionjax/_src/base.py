r"""Core types: parameter pytrees, merging steps as data, and what a step knows of a leaf.

A *task vector* is the difference between a fine-tuned model and its base,
:math:`\tau_t = \theta_t - \theta_0` (Ilharco et al., 2023). Merging methods in
fusionjax are short chains of *steps* over stacked task vectors:

* a *task-vector step* maps stacked task vectors ``[T, ...]`` to stacked task
  vectors ``[T, ...]`` (trim, drop-and-rescale, sign election, ...);
* a *merger* maps stacked task vectors ``[T, ...]`` to one merged task vector
  ``[...]`` (sum, mean, disjoint mean, ...).

A :class:`Step` is a pytree, the way an ott solver is: its numeric
hyperparameters are *children* (traceable; a density sweep is new values, not a
new program) and everything that decides the program — the leaf function, the
options, which hyperparameters may hold one value per model — is static *aux
data*. Two steps built by the same factory call with different values have the
same tree structure, so :func:`fusionjax.merge` compiles once per method and
leaf shape, however many step objects exist.

Before a leaf is merged the step is *resolved* for it (:meth:`Step.resolve`), on
the host, from the leaf's metadata alone (:class:`LeafInfo`: path, shape, dtype,
number of models): per-leaf values (:func:`fusionjax.merging.by_path`,
:func:`fusionjax.merging.gradient`) are picked, per-model values are checked
against ``T`` and broadcast to ``[T]``, and shape-dependent quantities are
computed exactly in float64 (e.g. TIES' kept count :math:`\lceil\rho n\rceil`).
Then the resolved step's leaf function runs inside :func:`jax.jit`.

A step that needs a *model-wide* statistic (whole-model magnitude trimming)
carries a :class:`Statistic`: :func:`fusionjax.merge` first streams every leaf
through it (``update``, additive, so leaves can come from disk one at a time),
then hands the result to every leaf's pass.

This module also holds what :func:`fusionjax.merge` and :meth:`Step.__call__` share
(extras checks, the model-wide statistics runner, the in-memory stacked apply); the
jitted kernels are in :mod:`fusionjax._src.kernels`. It imports no module of
``fusionjax._src`` that imports it back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import kernels
from fusionjax._src import keys as keys_lib
from fusionjax._src import paths as paths_lib
from fusionjax._src import stream
from fusionjax._src import validation
from fusionjax._src.keys import fold_in

keystr = jax.tree_util.keystr

Params = Any
"""Any pytree of arrays: a nested dict, flax ``nnx.State``, an equinox module."""

Stacked = Any
"""The same pytree with a leading model axis ``T`` on every (inexact) leaf."""

PRNGKey = jax.Array
ArrayLike = jax.typing.ArrayLike

LeafFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """What a step may know about the leaf it merges, before any value is read.

    Attributes:
      path: The leaf's key path (as from :func:`jax.tree_util.tree_flatten_with_path`).
      shape: Shape of one model's leaf (without the model axis).
      dtype: The leaf's dtype.
      num_models: ``T``, the number of fine-tuned models.
      num_layers: Number of numbered layers in the whole model (one more than the
        largest layer index found in any path), or ``None`` if no path has one.
        :func:`fusionjax.merging.gradient` interpolates over it.
      model_size: Entries of one model over all its merged leaves (what a
        model-wide step ranks over), or ``None`` if unknown.
    """

    path: tuple
    shape: tuple
    dtype: Any
    num_models: int
    num_layers: int | None = None
    model_size: int | None = None

    @property
    def size(self) -> int:
        """Number of entries of one model's leaf."""
        return math.prod(self.shape)

    @property
    def name(self) -> str:
        """The path as ``"a/b/0/c"``, the form path patterns are matched against."""
        return paths_lib.path_name(self.path)

    @property
    def keystr(self) -> str:
        """The path as in error messages, ``['a']['b']``."""
        return jax.tree_util.keystr(self.path)


class LeafValue:
    """A hyperparameter value that depends on the leaf (e.g. on its path).

    Subclasses implement :meth:`value_for` and :meth:`values` (every value it
    can take, for validation when the step is built).
    """

    def value_for(self, info: LeafInfo) -> Any:
        """The value at one leaf."""
        raise NotImplementedError

    def values(self) -> list:
        """Every value this can take (checked when the step is built)."""
        raise NotImplementedError


class Statistic:
    """A model-wide statistic a step needs, accumulated over the leaves first.

    Every method is a pure function; ``update`` is additive over leaves (so a
    merge streams the leaves from any source, in any order) and may be called
    under :func:`jax.jit`. ``num_passes`` rounds each visit every leaf once
    (an exact radix select takes two rounds for float32).
    Instances must be hashable and compare equal by value (they are static).
    """

    num_passes: int = 1

    def init(self, hparams: Mapping[str, Any], infos: list[LeafInfo]) -> Any:
        """The state before the first pass, from the resolved hyperparameters and all leaves."""
        raise NotImplementedError

    def begin(self, state: Any, pass_index: int) -> Any:
        """Prepares ``state`` for pass ``pass_index`` (jittable)."""
        return state

    def update(self, state: Any, x: jax.Array, pass_index: int) -> Any:
        """Adds one stacked leaf ``[T, ...]`` to the state (jittable)."""
        raise NotImplementedError

    def end(self, state: Any, pass_index: int) -> Any:
        """Closes pass ``pass_index`` (jittable)."""
        return state

    def result(self, state: Any) -> dict[str, jax.Array]:
        """Hyperparameters added to every leaf's pass, e.g. ``{"threshold": [T]}``."""
        raise NotImplementedError


def _to_array(value: Any, name: str, step: str) -> jax.Array:
    """A resolved hyperparameter as a float32/int32 array (traced values kept)."""
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"{step}: {name} must be a number or an array, got {value!r}.")
    if isinstance(value, jax.core.Tracer):
        return value
    arr = np.asarray(value)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise TypeError(f"{step}: {name} must be a number or an array, got {value!r}.")
    if isinstance(value, jax.Array):
        return value
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float64)  # exact until `prepare` has run; float32 after
    return arr


def _compute_form(v: Any) -> Any:
    """Float64/int64 host values as float32/int32, so every leaf's program is the same."""
    if isinstance(v, np.ndarray) or np.isscalar(v):
        arr = np.asarray(v)
        if np.issubdtype(arr.dtype, np.floating):
            return arr.astype(np.float32)
        if np.issubdtype(arr.dtype, np.integer):
            return arr.astype(np.int32)
    return v


@jax.tree_util.register_pytree_node_class
class Step:
    """A merging step: a pure leaf function plus its hyperparameters as data.

    Build steps with the factories of :mod:`fusionjax.merging` rather than by
    hand. ``fn(x, *, key, base, **kwargs)`` receives one stacked leaf ``x``
    ``[T, ...]`` in the compute dtype (at least float32), the leaf's PRNG key (or
    ``None``), the base leaf, and as keyword arguments the resolved
    hyperparameters, the static options and the extras the step declares.

    Attributes:
      name: Short name used in messages, e.g. ``"trim"``.
      fn: The leaf function (static: a module-level function).
      hparams: Numeric hyperparameters by name (pytree children): numbers,
        arrays, or :class:`LeafValue` objects resolved per leaf.
      reduces: ``True`` for a merger (``[T, ...] -> [...]``), ``False`` for a
        task-vector step (``[T, ...] -> [T, ...]``).
      options: Static options by name (strings, bools, ints), passed to ``fn``.
      per_model: Names of the hyperparameters that may hold one value per model
        (shape ``[T]``); they reach ``fn`` always as ``[T]``.
      needs_key: Whether the step is random and requires a PRNG key.
      elementwise: Whether ``fn`` works on arrays of any shape (e.g.
        :func:`fusionjax.merging.scale`), so it may follow a merger.
      extras: Names of keyword extras of :func:`fusionjax.merge` the step needs
        (e.g. ``("fishers",)``); they reach ``fn`` sliced to the leaf.
      prepare: Optional static ``prepare(hparams, info) -> hparams`` run on the
        host per leaf after resolution (e.g. density -> exact kept count).
      statistic: Optional :class:`Statistic` for a model-wide step.
      flat: Whether ``fn`` gives the same result on the leaf flattened to
        ``[T, n]`` and zero-padded at the end (elementwise steps, magnitude
        ranks with counts from the true size, norms and inner products). Such
        steps let :func:`fusionjax.merge` merge many small leaves in one call.
    """

    def __init__(
        self,
        name: str,
        fn: LeafFn | None,
        *,
        reduces: bool,
        hparams: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        per_model: tuple[str, ...] = (),
        needs_key: bool = False,
        elementwise: bool = False,
        extras: tuple[str, ...] = (),
        prepare: Callable[..., dict] | None = None,
        statistic: Statistic | None = None,
        flat: bool = False,
    ):
        self.name = name
        self.fn = fn
        self.reduces = bool(reduces)
        self.hparams = dict(hparams or {})
        self.options = tuple(sorted((options or {}).items()))
        self.per_model = tuple(per_model)
        self.needs_key = bool(needs_key)
        self.elementwise = bool(elementwise)
        self.extras = tuple(extras)
        self.prepare = prepare
        self.statistic = statistic
        self.flat = bool(flat)

    # -- pytree protocol: hyperparameters are children, the rest is aux data --
    def _aux(self):
        return (
            self.name,
            self.fn,
            self.reduces,
            self.options,
            self.per_model,
            self.needs_key,
            self.elementwise,
            self.extras,
            self.prepare,
            self.statistic,
            self.flat,
        )

    def tree_flatten(self):
        keys = tuple(sorted(self.hparams))
        return tuple(self.hparams[k] for k in keys), (keys, self._aux())

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, rest = aux
        obj = object.__new__(cls)
        (
            obj.name,
            obj.fn,
            obj.reduces,
            obj.options,
            obj.per_model,
            obj.needs_key,
            obj.elementwise,
            obj.extras,
            obj.prepare,
            obj.statistic,
            obj.flat,
        ) = rest
        obj.hparams = dict(zip(keys, children, strict=True))
        return obj

    # -- what the engine asks of a step --
    @property
    def parts(self) -> tuple[Step, ...]:
        """The steps this step is made of (itself for a single step)."""
        return ()

    @property
    def leafwise(self) -> bool:
        """Whether no part needs a model-wide statistic (the merge is one pass)."""
        return self.statistic is None and all(p.leafwise for p in self.parts)

    def required_extras(self) -> tuple[str, ...]:
        """Names of the keyword extras this step (or any part) needs."""
        return self.extras

    def resolve(self, info: LeafInfo) -> Step:
        """This step for one leaf: per-leaf values picked, per-model values checked.

        Runs on the host from metadata alone. Per-model hyperparameters become
        ``[T]`` arrays, the others scalars; concrete values become float32 (or
        int32) NumPy arrays, so every resolved step of a method has the same
        structure and :func:`jax.jit` caches by method and leaf shape only.

        Args:
          info: The leaf's :class:`LeafInfo`.

        Returns:
          A resolved :class:`Step` (the same kind, hyperparameters as arrays).

        Raises:
          ValueError: if a hyperparameter has a shape other than ``()`` or
            ``(T,)`` (the latter only where the step allows one value per model).
        """
        hp = {}
        t = info.num_models
        for k, v in self.hparams.items():
            if isinstance(v, LeafValue):
                v = v.value_for(info)
            arr = _to_array(v, k, self.name)
            shape = tuple(np.shape(arr))
            if k in self.per_model:
                if shape not in ((), (t,)):
                    raise ValueError(
                        f"{k} takes one value, or one per model (shape ({t},) "
                        f"for {t} models), got shape {shape}."
                    )
                if shape == ():
                    arr = (
                        jnp.broadcast_to(arr, (t,))
                        if isinstance(arr, jax.core.Tracer)
                        else np.broadcast_to(arr, (t,)).copy()
                    )
            elif shape != ():
                raise ValueError(
                    f"{k} takes a single value, got shape {shape}"
                    + (
                        f"; per-model values are accepted for {', '.join(self.per_model)}."
                        if self.per_model
                        else "."
                    )
                )
            hp[k] = arr
        if self.prepare is not None:
            hp = self.prepare(hp, info)
        return self.replace(hparams={k: _compute_form(v) for k, v in hp.items()})

    def replace(self, **changes) -> Step:
        """A copy with some attributes changed (e.g. ``hparams=``)."""
        obj = object.__new__(type(self))
        obj.__dict__.update(self.__dict__)
        for k, v in changes.items():
            if k == "options":
                v = tuple(sorted(dict(v).items()))
            setattr(obj, k, dict(v) if k == "hparams" else v)
        return obj

    def apply(
        self,
        x: jax.Array,
        *,
        key: PRNGKey | None = None,
        base: jax.Array | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> jax.Array:
        """Runs the (resolved) step on one stacked leaf; called inside :func:`jax.jit`."""
        kw = dict(self.options)
        kw.update(self.hparams)
        for name in self.extras:
            kw[name] = (extras or {}).get(name, MISSING)
        return self.fn(x, key=key, base=base, **kw)

    def __call__(
        self, tvs: Stacked, *, key: PRNGKey | None = None, base: Params = None, **extra_args
    ) -> Any:
        """Applies the step to an in-memory stacked pytree of task vectors ``[T, ...]``.

        Args:
          tvs: Stacked task vectors; ``None`` leaves are kept ``None``.
          key: PRNG key for random steps.
          base: Optional base parameters (some mergers use them, e.g. SLERP).
          **extra_args: The extras the step requires (e.g. ``fishers=``).

        Returns:
          The stacked (task-vector step) or merged (merger) task vectors.
        """
        return apply_to_stacked(self, tvs, key=key, base=base, extras=extra_args)

    # -- equality by structure and values, so equal factory calls give equal steps --
    def __eq__(self, other) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        la, ta = jax.tree.flatten(self)
        lb, tb = jax.tree.flatten(other)
        if ta != tb:
            return False
        return all(
            (a is b)
            or (
                not isinstance(a, jax.core.Tracer)
                and not isinstance(b, jax.core.Tracer)
                and _values_equal(a, b)
            )
            for a, b in zip(la, lb, strict=True)
        )

    def __hash__(self):
        return hash(jax.tree.structure(self))

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={_short(v)}" for k, v in sorted(self.hparams.items()))
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options)
        args = ", ".join(a for a in (hp, opts) if a)
        return f"{self.name}({args})"


def _values_equal(a, b) -> bool:
    if isinstance(a, LeafValue) or isinstance(b, LeafValue):
        return a == b
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except (TypeError, ValueError):
        return a == b


def _short(v) -> str:
    if isinstance(v, LeafValue):
        return repr(v)
    if isinstance(v, jax.core.Tracer):
        return "<traced>"
    arr = np.asarray(v)
    return repr(arr.item()) if arr.ndim == 0 else repr(arr.tolist())


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


MISSING = _Missing()
"""What a step's leaf function receives for a declared extra that was not passed."""


@jax.tree_util.register_pytree_node_class
class Chain(Step):
    """Steps applied in order; see :func:`fusionjax.chain`. Its parts are its children."""

    def __init__(self, steps: tuple[Step, ...]):
        reducers = [s for s in steps if s.reduces]
        super().__init__(
            "chain(" + ", ".join(s.name for s in steps) + ")",
            None,
            reduces=bool(reducers),
            needs_key=any(s.needs_key for s in steps),
            elementwise=all(s.elementwise for s in steps),
            flat=all(s.flat for s in steps),
        )
        self._parts = tuple(steps)

    def tree_flatten(self):
        return (self._parts,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(tuple(children[0]))

    @property
    def parts(self) -> tuple[Step, ...]:
        return self._parts

    def required_extras(self) -> tuple[str, ...]:
        out: list[str] = []
        for p in self._parts:
            out += [e for e in p.required_extras() if e not in out]
        return tuple(out)

    def resolve(self, info: LeafInfo) -> Step:
        return Chain(tuple(p.resolve(info) for p in self._parts))

    def apply(self, x, *, key=None, base=None, extras=None):
        for j, p in enumerate(self._parts):
            x = p.apply(x, key=fold_in(key, j), base=base, extras=extras)
        return x

    def replace(self, **changes) -> Step:
        if set(changes) - {"parts"}:
            raise TypeError("a chain's only attribute to replace is parts.")
        return Chain(tuple(changes["parts"]))

    def __repr__(self) -> str:
        return "chain(" + ", ".join(repr(p) for p in self._parts) + ")"


TaskVectorFn = Step
"""A :class:`Step` with ``reduces=False``: ``[T, ...] -> [T, ...]``."""

Merger = Step
"""A :class:`Step` with ``reduces=True``: ``[T, ...] -> [...]``."""


# -- what merge and Step.__call__ share: extras, model-wide statistics ---------


def check_extras(step: Step, extras: dict) -> None:
    """Unknown extras are an error with a suggestion; missing required ones too."""
    known = step.required_extras()
    for name in extras:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            takes = f"it takes {', '.join(known)}" if known else "it takes no extras"
            raise TypeError(f"{step.name} got an unexpected extra {name!r} ({takes}).{hint}")
    for name in known:
        if name not in extras:
            raise TypeError(f"{step.name} needs the extra {name}=...; see its docstring.")


def _statistic_positions(step: Step) -> list[int]:
    return [j for j, p in enumerate(parts_of(step)) if p.statistic is not None]


def num_layers(leaf_paths) -> int | None:
    """One more than the largest layer index in the paths, or ``None`` (:class:`LeafInfo`)."""
    idx = [paths_lib.layer_index(paths_lib.path_name(p)) for p in leaf_paths]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else None


def parts_of(step: Step) -> tuple[Step, ...]:
    """A chain's steps, or the step alone."""
    return step.parts if isinstance(step, Chain) else (step,)


def run_statistics(plan, step, key, read_inputs, stacked_input):
    """Runs every model-wide statistic of ``step`` and writes its results into the plan.

    ``plan`` has ``paths``, ``infos``, ``steps`` (resolved, updated in place),
    ``leaf_extras(i)`` and ``mergeable()``; ``read_inputs(i)`` returns leaf ``i``'s
    ``(base, finetuned)`` (or ``(base, stacked task vectors)`` when ``stacked_input``).
    """
    positions = _statistic_positions(step)
    parts = parts_of(step)
    for g in positions:
        stat = parts[g].statistic
        for name, v in parts[g].hparams.items():
            if isinstance(v, LeafValue):
                raise ValueError(
                    f"{parts[g].name} works over the whole model: {name} takes one value, "
                    "not a per-leaf value."
                )
        idx = plan.mergeable()
        if not idx:
            continue
        infos = [plan.infos[i] for i in idx]
        first = parts_of(plan.steps[idx[0]])[g]
        state = stat.init(first.hparams, infos)
        for p in range(stat.num_passes):
            state = kernels.stat_begin_end(stat, state, p, False)
            for i in idx:
                b, fts = read_inputs(i)
                prefix = parts_of(plan.steps[i])[:g]
                # Wait for the previous leaf's update before queueing this one: the
                # updates are dispatched asynchronously, and each queued one holds
                # its leaf's inputs, so an unthrottled loop reads the whole model
                # ahead of the computation. At most two leaves are alive at a time.
                _wait(state)
                state = kernels.stat_leaf(
                    stat,
                    stacked_input,
                    prefix,
                    state,
                    b,
                    fts,
                    p,
                    keys_lib.leaf_key(key, plan.paths[i]),
                    plan.leaf_extras(i),
                )
            state = kernels.stat_begin_end(stat, state, p, True)
        result = stat.result(state)
        for i in idx:
            ps = list(parts_of(plan.steps[i]))
            ps[g] = ps[g].replace(hparams={**ps[g].hparams, **result})
            plan.steps[i] = Chain(tuple(ps)) if isinstance(plan.steps[i], Chain) else ps[0]
            if hasattr(plan, "structures"):
                plan.structures[i] = jax.tree.structure(plan.steps[i])


def _wait(state) -> None:
    """Blocks until ``state``'s concrete arrays are computed (traced ones are skipped)."""
    leaves = [
        x for x in jax.tree.leaves(state)
        if isinstance(x, jax.Array) and validation.is_concrete(x)
    ]
    if leaves:
        jax.block_until_ready(leaves)


def apply_to_stacked(
    step: Step, tvs: Any, *, key: PRNGKey | None = None, base: Params = None, extras=None
) -> Any:
    """Applies a step to in-memory stacked task vectors ``[T, ...]`` (``Step.__call__``).

    Each leaf is resolved from its metadata, computed in at least float32 by the
    kernels of :mod:`fusionjax._src.kernels` (model-wide statistics first, as in
    :func:`fusionjax.merge`) and cast back to its dtype. Used by learned merging
    (e.g. AdaMerging++'s TIES preprocessing) on task vectors that are already stacked.

    Args:
      step: The step (a task-vector step or a merger).
      tvs: Stacked task vectors, a leading model axis ``T`` on every leaf; ``None``
        leaves stay ``None``.
      key: PRNG key for random steps (each leaf draws from a key derived from its path).
      base: Optional base parameters, a pytree like ``tvs`` without the model axis.
      extras: The keyword extras the step requires, e.g. ``{"fishers": ...}``.

    Returns:
      ``[T, ...]`` leaves for a task-vector step, ``[...]`` leaves for a merger.

    Raises:
      TypeError: if an extra is unknown or missing.
      ValueError: if a key is needed and missing, a leaf lacks the model axis, or the
        step's own checks fail (the message names the path).
    """
    extras = dict(extras or {})
    check_extras(step, extras)
    if step.needs_key:
        keys_lib.require_key(key, step.name)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tvs)
    leaf_paths = [p for p, _ in flat]
    leaves = [x for _, x in flat]
    if not leaves:
        return tvs
    t = int(np.shape(leaves[0])[0])
    base_leaves = (
        [None] * len(leaves) if base is None else paths_lib.broadcast_leaves(tvs, base, "base")
    )
    n_layers = num_layers(leaf_paths)
    size = sum(math.prod(np.shape(x)[1:]) for x in leaves)
    steps, infos = [], []
    for path, x in flat:
        if np.ndim(x) < 1 or np.shape(x)[0] != t:
            raise ValueError(
                f"{step.name}: stacked task vectors need a leading model axis of size {t} on "
                f"every leaf; {keystr(path)} has shape {np.shape(x)}."
            )
        info = LeafInfo(path, tuple(np.shape(x)[1:]), x.dtype, t, n_layers, size)
        try:
            steps.append(step.resolve(info))
        except (ValueError, TypeError) as e:
            raise type(e)(f"{step.name} at {keystr(path)}: {e}") from e
        infos.append(info)

    class _StackedPlan:
        pass

    plan = _StackedPlan()
    plan.paths, plan.infos, plan.steps = leaf_paths, infos, steps
    template = treedef.unflatten([stream.spec_of(x) for x in leaves])
    ex = {k: paths_lib.broadcast_leaves(template, v, k) for k, v in extras.items()}
    plan.leaf_extras = lambda i: {k: v[i] for k, v in ex.items()}
    plan.mergeable = lambda: list(range(len(leaves)))

    def compute(i):
        x = jnp.asarray(leaves[i])
        x = x.astype(validation.compute_dtype(x.dtype))
        b = base_leaves[i]
        return (None if b is None else jnp.asarray(b, x.dtype)), x

    if not step.leafwise:
        run_statistics(plan, step, key, compute, stacked_input=True)
    out = []
    for i, path in enumerate(leaf_paths):
        b, x = compute(i)
        try:
            y = kernels.apply_leaf(
                plan.steps[i], x, keys_lib.leaf_key(key, path), b, plan.leaf_extras(i)
            )
        except (ValueError, TypeError) as e:
            raise type(e)(f"{step.name} at {keystr(path)}: {e}") from e
        out.append(y.astype(leaves[i].dtype))
    return treedef.unflatten(out)
