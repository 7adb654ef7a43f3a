r"""Activation matching (Git Re-Basin, Section 3.1): align units by their activations.

Two networks that compute similar features should have units whose activations are
correlated over the data. For every group :math:`g` with activations
:math:`Z^{ref}_g, Z^{other}_g \in \mathbb{R}^{M\times n}` (the same :math:`M` inputs fed
to both models), activation matching solves one linear assignment problem on the
Pearson correlation matrix

.. math::

  \rho_{ij} = \frac{\mathrm{cov}(Z^{ref}_{:,i}, Z^{other}_{:,j})}
                   {\sigma(Z^{ref}_{:,i})\,\sigma(Z^{other}_{:,j})},\qquad
  \pi_g = \arg\max_{\pi} \sum_i \rho_{i,\pi(i)} .

Groups are independent, so there is no coordinate ascent: the result is exact per
group. The statistics stream over batches (:class:`ActivationStats`): per group the
running means, centred second moments and the centred cross-moment
:math:`\sum_m (z^{ref}_m-\bar z^{ref})(z^{other}_m-\bar z^{other})^\top`, merged batch
by batch with Chan et al.'s pairwise update (no catastrophic cancellation, unlike raw
sums of products). A dead unit (zero variance) gets correlation 0 with every unit, as in
the paper's code.

References:
  Ainsworth, Hayase & Srinivasa, `Git Re-Basin: Merging Models modulo Permutation
  Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023 (Section 3.1);
  Chan, Golub & LeVeque, `Updating formulae and a pairwise algorithm for computing sample
  variances <https://doi.org/10.1007/978-3-642-51461-6_3>`_, COMPSTAT 1982.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fusionjax.alignment import _assignment
from fusionjax.alignment._spec import AlignmentOutput
from fusionjax.alignment._spec import PermutationSpec
from fusionjax.alignment._spec import check_spec

Activations = Mapping[str, jax.Array]
"""``{group: [M, n]}`` activations of one model (leading axes are flattened into ``M``)."""


class ActivationStats(NamedTuple):
    """Streaming statistics of two models' activations, per group (a jittable pytree).

    Build with :func:`activation_stats_init`, feed batches with
    :func:`activation_stats_update`, read with :meth:`correlation`.

    Attributes:
      count: ``{group: []}`` rows seen.
      mean_ref: ``{group: [n]}`` running mean of ``ref``'s activations.
      mean_other: ``{group: [n]}`` running mean of ``other``'s activations.
      m2_ref: ``{group: [n]}`` centred sum of squares of ``ref``'s activations.
      m2_other: ``{group: [n]}`` centred sum of squares of ``other``'s activations.
      comoment: ``{group: [n, n]}`` centred cross-moment, rows ``ref``, columns ``other``.
    """

    count: dict
    mean_ref: dict
    mean_other: dict
    m2_ref: dict
    m2_other: dict
    comoment: dict

    def correlation(self) -> dict:
        r"""``{group: [n, n]}`` Pearson correlations :math:`\rho_{ij}` (0 for dead units)."""
        out = {}
        for g, c in self.comoment.items():
            denom = jnp.sqrt(self.m2_ref[g][:, None] * self.m2_other[g][None, :])
            safe = jnp.where(denom > 0, denom, 1)
            out[g] = jnp.where(denom > 0, c / safe, 0)
        return out


def activation_stats_init(sizes: Mapping[str, int], dtype=jnp.float32) -> ActivationStats:
    """Empty statistics for groups of the given sizes.

    Args:
      sizes: ``{group: n}``, e.g. ``spec.sizes(params)``.
      dtype: Accumulation dtype (float32; float64 with x64 enabled).

    Returns:
      An :class:`ActivationStats` with zero counts.

    Examples:
      >>> import jax.numpy as jnp
      >>> stats = activation_stats_init({"h": 3})
      >>> stats = activation_stats_update(stats, {"h": jnp.eye(3)}, {"h": jnp.eye(3)[::-1]})
      >>> stats.correlation()["h"][0].round(2)
      Array([-0.5, -0.5,  1. ], dtype=float32)
    """
    z = {g: jnp.zeros((int(n),), dtype) for g, n in sizes.items()}
    return ActivationStats(
        count={g: jnp.zeros((), dtype) for g in sizes},
        mean_ref=dict(z),
        mean_other=dict(z),
        m2_ref=dict(z),
        m2_other=dict(z),
        comoment={g: jnp.zeros((int(n), int(n)), dtype) for g, n in sizes.items()},
    )


def _rows(x: jax.Array, n: int, dtype) -> jax.Array:
    return jnp.reshape(jnp.asarray(x), (-1, n)).astype(dtype)


def activation_stats_update(
    stats: ActivationStats, acts_ref: Activations, acts_other: Activations
) -> ActivationStats:
    r"""Adds a batch of activations of both models to ``stats`` (jittable).

    Uses the pairwise update: with :math:`n_1` rows seen and a batch of :math:`n_2` rows
    of mean :math:`\bar b` and centred cross-moment :math:`C_2`,
    :math:`C \leftarrow C_1 + C_2 + \frac{n_1 n_2}{n_1+n_2}\,\delta_{ref}\delta_{other}^\top`
    where :math:`\delta = \bar b - \bar a`; the result equals one pass over all rows
    up to rounding.

    Args:
      stats: Statistics so far.
      acts_ref: ``{group: [M, n]}`` activations of ``ref`` on a batch (extra leading
        axes, e.g. spatial positions of a conv layer, are flattened into ``M``).
      acts_other: The same for ``other``, on the same inputs.

    Returns:
      The updated :class:`ActivationStats`.

    Raises:
      ValueError: if the groups or shapes do not match ``stats``.
    """
    _check_acts(stats.mean_ref, acts_ref, acts_other)
    new = {f: {} for f in ActivationStats._fields}
    for g, mean_a in stats.mean_ref.items():
        n = mean_a.shape[0]
        dtype = mean_a.dtype
        a = _rows(acts_ref[g], n, dtype)
        b = _rows(acts_other[g], n, dtype)
        m = jnp.asarray(a.shape[0], dtype)
        ma, mb = jnp.mean(a, axis=0), jnp.mean(b, axis=0)
        ca, cb = a - ma[None], b - mb[None]
        c2 = lax.dot_general(ca, cb, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)
        n1 = stats.count[g]
        tot = n1 + m
        w = m / jnp.maximum(tot, 1)
        da, db = ma - mean_a, mb - stats.mean_other[g]
        new["count"][g] = tot
        new["mean_ref"][g] = mean_a + w * da
        new["mean_other"][g] = stats.mean_other[g] + w * db
        cross = n1 * w  # n1 * n2 / (n1 + n2)
        new["m2_ref"][g] = stats.m2_ref[g] + jnp.sum(ca * ca, axis=0) + cross * da * da
        new["m2_other"][g] = stats.m2_other[g] + jnp.sum(cb * cb, axis=0) + cross * db * db
        new["comoment"][g] = stats.comoment[g] + c2 + cross * da[:, None] * db[None, :]
    return ActivationStats(**new)


def _check_acts(sizes: Mapping, acts_ref: Activations, acts_other: Activations) -> None:
    """``sizes``: ``{group: n}`` or ``{group: [n] array}``."""
    for name, acts in (("acts_ref", acts_ref), ("acts_other", acts_other)):
        missing = [g for g in sizes if g not in acts]
        extra = [g for g in acts if g not in sizes]
        if missing:
            raise ValueError(f"{name} has no activations for group {missing[0]!r}.")
        if extra:
            raise ValueError(f"{name} has activations for {extra[0]!r}, which is not a group.")
    for g, like in sizes.items():
        n = like if isinstance(like, (int, np.integer)) else like.shape[0]
        sa, sb = np.shape(acts_ref[g]), np.shape(acts_other[g])
        if sa != sb:
            raise ValueError(f"activations of group {g!r} differ in shape: ref {sa} != other {sb}.")
        if not sa or sa[-1] != n:
            raise ValueError(
                f"activations of group {g!r} must be [..., {n}] (one column per unit), got {sa}."
            )


def activation_matching(
    spec: PermutationSpec,
    stats: ActivationStats | tuple[Activations, Activations],
    *,
    solver: str = "auto",
) -> AlignmentOutput:
    r"""Git Re-Basin activation matching: permute ``other``'s units by activation correlation.

    Per group, solves :math:`\max_\pi \sum_i \rho_{i,\pi(i)}` on the Pearson correlation
    matrix between ``ref``'s and ``other``'s activations (exactly; groups are
    independent). The activations come from
    :func:`fusionjax.alignment.group_activations` or any ``{group: [M, n]}`` dict, e.g.
    post-ReLU hidden units of an MLP.

    Args:
      spec: The permutation spec (at least one group); every group needs activations.
      stats: :class:`ActivationStats` accumulated over batches, or a pair
        ``(acts_ref, acts_other)`` of ``{group: [M, n]}`` dicts on the same inputs (one
        batch).
      solver: ``"scipy"``, ``"hungarian"`` (jittable) or ``"auto"`` (``"hungarian"``
        when traced, else ``"scipy"``).

    Returns:
      An :class:`AlignmentOutput` whose ``objective`` is the summed correlation of the
      matched pairs over all groups (at most the total number of units), and
      ``converged`` is ``True`` (one exact step).

    Raises:
      ValueError: if the spec has no groups, a group has no activations, shapes differ,
        or a statistic is NaN.

    Examples:
      >>> import numpy as np
      >>> from fusionjax.alignment import PermutationSpec
      >>> spec = PermutationSpec({"h": [("0/kernel", 1), ("1/kernel", 0)]})
      >>> z = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
      >>> out = activation_matching(spec, ({"h": z}, {"h": z[:, [3, 1, 0, 2]]}))
      >>> out.permutations["h"]
      Array([2, 1, 3, 0], dtype=int32)

    References:
      Ainsworth, Hayase & Srinivasa, `Git Re-Basin: Merging Models modulo Permutation
      Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023
    """
    check_spec(spec)
    if not isinstance(stats, ActivationStats):
        if not (isinstance(stats, (tuple, list)) and len(stats) == 2):
            raise TypeError(
                "stats must be ActivationStats or a pair (acts_ref, acts_other) of "
                f"{{group: [M, n]}} dicts, got {type(stats).__name__}."
            )
        acts_ref, acts_other = stats
        missing = [g for g in spec.names if g not in acts_ref]
        if missing:
            raise ValueError(f"acts_ref has no activations for group {missing[0]!r}.")
        sizes = {g: np.shape(acts_ref[g])[-1] for g in spec.names}
        dtype = jnp.float32
        for g in spec.names:
            if jnp.asarray(acts_ref[g]).dtype == jnp.float64:
                dtype = jnp.float64
        _check_acts(sizes, acts_ref, acts_other)
        stats = _update_jit(activation_stats_init(sizes, dtype), acts_ref, acts_other)
    missing = [g for g in spec.names if g not in stats.comoment]
    if missing:
        raise ValueError(f"stats has no activations for group {missing[0]!r}.")
    extra = [g for g in stats.comoment if g not in spec.groups]
    if extra:
        raise ValueError(f"stats has activations for {extra[0]!r}, which is not a group of spec.")
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(stats))
    sizes = [stats.comoment[g].shape[0] for g in spec.names]
    solver = _assignment.resolve_solver(solver, sizes, traced)
    if solver == "hungarian":
        perms, total = _match_hungarian(stats, spec.names)
    else:
        corr = jax.device_get(_correlation_jit(stats))
        perms, total = {}, 0.0
        for g in spec.names:
            c = np.asarray(corr[g])
            if not np.isfinite(c).all():
                raise ValueError(f"the correlation of group {g!r} has NaN or Inf values.")
            perm = _assignment.assign_scipy(c)
            perms[g] = jnp.asarray(perm)
            total += float(c[np.arange(c.shape[0]), perm].sum(dtype=np.float64))
        total = jnp.asarray(total, jnp.float32)
    return AlignmentOutput(
        permutations=perms, objective=total, converged=jnp.asarray(True), spec=spec
    )


_update_jit = jax.jit(activation_stats_update)
_correlation_jit = jax.jit(ActivationStats.correlation)


@functools.partial(jax.jit, static_argnums=1)
def _match_hungarian(stats, names):
    corr = stats.correlation()
    perms, total = {}, jnp.zeros((), corr[names[0]].dtype) if names else jnp.zeros(())
    for g in names:
        perm = _assignment.assign_hungarian(corr[g])
        perms[g] = perm
        total = total + jnp.sum(corr[g][jnp.arange(perm.shape[0]), perm])
    return perms, total
