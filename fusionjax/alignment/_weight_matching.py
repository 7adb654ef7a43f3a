r"""Weight matching (Git Re-Basin, Algorithm 1): coordinate ascent over permutations.

Weight matching finds, for every group :math:`g` of a :class:`PermutationSpec`, a
permutation :math:`\pi_g` of ``other``'s units that maximises the inner product of the
two models' weights,

.. math::

  \max_{\pi}\; \sum_{\ell} \big\langle W^{ref}_\ell,\; \pi(W^{other})_\ell \big\rangle_F ,

where :math:`\pi(W)_\ell` permutes every axis of leaf :math:`\ell` that belongs to a
group (for an MLP: :math:`P_\ell W_\ell P_{\ell-1}^\top`). Holding every permutation but
:math:`\pi_g` fixed, the objective is linear in :math:`\pi_g`: it is
:math:`\sum_i C^g_{i,\pi_g(i)}` with

.. math::

  C^g = \sum_{(\ell, a) \in g} \mathrm{mat}_a\!\big(W^{ref}_\ell\big)\,
        \mathrm{mat}_a\!\big(\pi_{\neg g}(W^{other})_\ell\big)^\top ,

(:math:`\mathrm{mat}_a` moves axis :math:`a` first and flattens the rest;
:math:`\pi_{\neg g}` permutes the leaf's other axes), so one coordinate step is an exact
linear assignment problem. The method sweeps over the groups in a random order, solving
each LAP, until a sweep makes no progress.

Implementation (what costs time, and what is done about it). A visit costs one cost
matrix (matmuls of the group's leaves, with the neighbours' permutations applied as
gathers) and one LAP; measured on the 784-512-512-512-10 MLP pair of
``benchmarks/weight_matching.py`` (2-core AMD EPYC, shared), a plain NumPy + scipy visit
took ~13-20 ms, about half of it in scipy's LAP. Exact reductions, each of which leaves
every result unchanged:

* *Skipping unchanged groups*: :math:`C^g` depends only on the permutations of the groups
  that share a leaf with :math:`g`. If none of them changed since :math:`g`'s last solve,
  :math:`C^g` is bitwise the same, so its (deterministic) LAP would return the current
  :math:`\pi_g` again; the visit is skipped. This removes the final, confirming sweep and
  more (MLP pair: 29 solves instead of 42).
* *Static parts once*: contributions that depend on no permutation (first-layer kernels,
  biases and norm scales of the group's own layer, the classifier) are computed once.
* *Cached, low-rank-updated contributions* (groups of 256 or more units): each leaf's
  contribution to :math:`C^g` is cached with the versions of the permutations it read;
  when one of them moved :math:`k \le n/4` units, the contribution is corrected by those
  :math:`k` rows only, :math:`\Delta = A_{R}^\top (B_{\pi'(R)} - B_{\pi(R)})`, a
  rank-:math:`k` product (exact up to float rounding), instead of an :math:`n^3` matmul.
* *Reduced LAP input*: scipy solves :math:`C - \max_{row} - \max_{col}`, which has the
  same optimum (every assignment shifts by the same constant) and ~1.5x shorter
  augmenting paths.
* *Compiled cost matrices*: one XLA program per (shape, axes) builds a contribution with
  its gathers; small groups build their whole matrix in one program, shared by groups of
  identical structure (e.g. identical residual blocks).

``solver="hungarian"`` instead compiles the whole loop (``lax.while_loop`` over sweeps,
``lax.switch`` over groups, one padded :func:`optax.assignment.hungarian_algorithm`), with
no host round trip; it is what runs under :func:`jax.jit`. On CPU it was slower (see
:mod:`fusionjax.alignment._assignment`).

References:
  Ainsworth, Hayase & Srinivasa, `Git Re-Basin: Merging Models modulo Permutation
  Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023 (Algorithm 1).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fusionjax._src import validation
from fusionjax._src.base import Params, PRNGKey
from fusionjax.alignment import _assignment
from fusionjax.alignment._spec import (
    AlignmentOutput,
    Permutations,
    PermutationSpec,
    check_permutations,
    leaf_paths,
)

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
    f64 = any(leaves[i].dtype == jnp.float64 for i in float_leaves)
    return _Plan(
        sizes=tuple(sizes[k] for k in names),
        entries=tuple(tuple(e) for e in entries),
        neighbours=tuple(tuple(sorted(s)) for s in neighbours),
        leaf_groups=tuple(sorted(leaf_groups)),
        float_leaves=float_leaves,
        dtype="float64" if f64 else "float32",
    )


def _entry_cost(a, b, axis, others, perms, dtype):
    """``mat_axis(a) @ mat_axis(b with its other axes permuted).T``: ``[n, n]``."""
    a = a.astype(dtype)
    b = b.astype(dtype)
    for ax, h in others:
        b = jnp.take(b, perms[h], axis=ax)
    contract = tuple(d for d in range(a.ndim) if d != axis)
    return lax.dot_general(a, b, ((contract, contract), ((), ())), precision=_HIGHEST)


def _static_cost(ref, other, plan: _Plan, g: int):
    n = plan.sizes[g]
    out = jnp.zeros((n, n), plan.dtype)
    for i, a, others in plan.static_entries(g):
        out = out + _entry_cost(ref[i], other[i], a, others, None, plan.dtype)
    return out


def _dynamic_cost(base, ref, other, perms, plan: _Plan, g: int):
    out = base
    for i, a, others in plan.dynamic_entries(g):
        out = out + _entry_cost(ref[i], other[i], a, others, perms, plan.dtype)
    return out


@functools.partial(jax.jit, static_argnames=("plan",))
def _static_costs_jit(ref, other, *, plan):
    return tuple(_static_cost(ref, other, plan, g) for g in range(len(plan.sizes)))


def _permute_leaf(x, groups, perms):
    for ax, h in enumerate(groups):
        if h >= 0:
            x = jnp.take(x, perms[h], axis=ax)
    return x


def _objective(ref, other, perms, plan: _Plan):
    groups = dict(plan.leaf_groups)
    total = jnp.zeros((), plan.dtype)
    for i in plan.float_leaves:
        b = other[i]
        if i in groups:
            b = _permute_leaf(b, groups[i], perms)
        total = total + jnp.sum(ref[i].astype(plan.dtype) * b.astype(plan.dtype))
    return total


_objective_jit = jax.jit(_objective, static_argnames=("plan",))


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
        return jnp.tile(jnp.arange(num_groups, dtype=jnp.int32), (max_iter, 1))
    if isinstance(key, jax.core.Tracer):
        return jnp.asarray(_orders_from_bits(_key_bits(key), max_iter, num_groups, jnp))
    bits = np.asarray(_key_bits(key)).astype(np.uint32)
    return jnp.asarray(_orders_from_bits(bits, max_iter, num_groups, np))


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
    """

    sweeps: int = 0
    solves: int = 0
    skipped: int = 0
    cost_s: float = 0.0
    lap_s: float = 0.0
    recomputes: int = 0
    updates: int = 0


