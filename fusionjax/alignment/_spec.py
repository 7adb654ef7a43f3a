r"""Permutation specs: which ``(leaf, axis)`` pairs share one permutation.

A hidden unit of a network lives on several axes at once: the output axis of the
layer that computes it, the axis of its bias (and of any norm statistics), and the
input axis of every layer that reads it. Permuting all of them by the same
permutation :math:`P` leaves the network's function unchanged. A
:class:`PermutationSpec` names these *groups*; alignment methods return one
permutation (or transport map) per group, and :func:`apply_permutations` moves a
model's units accordingly.

Leaves are named by their *path*: the keys from the root of the pytree joined by
``"/"``, e.g. ``"params/Dense_0/kernel"`` for a flax linen variables dict, or
``"layers/0/weight"`` for an equinox module. :func:`leaf_paths` lists them.

Convention (as in Git Re-Basin): ``apply_permutations`` gathers, so unit ``i`` of
the result is unit ``perm[i]`` of the input, on every axis of the group.

References:
  Ainsworth, Hayase & Srinivasa, `Git Re-Basin: Merging Models modulo Permutation
  Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src.base import Params
from fusionjax._src.base import PRNGKey

PathLike = str | Sequence[Any]
"""A leaf path: ``"params/Dense_0/kernel"`` or ``("params", "Dense_0", "kernel")``."""

Permutations = dict
"""``{group name: int array [n]}``: one permutation per group of a spec."""


def _key_str(k) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return str(k.name)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_str(keypath: Sequence[Any]) -> str:
    """The ``"a/b/c"`` name of a leaf from its JAX key path (or a tuple of keys)."""
    return "/".join(_key_str(k) for k in keypath)


def normalize_path(path: PathLike) -> str:
    """``("params", "Dense_0", "kernel")`` or ``"params/Dense_0/kernel"`` -> the string form."""
    if isinstance(path, str):
        return path.strip("/")
    return path_str(path)


def leaf_paths(params: Params) -> dict[str, Any]:
    """``{path: leaf}`` for every leaf of ``params``, in flattening order.

    A path is the leaf's keys from the root joined by ``"/"`` (dict keys, attribute
    names, sequence indices), the form :class:`PermutationSpec` names leaves by.

    Args:
      params: Any pytree: a linen variables dict, an ``nnx.State``, an equinox module.

    Returns:
      ``{path: leaf}``, e.g. ``{"params/Dense_0/kernel": array}``, in the order of
      :func:`jax.tree_util.tree_flatten_with_path`.

    Raises:
      ValueError: if two leaves have the same path (e.g. keys ``"a/b"`` and
        ``("a", "b")``); the message names it.

    Examples:
      >>> import jax.numpy as jnp
      >>> list(leaf_paths({"params": {"Dense_0": {"kernel": jnp.zeros((2, 3))}}}))
      ['params/Dense_0/kernel']
    """
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    out = {}
    for kp, leaf in flat:
        name = path_str(kp)
        if name in out:
            raise ValueError(f"two leaves share the path {name!r}; rename a key")
        out[name] = leaf
    return out


@dataclasses.dataclass(frozen=True)
class PermutationSpec:
    """Groups of ``(leaf path, axis)`` pairs that are permuted together.

    A spec is static (hashable): it may be a :func:`jax.jit` static argument, and it is
    registered as a static pytree (no leaves), so outputs that hold one, such as
    :class:`AlignmentOutput`, can be returned from a jitted function.

    Attributes:
      groups: ``{name: ((path, axis), ...)}``. ``axis`` may be negative. A pair
        belongs to at most one group; leaves and axes not named are never permuted.

    Examples:
      A two-layer MLP with one hidden layer of units ``"h"``:

      >>> spec = PermutationSpec({"h": [("Dense_0/kernel", 1), ("Dense_0/bias", 0),
      ...                               ("Dense_1/kernel", 0)]})
      >>> spec.names
      ('h',)
    """

    groups: Mapping[str, tuple[tuple[str, int], ...]]

    def __init__(self, groups: Mapping[str, Iterable[tuple[PathLike, int]]]):
        norm: dict[str, tuple[tuple[str, int], ...]] = {}
        owner: dict[tuple[str, int], str] = {}
        for name, axes in groups.items():
            if not isinstance(name, str):
                raise TypeError(f"group names must be strings, got {name!r}")
            entries = []
            for entry in axes:
                try:
                    path, axis = entry
                except (TypeError, ValueError):
                    raise TypeError(
                        f"group {name!r}: entries are (path, axis) pairs, got {entry!r}"
                    ) from None
                if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
                    raise TypeError(
                        f"group {name!r}: axis of {path!r} must be an int, got {axis!r}"
                    )
                pair = (normalize_path(path), int(axis))
                if pair in owner:
                    raise ValueError(
                        f"({pair[0]!r}, axis {pair[1]}) is in two groups: "
                        f"{owner[pair]!r} and {name!r}"
                    )
                owner[pair] = name
                entries.append(pair)
            if not entries:
                raise ValueError(f"group {name!r} is empty")
            norm[name] = tuple(entries)
        object.__setattr__(self, "groups", _FrozenDict(norm))

    @property
    def names(self) -> tuple[str, ...]:
        """Group names, in the order given."""
        return tuple(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def leaf_axes(self, params: Params) -> dict[str, tuple[str | None, ...]]:
        """``{path: (group or None per axis)}`` for the leaves this spec touches.

        Raises:
          ValueError: if a path is not a leaf of ``params``, an axis is out of range,
            or the axes of one group have different sizes (the message names them).
        """
        leaves = leaf_paths(params)
        out: dict[str, list] = {}
        for name, axes in self.groups.items():
            for path, axis in axes:
                if path not in leaves:
                    close = [p for p in leaves if p.endswith(path) or path.endswith(p)]
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(
                        f"spec group {name!r} names {path!r}, not a leaf of params{hint}"
                    )
                ndim = np.ndim(leaves[path])
                if not -ndim <= axis < ndim:
                    raise ValueError(
                        f"spec group {name!r}: axis {axis} out of range for {path!r} "
                        f"of shape {np.shape(leaves[path])}"
                    )
                slot = out.setdefault(path, [None] * ndim)
                if slot[axis % ndim] is not None:
                    raise ValueError(
                        f"{path!r} axis {axis % ndim} is in two groups: "
                        f"{slot[axis % ndim]!r} and {name!r}"
                    )
                slot[axis % ndim] = name
        self.sizes(params)
        return {p: tuple(v) for p, v in out.items()}

    def sizes(self, params: Params) -> dict[str, int]:
        """``{group: number of units}``, checking that every axis of a group agrees."""
        leaves = leaf_paths(params)
        sizes = {}
        for name, axes in self.groups.items():
            seen = None
            for path, axis in axes:
                if path not in leaves:
                    raise ValueError(f"spec group {name!r} names {path!r}, not a leaf of params")
                n = np.shape(leaves[path])[axis]
                if seen is None:
                    seen = (n, path, axis)
                elif n != seen[0]:
                    raise ValueError(
                        f"spec group {name!r} has axes of different sizes: {seen[1]!r} axis "
                        f"{seen[2]} has {seen[0]} units, {path!r} axis {axis} has {n}"
                    )
            sizes[name] = seen[0]
        return sizes

    def partition(self) -> frozenset[frozenset[tuple[str, int]]]:
        """The groups as a set of sets, ignoring names (axes as given, not normalised)."""
        return frozenset(frozenset(axes) for axes in self.groups.values())

    def same_groups(self, other: PermutationSpec, params: Params) -> bool:
        """Whether two specs group the same axes of ``params`` (names may differ)."""

        def canon(spec):
            leaves = leaf_paths(params)
            return frozenset(
                frozenset((p, a % np.ndim(leaves[p])) for p, a in axes)
                for axes in spec.groups.values()
            )

        return canon(self) == canon(other)

    def rename(self, names: Mapping[str, str]) -> PermutationSpec:
        """A copy with groups renamed by ``names`` (groups not listed keep their name)."""
        return PermutationSpec({names.get(k, k): v for k, v in self.groups.items()})

    def prefixed(self, prefix: PathLike) -> PermutationSpec:
        """A copy whose paths start with ``prefix``, e.g. ``"params"`` for linen variables."""
        pre = normalize_path(prefix)
        return PermutationSpec(
            {k: [(f"{pre}/{p}", a) for p, a in v] for k, v in self.groups.items()}
        )

    def __repr__(self) -> str:
        lines = [f"PermutationSpec({len(self.groups)} groups)"]
        for name, axes in self.groups.items():
            lines.append(f"  {name}: " + ", ".join(f"{p}[{a}]" for p, a in axes))
        return "\n".join(lines)


class _FrozenDict(dict):
    """An immutable, hashable dict (so specs can be static jit arguments)."""

    def __hash__(self):
        return hash(tuple(self.items()))

    def _immutable(self, *a, **k):
        raise TypeError("PermutationSpec groups are immutable")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = _immutable


jax.tree_util.register_static(PermutationSpec)


def check_spec(spec: Any, name: str = "spec") -> PermutationSpec:
    """Returns ``spec`` if it is a non-empty :class:`PermutationSpec`, else raises.

    Raises:
      TypeError: if ``spec`` is not a :class:`PermutationSpec`.
      ValueError: if it has no groups (there would be nothing to align, and a method
        would report success having done nothing).
    """
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"{name} must be a PermutationSpec, got {type(spec).__name__}.")
    if len(spec) == 0:
        raise ValueError(
            f"{name} has no groups, so there is nothing to align. If it comes from "
            "derive_spec, every axis of the model froze: e.g. an input or output axis "
            "reaches it, or an operation derive_spec cannot see through does (its log at "
            "DEBUG level names them)."
        )
    return spec


def identity_permutations(spec: PermutationSpec, params: Params) -> Permutations:
    r"""``{group: arange(n)}``: the permutations that change nothing.

    :math:`P_g = I_{n_g}` for every group, so ``apply_permutations(spec, perms, params)``
    returns ``params``; the starting point of weight matching.

    Args:
      spec: The permutation spec.
      params: A model the spec describes (only shapes are read, to find each
        group's size :math:`n_g`).

    Returns:
      ``{group: int array [n_g]}`` with ``perm[i] == i``.

    Raises:
      TypeError: if ``spec`` is not a :class:`PermutationSpec`.
      ValueError: if the spec has no groups or does not fit ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> spec = PermutationSpec({"h": [("w", 1)]})
      >>> identity_permutations(spec, {"w": jnp.zeros((2, 3))})
      {'h': Array([0, 1, 2], dtype=int32)}
    """
    check_spec(spec)
    return {k: jnp.arange(n) for k, n in spec.sizes(params).items()}


def random_permutations(spec: PermutationSpec, params: Params, key: PRNGKey) -> Permutations:
    r"""One uniformly random permutation per group (independent keys per group).

    Each :math:`P_g` is drawn uniformly from the :math:`n_g!` permutations of
    ``range(n_g)``, from its own key (``jax.random.split(key, len(spec))`` in the
    spec's group order). Applying them to a model gives a functionally identical copy,
    the test case of every alignment method.

    Args:
      spec: The permutation spec.
      params: A model the spec describes (only shapes are read).
      key: A PRNG key.

    Returns:
      ``{group: int array [n_g]}``, each a permutation of ``range(n_g)``.

    Raises:
      TypeError: if ``spec`` is not a :class:`PermutationSpec`.
      ValueError: if the spec has no groups or does not fit ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> spec = PermutationSpec({"h": [("w", 1)]})
      >>> perms = random_permutations(spec, {"w": jnp.zeros((2, 5))}, jax.random.key(0))
      >>> sorted(perms["h"].tolist())
      [0, 1, 2, 3, 4]
    """
    check_spec(spec)
    sizes = spec.sizes(params)
    keys = jax.random.split(key, len(sizes))
    pairs = zip(keys, sizes.items(), strict=True)
    return {k: jax.random.permutation(kk, n) for kk, (k, n) in pairs}


def invert_permutation(perm: jax.Array) -> jax.Array:
    r"""The inverse permutation: ``inv`` with ``inv[perm[i]] == i``.

    As matrices, :math:`P^{-1} = P^\top`. In :func:`apply_permutations`' gather
    convention, applying ``perm`` and then ``invert_permutation(perm)`` (on the same
    axes) restores the original order. Jittable (a scatter, no sort).

    Args:
      perm: An integer permutation of ``range(n)``, shape ``[n]``.

    Returns:
      Its inverse, shape ``[n]`` and ``perm``'s dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> invert_permutation(jnp.array([2, 0, 1]))
      Array([1, 2, 0], dtype=int32)
    """
    perm = jnp.asarray(perm)
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def check_permutations(spec: PermutationSpec, params: Params, permutations: Permutations) -> None:
    """Checks that ``permutations`` holds one permutation of ``range(n_g)`` per group.

    Keys must be exactly the spec's groups, and each value must have shape
    ``(n_g,)``, where :math:`n_g` is the group's size in ``params``. Concrete values
    are also checked to be integer permutations of ``range(n_g)``; traced values
    (under :func:`jax.jit`) only by shape.

    Args:
      spec: The permutation spec.
      params: A model the spec describes (only shapes are read).
      permutations: ``{group: int array [n_g]}``, e.g.
        :attr:`AlignmentOutput.permutations`.

    Returns:
      ``None``; the function only raises.

    Raises:
      ValueError: if a group is missing, an entry is not a group of the spec, a
        permutation has the wrong shape or is not a permutation of ``range(n_g)``
        (the message names the group), or the spec does not fit ``params``.
    """
    sizes = spec.sizes(params)
    missing = [k for k in sizes if k not in permutations]
    if missing:
        raise ValueError(f"permutations has no entry for group {missing[0]!r}")
    extra = [k for k in permutations if k not in sizes]
    if extra:
        raise ValueError(f"permutations has an entry {extra[0]!r} that is not a group of the spec")
    for k, n in sizes.items():
        p = permutations[k]
        if np.shape(p) != (n,):
            raise ValueError(f"permutation of group {k!r} has shape {np.shape(p)}, expected ({n},)")
        if not isinstance(p, jax.core.Tracer):
            arr = np.asarray(p)
            if not np.issubdtype(arr.dtype, np.integer) or not np.array_equal(
                np.sort(arr), np.arange(n)
            ):
                raise ValueError(f"permutation of group {k!r} is not a permutation of range({n})")


def apply_permutations(spec: PermutationSpec, permutations: Permutations, params: Params) -> Params:
    """Permutes ``params``' units: on every axis of group ``g``, unit ``i`` <- unit ``perm[g][i]``.

    Leaves outside the spec (and non-array leaves, such as an equinox module's
    functions) are returned unchanged. Works on any pytree the spec's paths name, e.g.
    a linen variables dict with both ``params`` and ``batch_stats``, or an equinox
    module. Jittable (the spec is static).

    Args:
      spec: The permutation spec.
      permutations: ``{group: int array [n]}``, e.g. :attr:`AlignmentOutput.permutations`.
      params: The model to permute.

    Returns:
      A pytree like ``params``.

    Raises:
      ValueError: if the spec has no groups, a group is missing, a length is wrong, or
        a path is not in ``params``.
    """
    check_spec(spec)
    check_permutations(spec, params, permutations)
    axes = spec.leaf_axes(params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    where = [i for i, (kp, _) in enumerate(flat) if axes.get(path_str(kp)) is not None]
    leaves = [leaf for _, leaf in flat]
    if where:
        names = tuple(tuple(axes[path_str(flat[i][0])]) for i in where)
        perms = {
            k: v if isinstance(v, (jax.Array, jax.core.Tracer)) else np.asarray(v)
            for k, v in permutations.items()
        }
        moved = _permute_leaves(names, [leaves[i] for i in where], perms)
        for i, leaf in zip(where, moved, strict=True):
            leaves[i] = leaf
    return jax.tree_util.tree_unflatten(treedef, leaves)


@functools.partial(jax.jit, static_argnums=0)
def _permute_leaves(names, leaves, permutations):
    # One compiled program per model (eager jnp.take compiled one per leaf shape and axis).
    out = []
    for leaf, groups in zip(leaves, names, strict=True):
        for axis, g in enumerate(groups):
            if g is not None:
                leaf = jnp.take(leaf, permutations[g], axis=axis)
        out.append(leaf)
    return out


class AlignmentOutput(NamedTuple):
    r"""Result of a permutation alignment (weight, activation or STE matching).

    A pytree whose ``spec`` is static (:class:`PermutationSpec` is registered with
    :func:`jax.tree_util.register_static`), so a jitted function can return it whole.

    Attributes:
      permutations: ``{group: int array [n]}``; ``apply`` moves ``other`` onto ``ref``.
      objective: The matching objective reached (e.g. :math:`\sum_\ell
        \langle W^{ref}_\ell, P_\ell W^{other}_\ell P_{\ell-1}^\top\rangle_F` for weight
        matching, summed correlations for activation matching).
      converged: Whether the method stopped because it made no more progress (not
        because it ran out of iterations).
      spec: The spec the permutations belong to.
    """

    permutations: Permutations
    objective: jax.Array
    converged: jax.Array
    spec: PermutationSpec

    def apply(self, params: Params) -> Params:
        """``params`` with its units permuted (see :func:`apply_permutations`)."""
        return apply_permutations(self.spec, self.permutations, params)
