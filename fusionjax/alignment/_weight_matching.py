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

If a group is on two axes of one leaf (a recurrent :math:`h \to h` kernel), its
coordinate step is a *quadratic* assignment problem, and the LAP above solves only its
linearisation at the current :math:`\pi_g`, whose optimum can lower the objective
(taking it unchecked, the GRU pair of the tests went 33.01 -> 31.46 -> ... -> 34.12 ->
33.73 and never converged; a user's GRU: 46.04 after 5 sweeps, 45.95 after 100). For
such *self-coupled* groups the LAP's solution is a proposal, taken only if the exact
change of the objective is positive beyond rounding; so the objective never decreases
and the method stops when no proposal improves it (``converged``). That is a fixed
point of the method, not necessarily an optimum of the quadratic coordinate problem
(the test pair stops at 33.01, below the 34.12 the unchecked steps passed through; on
two random ``nn.RNN(nn.GRUCell(16))`` models the first proposal already lowers the
objective, so the starting permutations come back, with ``converged=True``). For such
models, start from a better point (``init_permutations``, e.g. from activation
matching) or use a quadratic assignment solver; neither is done here.

Modules: :mod:`~fusionjax.alignment._weight_matching_problem` (static plan, cost
matrices, objective, sweep order), :mod:`~fusionjax.alignment._weight_matching_host`
(``solver="scipy"``: the host loop and what makes it fast),
:mod:`~fusionjax.alignment._weight_matching_compiled` (``solver="hungarian"``: one
program, jittable).

References:
  Ainsworth, Hayase & Srinivasa, `Git Re-Basin: Merging Models modulo Permutation
  Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023 (Algorithm 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import pytrees as _pytree
from fusionjax._src import validation
from fusionjax._src.base import Params
from fusionjax._src.base import PRNGKey
from fusionjax.alignment import _assignment
from fusionjax.alignment._spec import AlignmentOutput
from fusionjax.alignment._spec import Permutations
from fusionjax.alignment._spec import PermutationSpec
from fusionjax.alignment._spec import check_permutations
from fusionjax.alignment._spec import check_spec
from fusionjax.alignment._weight_matching_compiled import compiled_loop
from fusionjax.alignment._weight_matching_host import host_loop
from fusionjax.alignment._weight_matching_problem import MatchStats
from fusionjax.alignment._weight_matching_problem import check_finite
from fusionjax.alignment._weight_matching_problem import make_plan
from fusionjax.alignment._weight_matching_problem import objective
from fusionjax.alignment._weight_matching_problem import objective_jit
from fusionjax.alignment._weight_matching_problem import sweep_orders

__all__ = ["MatchStats", "make_plan", "sweep_orders", "weight_matching"]


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
    result is never worse than the starting permutations. A group on two axes of one
    leaf (a recurrent kernel) makes its step a quadratic problem: the LAP's solution is
    then taken only if it increases the objective (see the module docstring).

    A visit is skipped when no neighbouring permutation changed since the group's last
    solve (its cost matrix, hence its solution, would be the same): this changes no
    result, only the time.

    Args:
      spec: Which leaf axes share a permutation (at least one group).
      ref: The model to match (its units stay in place): any pytree, e.g. a linen
        variables dict, an ``nnx.State`` or an equinox module (leaves that are not
        arrays, such as an ``eqx.nn.MLP``'s activation, are held static).
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
      ValueError: if ``spec`` has no groups, ``other`` differs from ``ref`` in
        structure, shape or dtype (the message names the path), a spec path is not a
        leaf, a group's axes differ in size, a model has NaN or Inf,
        ``init_permutations`` is malformed, or ``solver`` is unknown (or ``"scipy"``
        under :func:`jax.jit`).
      TypeError: if ``spec`` is not a :class:`PermutationSpec`.

    Examples:
      >>> import numpy as np
      >>> from fusionjax.alignment import PermutationSpec, weight_matching
      >>> spec = PermutationSpec({"h": [("0/kernel", 1), ("0/bias", 0), ("1/kernel", 0)]})
      >>> rng = np.random.default_rng(0)
      >>> normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
      >>> zeros = np.zeros(4, np.float32)
      >>> ref = {"0": {"kernel": normal(3, 4), "bias": zeros}, "1": {"kernel": normal(4, 2)}}
      >>> perm = np.array([2, 0, 3, 1])
      >>> other = {"0": {"kernel": ref["0"]["kernel"][:, perm], "bias": zeros},
      ...          "1": {"kernel": ref["1"]["kernel"][perm]}}
      >>> out = weight_matching(spec, ref, other)
      >>> out.permutations["h"]   # other's unit perm[i] is ref's unit i
      Array([1, 3, 0, 2], dtype=int32)
      >>> bool(np.allclose(out.apply(other)["0"]["kernel"], ref["0"]["kernel"]))
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
    check_spec(spec)
    validation.check_same_structure(ref, other, name="other", ref_name="ref")
    ref, _ = _pytree.partition(ref)
    other, _ = _pytree.partition(other)
    plan = make_plan(spec, ref)
    check_finite(ref, "ref")
    check_finite(other, "other")
    if init_permutations is not None:
        check_permutations(spec, ref, init_permutations)
        perms0 = tuple(jnp.asarray(init_permutations[k]).astype(jnp.int32) for k in spec.names)
    else:
        # From the host: jnp.arange would compile an iota program per group size.
        perms0 = tuple(jax.device_put(np.arange(n, dtype=np.int32)) for n in plan.sizes)
    traced = _is_traced(ref, other, perms0, key)
    solver = _assignment.resolve_solver(solver, plan.sizes, traced)
    ref_leaves = tuple(jax.tree.leaves(ref))
    other_leaves = tuple(jax.tree.leaves(other))
    num_groups = len(plan.sizes)
    stats = MatchStats()
    orders = sweep_orders(key, int(max_iter), num_groups)
    if max_iter == 0:
        perms, converged = perms0, jax.device_put(np.asarray(False))
    elif solver == "scipy":
        perms, converged = host_loop(
            plan, ref_leaves, other_leaves, perms0, np.asarray(orders), 1e-12, stats
        )
        converged = jax.device_put(np.asarray(converged))
    else:
        perms, converged, sweeps, solves = compiled_loop(
            ref_leaves, other_leaves, perms0, orders, plan=plan
        )
        if not traced:
            stats.sweeps, stats.solves = int(sweeps), int(solves)
            stats.skipped = stats.sweeps * num_groups - stats.solves
    perms = tuple(perms)
    value = (objective if traced else objective_jit)(ref_leaves, other_leaves, perms, plan=plan)
    out = AlignmentOutput(
        permutations=dict(zip(spec.names, perms, strict=True)),
        objective=value,
        converged=converged,
        spec=spec,
    )
    return out, stats