@functools.partial(jax.jit, static_argnames=("axis", "other_axes", "dtype"))
def _entry_cost_jit(a, b, perms, *, axis, other_axes, dtype):
    others = tuple((ax, k) for k, ax in enumerate(other_axes))
    return _entry_cost(a, b, axis, others, perms, dtype)


@functools.partial(jax.jit, static_argnames=("axis", "other_axis", "dtype"))
def _entry_update_jit(m, a, b, rows, new_src, old_src, *, axis, other_axis, dtype):
    """``m`` plus a rank-``k`` change of one entry's contribution to a cost matrix.

    Rows ``rows`` of ``b``'s ``other_axis`` now come from ``new_src`` instead of
    ``old_src``; padded rows have ``new_src == old_src`` and add exactly zero.
    """
    a = jnp.take(a.astype(dtype), rows, axis=other_axis)
    b = b.astype(dtype)
    db = jnp.take(b, new_src, axis=other_axis) - jnp.take(b, old_src, axis=other_axis)
    contract = tuple(d for d in range(a.ndim) if d != axis)
    return m + lax.dot_general(a, db, ((contract, contract), ((), ())), precision=_HIGHEST)


_UPDATE_MIN_BUCKET = 32
_UPDATE_MAX_FRACTION = 0.25


def _update_bucket(k: int, n: int) -> int | None:
    """Padded size for a rank-``k`` update of an axis of ``n`` units, or ``None`` (recompute)."""
    if k > _UPDATE_MAX_FRACTION * n:
        return None
    bucket = _UPDATE_MIN_BUCKET
    while bucket < k:
        bucket *= 2
    return bucket if bucket < n else None


