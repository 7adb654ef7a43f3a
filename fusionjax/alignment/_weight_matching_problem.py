r"""The weight matching problem: its static plan, cost matrices, objective and sweep order.

For every group :math:`g` of a :class:`PermutationSpec`, weight matching looks for a
permutation :math:`\pi_g` of ``other``'s units maximising

.. math::

  f(\pi) = \sum_{\ell} \big\langle W^{ref}_\ell,\; \pi(W^{other})_\ell \big\rangle_F ,

where :math:`\pi(W)_\ell` permutes every axis of leaf :math:`\ell` that belongs to a
group. Holding every permutation but :math:`\pi_g` fixed, the terms that read
:math:`\pi_g` are :math:`\sum_i C^g_{i,\pi_g(i)}` with

.. math::

  C^g = \sum_{(\ell, a) \in g} \mathrm{mat}_a\!\big(W^{ref}_\ell\big)\,
        \mathrm{mat}_a\!\big(\pi_{\neg a}(W^{other})_\ell\big)^\top

(:math:`\mathrm{mat}_a` moves axis :math:`a` first and flattens the rest;
:math:`\pi_{\neg a}` permutes the leaf's other axes with the *current* permutations).
This is exact when :math:`g` appears on one axis of each leaf (an MLP, a CNN, a
transformer): the coordinate step is then a linear assignment problem (LAP). When
:math:`g` appears on two axes of one leaf (a recurrent kernel :math:`U_{hh}`, read and
written by the same units), that leaf's term
:math:`\langle U^{ref}, P_g U^{other} P_g^\top\rangle` is quadratic in :math:`P_g`, and
:math:`C^g` is its linearisation at the current :math:`\pi_g` (the coordinate step is a
quadratic assignment problem). Such groups are *self-coupled*
(:meth:`_Plan.self_coupled`); the solvers evaluate the true objective of their terms
(:func:`group_gain`) before taking a step.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fusionjax._src import validation
from fusionjax._src.base import Params
from fusionjax._src.base import PRNGKey
from fusionjax.alignment._spec import PermutationSpec
from fusionjax.alignment._spec import leaf_paths

_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of a matching problem (hashable, a jit static argument).

    Attributes:
      sizes: Units per group.
      entries: Per group, ``(leaf index, axis, ((other axis, other group), ...))`` for
        every (float) leaf axis of the group.
      neighbours: Per group, the groups whose permutation its cost matrix depends on.
      leaf_groups: ``(leaf index, (group index or -1 per axis))`` for permuted leaves.
      float_leaves: Indices of the floating-point leaves (the objective's terms).
      dtype: Compute dtype name (``"float32"``, or ``"float64"`` for float64 inputs).
    """

    sizes: tuple[int, ...]
    entries: tuple[tuple[tuple[int, int, tuple[tuple[int, int], ...]], ...], ...]
    neighbours: tuple[tuple[int, ...], ...]
    leaf_groups: tuple[tuple[int, tuple[int, ...]], ...]
    float_leaves: tuple[int, ...]
    dtype: str

    def static_entries(self, g: int):
        """Entries of group ``g`` whose contribution depends on no permutation."""
        return tuple(e for e in self.entries[g] if not e[2])

    def dynamic_entries(self, g: int):
        """Entries of group ``g`` whose contribution depends on other permutations."""
        return tuple(e for e in self.entries[g] if e[2])

    def dynamic_leaves(self, g: int) -> tuple[int, ...]:
        """Leaf indices the dynamic part of group ``g``'s cost reads."""
        return tuple(sorted({e[0] for e in self.dynamic_entries(g)}))

    def self_coupled(self, g: int) -> bool:
        """Whether ``g`` is on two axes of one leaf (its cost matrix is a linearisation)."""
        return any(h == g for _, _, others in self.entries[g] for _, h in others)

    def group_leaves(self, g: int) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """``(leaf index, group per axis)`` of the float leaves with an axis in group ``g``."""
        return tuple((i, gs) for i, gs in self.leaf_groups if g in gs and i in self.float_leaves)


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def make_plan(spec: PermutationSpec, ref: Params) -> _Plan:
    """Builds the static plan of ``spec`` over ``ref`` (validating paths, axes, sizes)."""
    axes = spec.leaf_axes(ref)
    sizes = spec.sizes(ref)
    names = spec.names
    gidx = {k: i for i, k in enumerate(names)}
    paths = list(leaf_paths(ref))
    leaves = jax.tree.leaves(ref)
    lidx = {p: i for i, p in enumerate(paths)}
    entries: list[list] = [[] for _ in names]
    neighbours: list[set] = [set() for _ in names]
    leaf_groups = []
    for path, groups in axes.items():
        i = lidx[path]
        gs = tuple(gidx[g] if g is not None else -1 for g in groups)
        leaf_groups.append((i, gs))
        if not _is_float(leaves[i]):
            continue
        for a, g in enumerate(gs):
            if g < 0:
                continue
            others = tuple((b, h) for b, h in enumerate(gs) if h >= 0 and b != a)
            entries[g].append((i, a, others))
            for _, h in others:
                # g's cost reads h's permutation, so a change of h dirties g.
                neighbours[h].add(g)
    float_leaves = tuple(i for i, x in enumerate(leaves) if _is_float(x))
    # float64 compute only where JAX has it (x64 on); float64 NumPy inputs otherwise run in
    # float32, as JAX would truncate them, without asking for a dtype it lacks.
    x64 = jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64
    f64 = x64 and any(leaves[i].dtype == jnp.float64 for i in float_leaves)
    return _Plan(
        sizes=tuple(sizes[k] for k in names),
        entries=tuple(tuple(e) for e in entries),
        neighbours=tuple(tuple(sorted(s)) for s in neighbours),
        leaf_groups=tuple(sorted(leaf_groups)),
        float_leaves=float_leaves,
        dtype="float64" if f64 else "float32",
    )


