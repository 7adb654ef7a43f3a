r"""Weight matching's compiled solver: the whole coordinate ascent as one XLA program.

``solver="hungarian"`` compiles the whole loop (``lax.while_loop`` over sweeps,
``lax.switch`` over groups, one padded :func:`optax.assignment.hungarian_algorithm`), with
no host round trip; it is what runs under :func:`jax.jit`. On CPU it was slower (see
:mod:`fusionjax.alignment._assignment`).

Self-coupled groups (see :mod:`fusionjax.alignment._weight_matching_problem`) take a
step only when :func:`~fusionjax.alignment._weight_matching_problem.group_gain` says it
increases the true objective, as in the host loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fusionjax.alignment import _assignment
from fusionjax.alignment._weight_matching_problem import SELF_RTOL
from fusionjax.alignment._weight_matching_problem import _Plan
from fusionjax.alignment._weight_matching_problem import dynamic_cost
from fusionjax.alignment._weight_matching_problem import group_gain
from fusionjax.alignment._weight_matching_problem import reduce_cost
from fusionjax.alignment._weight_matching_problem import static_cost


def _padded_lap_input(cost, size: int, n: int):
    """``cost`` ``[n, n]`` as a ``[size, size]`` LAP whose optimum keeps the padding fixed.

    The matrix is row- then column-reduced (every entry in ``[-r, 0]``; the same
    optimum), padded with ``0`` on the padding diagonal and ``-(1 + n r)`` elsewhere:
    an assignment that uses a padding cell off the diagonal scores below every
    assignment of the real block, so the optimum is the real block's, plus identity.
    """
    reduced = reduce_cost(cost)
    if n == size:
        return reduced
    big = 1 + n * (-jnp.min(reduced))
    out = jnp.full((size, size), -big, cost.dtype)
    out = out.at[:n, :n].set(reduced)
    pad = jnp.arange(n, size)
    return out.at[pad, pad].set(0)


@functools.partial(jax.jit, static_argnames=("plan",))
def compiled_loop(ref, other, perms0, orders, *, plan: _Plan):
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
    statics = [static_cost(ref, other, plan, g) for g in range(num_groups)]
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
            cost = dynamic_cost(statics[g], ref, other, views, plan, g)
            raw = jnp.zeros((size, size), cost.dtype).at[:n, :n].set(cost)
            return raw, _padded_lap_input(cost, size, n)

        return build

    branches = [cost_branch(g) for g in range(num_groups)]
    rows = jnp.arange(size)

    def accept_branch(g):
        """``(take the step, it is progress)`` for group ``g``'s proposal ``new_perm``."""
        if not plan.self_coupled(g):

            def linear(raw, perms, new_perm):
                new = raw[rows, new_perm].sum()
                return jnp.array(True), new > raw[rows, perms[g]].sum()

            return linear

        def exact(raw, perms, new_perm):
            views = tuple(perms[h, : plan.sizes[h]] for h in range(num_groups))
            gain, scale = group_gain(ref, other, views, plan, g, new_perm[: plan.sizes[g]])
            take = gain > SELF_RTOL[plan.dtype] * scale
            return take, take

        return exact

    accepts = [accept_branch(g) for g in range(num_groups)]

    def solve(g, state):
        perms, dirty, progress, solves = state
        raw, lap = lax.switch(g, branches, perms)
        new_perm = _assignment.assign_hungarian(lap)
        take, better = lax.switch(g, accepts, raw, perms, new_perm)
        new_perm = jnp.where(take, new_perm, perms[g])
        changed = jnp.any(new_perm != perms[g])
        dirty = dirty.at[g].set(False) | (neighbours[g] & changed)
        return perms.at[g].set(new_perm), dirty, progress | better, solves + 1

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