def _reduce(cost):
    """Row- then column-max-reduced ``cost``: the same LAP optimum, shorter scipy paths."""
    reduced = cost - jnp.max(cost, axis=1, keepdims=True)
    return reduced - jnp.max(reduced, axis=0, keepdims=True)


@jax.jit
def _combine_jit(base, parts):
    """The reduced cost matrix from its static part and cached contributions."""
    cost = base
    for p in parts:
        cost = cost + p
    return _reduce(cost)


@functools.partial(jax.jit, static_argnames=("structure", "dtype"))
def _group_cost_jit(base, a_leaves, b_leaves, perms, *, structure, dtype):
    """A group's reduced cost matrix in one program (small groups).

    ``structure[k] = (axis, ((other axis, slot in perms), ...))`` describes entry ``k``
    (leaves ``a_leaves[k]``, ``b_leaves[k]``); groups with the same structure and shapes
    (e.g. the inner groups of identical residual blocks) share the compiled program.
    """
    cost = base
    for (axis, others), a, b in zip(structure, a_leaves, b_leaves, strict=True):
        cost = cost + _entry_cost(a, b, axis, others, perms, dtype)
    return _reduce(cost)


_INCREMENTAL_MIN_SIZE = 256
"""Groups at least this large cache per-leaf contributions and update them by low rank."""


def _host_loop(plan, ref, other, perms0, orders, tol, stats: MatchStats):
    r"""Coordinate ascent with scipy's LAP on the host.

    The static part of every cost matrix is computed once. A group whose neighbours did
    not change since its last solve is skipped. Groups of at least
    :data:`_INCREMENTAL_MIN_SIZE` units cache each leaf's contribution, recompute it only
    when a permutation it reads changed (version counters), and then, if that
    permutation moved at most a quarter of its units, update it by the moved rows only
    (a rank-:math:`k` correction); smaller groups build their cost matrix in one program.
    The LAP is solved on the row- and column-reduced matrix
    (:math:`C_{ij} - \max_k C_{ik}`, then minus each column's max): subtracting a
    constant per row or column changes every assignment's value by the same amount, so
    the solution is the same, and scipy's shortest augmenting paths are shorter (about
    1.5x faster on the benchmark's matrices). For the same reason the progress test
    :math:`\sum_i C_{i\pi'(i)} > \sum_i C_{i\pi(i)}` is evaluated on the reduced matrix.
    """
    num_groups = len(plan.sizes)
    statics = _static_costs_jit(ref, other, plan=plan)
    perms = [np.asarray(p, np.int32) for p in perms0]
    perms_dev = [jnp.asarray(p) for p in perms]
    version = [0] * num_groups
    cache: dict = {}
    aranges = [np.arange(n) for n in plan.sizes]
    dirty = [True] * num_groups
    dyn = [plan.dynamic_entries(g) for g in range(num_groups)]
    whole = []
    for g in range(num_groups):
        slots = tuple(sorted({h for _, _, others in dyn[g] for _, h in others}))
        structure = tuple(
            (a, tuple((ax, slots.index(h)) for ax, h in others)) for _, a, others in dyn[g]
        )
        whole.append((slots, structure))
    converged = False
    for t in range(orders.shape[0]):
        stats.sweeps += 1
        progress = False
        for g in orders[t]:
            g = int(g)
            if not dirty[g]:
                stats.skipped += 1
                continue
            stats.solves += 1
            t0 = time.perf_counter()
            if plan.sizes[g] < _INCREMENTAL_MIN_SIZE:
                slots, structure = whole[g]
                reduced = _group_cost_jit(
                    statics[g],
                    tuple(ref[i] for i, _, _ in dyn[g]),
                    tuple(other[i] for i, _, _ in dyn[g]),
                    tuple(perms_dev[h] for h in slots),
                    structure=structure,
                    dtype=plan.dtype,
                )
            else:
                parts = [
                    _cached_contribution(
                        cache, g, k, entry, ref, other, perms, perms_dev, version, plan, stats
                    )
                    for k, entry in enumerate(dyn[g])
                ]
                reduced = _combine_jit(statics[g], tuple(parts))
            reduced = np.asarray(reduced)
            t1 = time.perf_counter()
            new_perm = _assignment.assign_scipy(reduced)
            t2 = time.perf_counter()
            stats.cost_s += t1 - t0
            stats.lap_s += t2 - t1
            ar = aranges[g]
            old = reduced[ar, perms[g]].sum(dtype=np.float64)
            new = reduced[ar, new_perm].sum(dtype=np.float64)
            progress = progress or bool(new > old + tol)
            dirty[g] = False
            if not np.array_equal(new_perm, perms[g]):
                perms[g] = new_perm
                perms_dev[g] = jnp.asarray(new_perm)
                version[g] += 1
                for h in plan.neighbours[g]:
                    dirty[h] = True
        if not progress:
            converged = True
            break
    return perms_dev, converged


