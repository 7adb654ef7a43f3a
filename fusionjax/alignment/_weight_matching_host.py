r"""Weight matching's host solver: coordinate ascent with scipy's LAP, cached cost matrices.

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
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fusionjax.alignment import _assignment
from fusionjax.alignment._weight_matching_problem import SELF_RTOL
from fusionjax.alignment._weight_matching_problem import MatchStats
from fusionjax.alignment._weight_matching_problem import entry_cost
from fusionjax.alignment._weight_matching_problem import group_gain
from fusionjax.alignment._weight_matching_problem import reduce_cost
from fusionjax.alignment._weight_matching_problem import static_costs_jit

_HIGHEST = lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("axis", "other_axes", "dtype"))
def _entry_cost_jit(a, b, perms, *, axis, other_axes, dtype):
    others = tuple((ax, k) for k, ax in enumerate(other_axes))
    return entry_cost(a, b, axis, others, perms, dtype)


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


@jax.jit
def _combine_jit(base, parts):
    """The reduced cost matrix from its static part and cached contributions."""
    cost = base
    for p in parts:
        cost = cost + p
    return reduce_cost(cost)


@functools.partial(jax.jit, static_argnames=("structure", "dtype"))
def _group_cost_jit(base, a_leaves, b_leaves, perms, *, structure, dtype):
    """A group's reduced cost matrix in one program (small groups).

    ``structure[k] = (axis, ((other axis, slot in perms), ...))`` describes entry ``k``
    (leaves ``a_leaves[k]``, ``b_leaves[k]``); groups with the same structure and shapes
    (e.g. the inner groups of identical residual blocks) share the compiled program.
    """
    cost = base
    for (axis, others), a, b in zip(structure, a_leaves, b_leaves, strict=True):
        cost = cost + entry_cost(a, b, axis, others, perms, dtype)
    return reduce_cost(cost)


_INCREMENTAL_MIN_SIZE = 256
"""Groups at least this large cache per-leaf contributions and update them by low rank."""


@functools.partial(jax.jit, static_argnames=("plan", "g"))
def _group_gain_jit(ref, other, perms, new_perm, *, plan, g):
    return group_gain(ref, other, perms, plan, g, new_perm)


def host_loop(plan, ref, other, perms0, orders, tol, stats: MatchStats):
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

    A self-coupled group's LAP solves a linearisation, so its solution is only a
    proposal: it is taken if :func:`group_gain` says the true objective increases
    (beyond rounding), else the group keeps its permutation and makes no progress.
    """
    num_groups = len(plan.sizes)
    statics = static_costs_jit(ref, other, plan=plan)
    perms = [np.asarray(p, np.int32) for p in perms0]
    perms_dev = [jax.device_put(p) for p in perms]  # int32 NumPy: no copy program per size
    version = [0] * num_groups
    cache: dict = {}
    aranges = [np.arange(n) for n in plan.sizes]
    dirty = [True] * num_groups
    dyn = [plan.dynamic_entries(g) for g in range(num_groups)]
    coupled = [plan.self_coupled(g) for g in range(num_groups)]
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
            dirty[g] = False
            if coupled[g]:
                if np.array_equal(new_perm, perms[g]):
                    continue
                gain, scale = _group_gain_jit(
                    ref, other, tuple(perms_dev), jax.device_put(new_perm), plan=plan, g=g
                )
                if not float(gain) > SELF_RTOL[plan.dtype] * float(scale):
                    stats.rejected += 1
                    continue
                progress = True
            else:
                ar = aranges[g]
                old = reduced[ar, perms[g]].sum(dtype=np.float64)
                new = reduced[ar, new_perm].sum(dtype=np.float64)
                progress = progress or bool(new > old + tol)
            if not np.array_equal(new_perm, perms[g]):
                perms[g] = new_perm
                perms_dev[g] = jax.device_put(new_perm)
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