def entry_cost(a, b, axis, others, perms, dtype):
    """``mat_axis(a) @ mat_axis(b with its other axes permuted).T``: ``[n, n]``."""
    a = a.astype(dtype)
    b = b.astype(dtype)
    for ax, h in others:
        b = jnp.take(b, perms[h], axis=ax)
    contract = tuple(d for d in range(a.ndim) if d != axis)
    return lax.dot_general(a, b, ((contract, contract), ((), ())), precision=_HIGHEST)


def static_cost(ref, other, plan: _Plan, g: int):
    n = plan.sizes[g]
    out = jnp.zeros((n, n), plan.dtype)
    for i, a, others in plan.static_entries(g):
        out = out + entry_cost(ref[i], other[i], a, others, None, plan.dtype)
    return out


def dynamic_cost(base, ref, other, perms, plan: _Plan, g: int):
    out = base
    for i, a, others in plan.dynamic_entries(g):
        out = out + entry_cost(ref[i], other[i], a, others, perms, plan.dtype)
    return out


@functools.partial(jax.jit, static_argnames=("plan",))
def static_costs_jit(ref, other, *, plan):
    return tuple(static_cost(ref, other, plan, g) for g in range(len(plan.sizes)))


def _permute_leaf(x, groups, perms):
    for ax, h in enumerate(groups):
        if h >= 0:
            x = jnp.take(x, perms[h], axis=ax)
    return x


def objective(ref, other, perms, plan: _Plan):
    groups = dict(plan.leaf_groups)
    total = jnp.zeros((), plan.dtype)
    for i in plan.float_leaves:
        b = other[i]
        if i in groups:
            b = _permute_leaf(b, groups[i], perms)
        total = total + jnp.sum(ref[i].astype(plan.dtype) * b.astype(plan.dtype))
    return total


objective_jit = jax.jit(objective, static_argnames=("plan",))