def _cached_contribution(cache, g, k, entry, ref, other, perms, perms_dev, version, plan, stats):
    """Entry ``k`` of group ``g``'s cost matrix, from the cache, a low-rank update, or anew."""
    i, a, others = entry
    stamp = tuple(version[h] for _, h in others)
    hit = cache.get((g, k))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    if hit is not None and len(others) == 1:
        # One neighbour changed: correct by the rows it moved (exact up to rounding),
        # unless too many moved.
        (b_ax, h), old_perm = others[0], hit[2][0]
        moved = np.flatnonzero(perms[h] != old_perm)
        bucket = _update_bucket(moved.size, plan.sizes[h])
        if bucket is not None:
            pad = np.full(bucket - moved.size, moved[0] if moved.size else 0)
            rows = np.concatenate([moved, pad]).astype(np.int32)
            new_src = perms[h][rows]
            old_src = np.concatenate([old_perm[moved], perms[h][pad]]).astype(np.int32)
            part = _entry_update_jit(
                hit[1],
                ref[i],
                other[i],
                rows,
                new_src,
                old_src,
                axis=a,
                other_axis=b_ax,
                dtype=plan.dtype,
            )
            stats.updates += 1
            cache[(g, k)] = (stamp, part, (perms[h],))
            return part
    part = _entry_cost_jit(
        ref[i],
        other[i],
        tuple(perms_dev[h] for _, h in others),
        axis=a,
        other_axes=tuple(ax for ax, _ in others),
        dtype=plan.dtype,
    )
    stats.recomputes += 1
    cache[(g, k)] = (stamp, part, tuple(perms[h] for _, h in others))
    return part


def _padded_lap_input(cost, size: int, n: int):
    """``cost`` ``[n, n]`` as a ``[size, size]`` LAP whose optimum keeps the padding fixed.

    The matrix is row- then column-reduced (every entry in ``[-r, 0]``; the same
    optimum), padded with ``0`` on the padding diagonal and ``-(1 + n r)`` elsewhere:
    an assignment that uses a padding cell off the diagonal scores below every
    assignment of the real block, so the optimum is the real block's, plus identity.
    """
    reduced = _reduce(cost)
    if n == size:
        return reduced
    big = 1 + n * (-jnp.min(reduced))
    out = jnp.full((size, size), -big, cost.dtype)
    out = out.at[:n, :n].set(reduced)
    pad = jnp.arange(n, size)
    return out.at[pad, pad].set(0)


