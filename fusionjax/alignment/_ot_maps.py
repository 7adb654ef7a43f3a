r"""OT fusion's maps: a coupling per group applied to a model's read and written axes.

A coupling :math:`T_g` ``[m, n]`` (other's units x ref's units) moves an axis of group
:math:`g` from :math:`m` to :math:`n` units by one of two maps (the marginal correction,
:func:`transport_maps`): an axis where a leaf *writes* the unit takes the barycentric
map :math:`T\,\mathrm{diag}(1/\beta)`, an axis where it *reads* the unit takes
:math:`\mathrm{diag}(1/\alpha)\,T`.

**Read or write.** Which axes a leaf writes is decided by layout, not by the spec:
by default (``roles="last"``, the flax/linen and haiku layout where kernels are
``[..., in, out]``) a leaf writes along its last axis and reads along every other
permuted axis; a 1-D leaf (bias, norm scale, BatchNorm statistic) always writes.
``roles="first"`` is the PyTorch/equinox layout (``[out, in, ...]``). A mapping
``{(path, axis): "read" | "write"}`` overrides single axes (start from
:func:`axis_roles`). The role only matters where the two models' group sizes differ:
for equal sizes both maps coincide. Limitation: an axis whose unit is written but is
not a leaf's last axis, such as the head axis of a flax attention kernel ``[d, heads,
head_dim]``, is taken as read; with equal head counts (the usual case) this changes
nothing.

**Dtypes.** Leaves are mapped in at least float32 (bf16/f16 upcast, float64 kept when
``jax_enable_x64`` is on) and cast back to their own dtype; a map is cast to the dtype
of the leaf it is applied to.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax.alignment._ot_transport import compute_array
from fusionjax.alignment._spec import PermutationSpec
from fusionjax.alignment._spec import check_spec
from fusionjax.alignment._spec import leaf_paths
from fusionjax.alignment._spec import normalize_path
from fusionjax.alignment._spec import path_str

_HIGHEST = jax.lax.Precision.HIGHEST

Roles = dict
"""``{(path, axis): "read" | "write"}`` for every permuted axis of a spec."""

Transports = dict
"""``{group: [m, n]}``: one coupling per group (other's units x ref's units, mass 1)."""


def axis_roles(spec: PermutationSpec, params: Params, convention: str = "last") -> Roles:
    """Whether each permuted axis is where its leaf writes or reads the group's units.

    Args:
      spec: The permutation spec.
      params: A model the spec describes (only shapes are used).
      convention: ``"last"``: a leaf writes along its last axis (flax/linen and haiku
        kernels ``[..., in, out]``); ``"first"``: along axis 0 (PyTorch/equinox
        ``[out, in, ...]``). Other permuted axes are read. 1-D leaves always write.

    Returns:
      ``{(path, axis): "read" | "write"}`` with non-negative axes, for every pair of the
      spec.

    Raises:
      ValueError: if ``convention`` is unknown or the spec does not fit ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusionjax.alignment import PermutationSpec
      >>> spec = PermutationSpec({"h": [("l0/kernel", 1), ("l0/bias", 0), ("l1/kernel", 0)]})
      >>> params = {"l0": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)},
      ...           "l1": {"kernel": jnp.zeros((3, 2))}}
      >>> sorted(axis_roles(spec, params).items())
      [(('l0/bias', 0), 'write'), (('l0/kernel', 1), 'write'), (('l1/kernel', 0), 'read')]
    """
    check_spec(spec)
    if convention not in ("last", "first"):
        raise ValueError(f"roles convention must be 'last' or 'first', got {convention!r}.")
    out = {}
    for path, names in spec.leaf_axes(params).items():
        ndim = len(names)
        written = ndim - 1 if convention == "last" else 0
        for a, g in enumerate(names):
            if g is not None:
                out[(path, a)] = "write" if (ndim == 1 or a == written) else "read"
    return out


def _resolve_roles(spec: PermutationSpec, params: Params, roles) -> Roles:
    if isinstance(roles, str):
        return axis_roles(spec, params, roles)
    if not isinstance(roles, Mapping):
        raise TypeError(
            "roles must be 'last', 'first' or a mapping {(path, axis): 'read' | 'write'}, "
            f"got {type(roles).__name__}."
        )
    out = axis_roles(spec, params, "last")
    leaves = leaf_paths(params)
    for key, role in roles.items():
        try:
            path, axis = key
        except (TypeError, ValueError):
            raise TypeError(f"roles keys are (path, axis) pairs, got {key!r}") from None
        path = normalize_path(path)
        ndim = np.ndim(leaves[path]) if path in leaves else 0
        pair = (path, int(axis) % ndim if ndim else int(axis))
        if pair not in out:
            raise ValueError(
                f"roles names ({path!r}, axis {axis}), which is not an axis of the spec."
            )
        if role not in ("read", "write"):
            raise ValueError(
                f"role of ({path!r}, axis {axis}) must be 'read' or 'write', got {role!r}."
            )
        out[pair] = role
    return out


def _inverse(x: jax.Array) -> jax.Array:
    """``1 / x`` where ``x > 0``, else 0 (a unit that receives no mass gets nothing)."""
    pos = x > 0
    return jnp.where(pos, 1.0 / jnp.where(pos, x, 1.0), 0.0)


def transport_maps(
    transport: ArrayLike, *, marginal_correction: bool = True
) -> tuple[jax.Array, jax.Array]:
    r"""The write and read maps of a coupling (the marginal correction).

    Args:
      transport: Coupling :math:`T` ``[m, n]`` (other's units x ref's units).
      marginal_correction: Divide by the coupling's own marginals :math:`\alpha =
        T\mathbf 1`, :math:`\beta = T^\top\mathbf 1` (exact normalisation; the paper
        code's ``proper_marginals``). ``False`` divides by the target marginals
        :math:`1/m` and :math:`1/n`; both agree for an exact or converged coupling. A
        boolean array is accepted too (selected with ``jnp.where``).

    Returns:
      ``(write, read)``, both ``[m, n]``: :math:`T\,\mathrm{diag}(1/\beta)` (columns sum to
      one: ref unit :math:`j` is a weighted mean of other units) and
      :math:`\mathrm{diag}(1/\alpha)\,T` (rows sum to one: an other unit's outgoing weight
      is divided among the ref units it is sent to), in the coupling's dtype (at least
      float32). A leaf axis ``a`` of ``other`` is mapped by
      ``tensordot(x, map, axes=([a], [0]))``.

    Raises:
      ValueError: if ``transport`` is not a matrix.
    """
    t = compute_array(transport)
    if t.ndim != 2:
        raise ValueError(f"transport must be a matrix [m, n], got shape {t.shape}.")
    m, n = t.shape
    own = t.sum(axis=1), t.sum(axis=0)
    target = jnp.full((m,), 1.0 / m, t.dtype), jnp.full((n,), 1.0 / n, t.dtype)
    if isinstance(marginal_correction, (bool, np.bool_)):
        alpha, beta = own if marginal_correction else target
    else:  # an array flag (e.g. OTFusionOutput.marginal_correction after jax.jit)
        flag = jnp.asarray(marginal_correction, bool)
        alpha, beta = (jnp.where(flag, o, p) for o, p in zip(own, target, strict=True))
    return t * _inverse(beta)[None, :], t * _inverse(alpha)[:, None]


def _map_axis(x: jax.Array, mat: jax.Array, axis: int) -> jax.Array:
    """``x`` with axis ``axis`` (size m) mapped to size n by ``mat [m, n]`` (cast to x's dtype)."""
    y = jnp.tensordot(x, mat.astype(x.dtype), axes=([axis], [0]), precision=_HIGHEST)
    return jnp.moveaxis(y, -1, axis)


def _map_leaf(x, names, path, roles, maps, only=None):
    for a, g in enumerate(names):
        if g is not None and (only is None or g == only):
            write, read = maps[g]
            x = _map_axis(x, write if roles[(path, a)] == "write" else read, a)
    return x


def apply_transports(
    spec: PermutationSpec,
    transports: Transports,
    params: Params,
    *,
    roles: str | Roles = "last",
    marginal_correction: bool = True,
) -> Params:
    r"""Maps a model's units through one coupling per group (soft or hard).

    Every permuted axis of group :math:`g` is contracted with the write map
    :math:`T_g\mathrm{diag}(1/\beta_g)` or the read map :math:`\mathrm{diag}(1/\alpha_g)T_g`
    (see :func:`transport_maps`), so its size goes from :math:`m_g` to :math:`n_g`.
    With permutation couplings this is :func:`~fusionjax.alignment.apply_permutations`.

    Args:
      spec: The permutation spec.
      transports: ``{group: [m, n]}`` couplings, e.g. :attr:`OTFusionOutput.transports`.
      params: The model to map (``m`` units per group). Leaves outside the spec are
        returned unchanged.
      roles: ``"last"``, ``"first"`` or a mapping ``{(path, axis): "read" | "write"}``
        (see :func:`axis_roles`).
      marginal_correction: See :func:`transport_maps`.

    Returns:
      A pytree like ``params`` with ``n`` units per group. Mapped leaves are computed in
      at least float32 (float64 kept under x64) and cast back to their dtype.

    Raises:
      ValueError: if the spec has no groups, a group is missing or a coupling's shape
        does not fit ``params``.
    """
    check_spec(spec)
    sizes = spec.sizes(params)
    axes = spec.leaf_axes(params)
    role_map = _resolve_roles(spec, params, roles)
    for g, m in sizes.items():
        if g not in transports:
            raise ValueError(f"transports has no entry for group {g!r}.")
        shape = np.shape(transports[g])
        if len(shape) != 2 or shape[0] != m:
            raise ValueError(
                f"transport of group {g!r} has shape {shape}, expected ({m}, n): "
                f"params has {m} units in that group."
            )
    mapped = {
        path_str(kp): x
        for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]
        if path_str(kp) in axes
    }
    static = isinstance(marginal_correction, (bool, np.bool_))
    out = _apply_maps(
        {g: transports[g] for g in sizes},
        mapped,
        None if static else marginal_correction,
        names=tuple(sorted((p, axes[p]) for p in mapped)),
        roles=tuple(sorted(role_map.items())),
        correction=bool(marginal_correction) if static else None,
    )
    return jax.tree_util.tree_map_with_path(lambda kp, x: out.get(path_str(kp), x), params)


@functools.partial(jax.jit, static_argnames=("names", "roles", "correction"))
def _apply_maps(transports, leaves, flag, *, names, roles, correction):
    """:func:`apply_transports`' arithmetic, one compiled program (not op by op per leaf).

    ``correction``: the marginal correction when a Python bool, else ``None`` and ``flag``
    holds it as a boolean array.
    """
    flag = correction if correction is not None else flag
    maps = {g: transport_maps(t, marginal_correction=flag) for g, t in transports.items()}
    roles = dict(roles)
    out = {}
    for path, leaf_names in names:
        x = leaves[path]
        y = _map_leaf(compute_array(x), leaf_names, path, roles, maps)
        out[path] = y.astype(jax.dtypes.canonicalize_dtype(x.dtype))
    return out


def _names(spec: PermutationSpec, path: str, ndim: int) -> tuple:
    """The group (or ``None``) on each axis of leaf ``path``."""
    names = [None] * ndim
    for g, axes in spec.groups.items():
        for p, a in axes:
            if p == path:
                names[a % ndim] = g
    return tuple(names)


@functools.partial(jax.jit, static_argnames=("g", "axes", "roles", "marginal_correction"))
def group_apply(cur, transport, cost, *, g, axes, roles, marginal_correction):
    """``cur`` with group ``g``'s axes mapped onto ref's units; hard assignment; OT cost."""
    maps = {g: transport_maps(transport, marginal_correction=marginal_correction)}
    roles = dict(roles)
    new = {path: _map_leaf(cur[path], names, path, roles, maps, only=g) for path, names in axes}
    return new, jnp.argmax(transport, axis=0), jnp.sum(transport * cost)