def group_gain(ref, other, perms, plan: _Plan, g: int, new_perm):
    r"""``(gain, scale)``: how the objective changes if ``perms[g]`` becomes ``new_perm``.

    Exact, not linearised: ``gain`` is :math:`\sum_\ell \langle W^{ref}_\ell,
    \pi'(W^{other})_\ell - \pi(W^{other})_\ell\rangle` over the leaves with an axis in
    ``g`` (the other terms do not change), and ``scale`` the sum of the absolute values of
    its products, a bound on its rounding error's scale. The solvers take a self-coupled
    group's step only if ``gain > SELF_RTOL[dtype] * scale``.
    """
    new_views = dict(enumerate(perms))
    new_views[g] = new_perm
    gain = scale = jnp.zeros((), plan.dtype)
    for i, gs in plan.group_leaves(g):
        a = ref[i].astype(plan.dtype)
        d = _permute_leaf(other[i], gs, new_views).astype(plan.dtype) - _permute_leaf(
            other[i], gs, perms
        ).astype(plan.dtype)
        terms = a * d
        gain = gain + jnp.sum(terms)
        scale = scale + jnp.sum(jnp.abs(terms))
    return gain, scale


SELF_RTOL = {name: 64 * float(np.finfo(name).eps) for name in ("float32", "float64")}
"""A self-coupled step is taken when its gain exceeds this fraction of its scale (rounding)."""


def _fmix32(h, xp):
    """MurmurHash3's 32-bit finaliser (uint32 in, uint32 out; wraps on overflow)."""
    h = h ^ (h >> 16)
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def sweep_orders(key: PRNGKey | None, max_iter: int, num_groups: int) -> jax.Array:
    """The order in which each sweep visits the groups, int32 ``[max_iter, num_groups]``.

    Row ``t`` is a pseudo-random permutation of the groups determined by ``key`` and
    ``t`` (an integer hash of the key's bits, ``t`` and the group index, argsorted): the
    same in the host loop and in the compiled loop, traced or not, and cheap to compile.
    With ``key=None`` every sweep visits the groups in the spec's order.

    Args:
      key: A PRNG key (typed or raw ``uint32[2]``), or ``None``.
      max_iter: Number of sweeps.
      num_groups: Number of groups.

    Returns:
      int32 ``[max_iter, num_groups]``.
    """
    max_iter = max(int(max_iter), 0)
    if key is None:
        return jax.device_put(np.tile(np.arange(num_groups, dtype=np.int32), (max_iter, 1)))
    if isinstance(key, jax.core.Tracer):
        return jnp.asarray(_orders_from_bits(_key_bits(key), max_iter, num_groups, jnp))
    bits = np.asarray(_key_bits(key)).astype(np.uint32)
    return jax.device_put(_orders_from_bits(bits, max_iter, num_groups, np))  # int32 NumPy


def _key_bits(key):
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return key.reshape(-1).astype(jnp.uint32)


def _orders_from_bits(bits, max_iter, num_groups, xp):
    t = xp.arange(max_iter, dtype=xp.uint32)[:, None]
    g = xp.arange(num_groups, dtype=xp.uint32)[None, :]
    h = _fmix32(t * xp.uint32(0x9E3779B9) + g, xp)
    for k in range(bits.shape[0]):
        h = _fmix32(h ^ bits[k], xp)
    if xp is np:
        return np.argsort(h, axis=1, kind="stable").astype(np.int32)
    return jnp.argsort(h, axis=1, stable=True).astype(jnp.int32)


@dataclasses.dataclass
class MatchStats:
    """Work done by one :func:`weight_matching` call (for benchmarks and tests).

    Attributes:
      sweeps: Sweeps started.
      solves: Linear assignment problems solved.
      skipped: Group visits skipped because the group's cost matrix was unchanged.
      cost_s: Seconds spent building cost matrices (host loop only).
      lap_s: Seconds spent in the LAP solver (host loop only).
      recomputes: Cost-matrix contributions computed from scratch (host loop only).
      updates: Contributions updated by a low-rank correction (host loop only).
      rejected: Steps of self-coupled groups not taken because they would not have
        increased the objective (host loop only).
    """

    sweeps: int = 0
    solves: int = 0
    skipped: int = 0
    cost_s: float = 0.0
    lap_s: float = 0.0
    recomputes: int = 0
    updates: int = 0
    rejected: int = 0


check_finite = validation.check_finite  # the one finite check of the library


def reduce_cost(cost):
    """Row- then column-max-reduced ``cost``: the same LAP optimum, shorter scipy paths."""
    reduced = cost - jnp.max(cost, axis=1, keepdims=True)
    return reduced - jnp.max(reduced, axis=0, keepdims=True)