@functools.partial(jax.jit, static_argnames=("plan",))
def _compiled_loop(ref, other, perms0, orders, *, plan):
    """The whole coordinate ascent as one program (``solver="hungarian"``).

    Permutations are carried as one ``[G, N]`` array (``N`` the largest group, padded
    with the identity) so that a single LAP solver instance serves every group:
    ``lax.switch`` builds the visited group's padded cost matrix, then one
    :func:`optax.assignment.hungarian_algorithm` call solves it (compile time grows
    with the number of groups only through the cost branches).
    """
    num_groups = len(plan.sizes)
    size = max(plan.sizes)
    max_iter = orders.shape[0]
    statics = [_static_cost(ref, other, plan, g) for g in range(num_groups)]
    neighbours = np.zeros((num_groups, num_groups), bool)
    for g, hs in enumerate(plan.neighbours):
        neighbours[g, list(hs)] = True
    neighbours = jnp.asarray(neighbours)
    perms0 = jnp.stack(
        [jnp.concatenate([p, jnp.arange(p.shape[0], size, dtype=jnp.int32)]) for p in perms0]
    )

    def cost_branch(g):
        n = plan.sizes[g]

        def build(perms):
            views = {h: perms[h, : plan.sizes[h]] for h in range(num_groups)}
            cost = _dynamic_cost(statics[g], ref, other, views, plan, g)
            raw = jnp.zeros((size, size), cost.dtype).at[:n, :n].set(cost)
            return raw, _padded_lap_input(cost, size, n)

        return build

    branches = [cost_branch(g) for g in range(num_groups)]
    rows = jnp.arange(size)

    def solve(g, state):
        perms, dirty, progress, solves = state
        raw, lap = lax.switch(g, branches, perms)
        new_perm = _assignment.assign_hungarian(lap)
        old = raw[rows, perms[g]].sum()
        new = raw[rows, new_perm].sum()
        changed = jnp.any(new_perm != perms[g])
        dirty = dirty.at[g].set(False) | (neighbours[g] & changed)
        return perms.at[g].set(new_perm), dirty, progress | (new > old), solves + 1

    def visit_group(g, state):
        return lax.cond(state[1][g], functools.partial(solve, g), lambda s: s, state)

    def sweep(carry):
        t, perms, dirty, _, solves = carry
        perms, dirty, progress, solves = lax.fori_loop(
            0,
            num_groups,
            lambda k, state: visit_group(orders[t, k], state),
            (perms, dirty, jnp.array(False), solves),
        )
        return t + 1, perms, dirty, ~progress, solves

    def cond(carry):
        t, _, _, done, _ = carry
        return (t < max_iter) & ~done

    init = (jnp.array(0), perms0, jnp.ones((num_groups,), bool), jnp.array(False), jnp.array(0))
    sweeps, perms, _, converged, solves = lax.while_loop(cond, sweep, init)
    return tuple(perms[g, :n] for g, n in enumerate(plan.sizes)), converged, sweeps, solves


def _all_finite(x) -> bool:
    if isinstance(x, np.ndarray) or all(d.platform == "cpu" for d in x.devices()):
        return bool(np.isfinite(np.asarray(x)).all())
    with jax.ensure_compile_time_eval():
        return bool(jnp.isfinite(x).all())


def check_finite(tree, name: str) -> None:
    """Raises ``ValueError`` naming the first NaN/Inf leaf of ``tree`` (concrete leaves).

    Host-resident leaves are checked with NumPy (no compilation per leaf shape).
    """
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_float(x) and validation.is_concrete(x) and not _all_finite(x):
            raise ValueError(f"{name} has NaN or Inf values at {jax.tree_util.keystr(path)}.")


def _is_traced(*trees) -> bool:
    return any(isinstance(x, jax.core.Tracer) for t in trees for x in jax.tree.leaves(t))


def weight_matching(
    spec: PermutationSpec,
    ref: Params,
    other: Params,
    *,
    max_iter: int = 100,
    key: PRNGKey | None = None,
    init_permutations: Permutations | None = None,
    solver: str = "auto",
) -> AlignmentOutput:
    r"""Git Re-Basin weight matching: permute ``other``'s units to match ``ref``'s weights.

    Maximises :math:`\sum_\ell \langle W^{ref}_\ell, \pi(W^{other})_\ell\rangle_F` over one
    permutation per group of ``spec`` by coordinate ascent (Ainsworth et al., Algorithm
    1): each sweep visits the groups in a random order and solves, for the visited group,
    the linear assignment problem that is exact when all other permutations are held
    fixed. It stops after a sweep that does not increase the objective (``converged``)
    or after ``max_iter`` sweeps. Each step can only increase the objective, so the
    result is never worse than the starting permutations.

    A visit is skipped when no neighbouring permutation changed since the group's last
    solve (its cost matrix, hence its solution, would be the same): this changes no
    result, only the time.

    Args:
      spec: Which leaf axes share a permutation.
      ref: The model to match (its units stay in place).
      other: The model whose units are permuted; same structure, shapes and dtypes.
      max_iter: Maximum number of sweeps over the groups.
      key: PRNG key for the visiting order: sweep ``t`` visits the groups in the
        pseudo-random order ``sweep_orders(key, max_iter, len(spec))[t]`` (a hash of the
        key's bits and ``t``; the same with either solver and under :func:`jax.jit`).
        ``None`` visits them in the spec's order in every sweep (deterministic).
      init_permutations: Starting permutations ``{group: [n]}`` (e.g. from a previous
        call, to warm-start); default the identity.
      solver: Linear assignment solver: ``"scipy"`` (a host loop around
        :func:`scipy.optimize.linear_sum_assignment`; measured fastest on CPU),
        ``"hungarian"`` (:func:`optax.assignment.hungarian_algorithm`; the whole loop is
        one compiled program, which also works under :func:`jax.jit`), or ``"auto"``
        (``"hungarian"`` when traced, else ``"scipy"``). Both are exact and agree up to
        ties.

    Returns:
      An :class:`AlignmentOutput`: ``permutations`` (int32 ``[n]`` per group, to gather
      ``other``'s units: ``out.apply(other)`` is aligned with ``ref``), ``objective``
      (the sum above at the result, over every floating-point leaf), ``converged``.

    Raises:
      ValueError: if ``other`` differs from ``ref`` in structure, shape or dtype (the
        message names the path), a spec path is not a leaf, a group's axes differ in
        size, a model has NaN or Inf, ``init_permutations`` is malformed, or
        ``solver`` is unknown (or ``"scipy"`` under :func:`jax.jit`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fusionjax.alignment import PermutationSpec, weight_matching
      >>> spec = PermutationSpec({"h": [("0/kernel", 1), ("0/bias", 0), ("1/kernel", 0)]})
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> ref = {"0": {"kernel": jax.random.normal(k1, (3, 4)), "bias": jnp.zeros(4)},
      ...        "1": {"kernel": jax.random.normal(k2, (4, 2))}}
      >>> perm = jnp.array([2, 0, 3, 1])
      >>> other = {"0": {"kernel": ref["0"]["kernel"][:, perm], "bias": jnp.zeros(4)},
      ...          "1": {"kernel": ref["1"]["kernel"][perm]}}
      >>> out = weight_matching(spec, ref, other)
      >>> out.permutations["h"]   # other's unit perm[i] is ref's unit i
      Array([1, 3, 0, 2], dtype=int32)
      >>> bool(jnp.allclose(out.apply(other)["0"]["kernel"], ref["0"]["kernel"]))
      True

    References:
      Ainsworth, Hayase & Srinivasa, `Git Re-Basin: Merging Models modulo Permutation
      Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023
    """
    out, _ = _weight_matching(
        spec,
        ref,
        other,
        max_iter=max_iter,
        key=key,
        init_permutations=init_permutations,
        solver=solver,
    )
    return out


def _weight_matching(
    spec, ref, other, *, max_iter, key, init_permutations, solver
) -> tuple[AlignmentOutput, MatchStats]:
    """:func:`weight_matching`, also returning the work done (:class:`MatchStats`)."""
    _assignment.check_solver(solver)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 0:
        raise ValueError(f"max_iter must be a non-negative integer, got {max_iter!r}.")
    if not isinstance(spec, PermutationSpec):
        raise TypeError(f"spec must be a PermutationSpec, got {type(spec).__name__}.")
    validation.check_same_structure(ref, other, name="other", ref_name="ref")
    plan = make_plan(spec, ref)
    check_finite(ref, "ref")
    check_finite(other, "other")
    if init_permutations is not None:
        check_permutations(spec, ref, init_permutations)
        perms0 = tuple(jnp.asarray(init_permutations[k]).astype(jnp.int32) for k in spec.names)
    else:
        perms0 = tuple(jnp.arange(n, dtype=jnp.int32) for n in plan.sizes)
    traced = _is_traced(ref, other, perms0, key)
    solver = _assignment.resolve_solver(solver, plan.sizes, traced)
    ref_leaves = tuple(jax.tree.leaves(ref))
    other_leaves = tuple(jax.tree.leaves(other))
    num_groups = len(plan.sizes)
    stats = MatchStats()
    orders = sweep_orders(key, int(max_iter), num_groups)
    if max_iter == 0 or num_groups == 0:
        perms, converged = perms0, jnp.asarray(num_groups == 0)
    elif solver == "scipy":
        perms, converged = _host_loop(
            plan, ref_leaves, other_leaves, perms0, np.asarray(orders), 1e-12, stats
        )
        converged = jnp.asarray(converged)
    else:
        perms, converged, sweeps, solves = _compiled_loop(
            ref_leaves, other_leaves, perms0, orders, plan=plan
        )
        if not traced:
            stats.sweeps, stats.solves = int(sweeps), int(solves)
            stats.skipped = stats.sweeps * num_groups - stats.solves
    perms = tuple(perms)
    objective = (_objective if traced else _objective_jit)(
        ref_leaves, other_leaves, perms, plan=plan
    )
    out = AlignmentOutput(
        permutations=dict(zip(spec.names, perms, strict=True)),
        objective=objective,
        converged=converged,
        spec=spec,
    )
    return out, stats
