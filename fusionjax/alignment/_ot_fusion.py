r"""Optimal-transport fusion (OTFusion) of two models, of equal or different widths.

OT fusion aligns the units of ``other`` to those of ``ref`` one group at a time, in
the order the :class:`~fusionjax.alignment.PermutationSpec` lists its groups (forward
order), and then interpolates the two. For group :math:`g` with :math:`m` units in
``other`` and :math:`n` in ``ref`` it

1. builds a ground cost :math:`C\in\mathbb{R}^{m\times n}` between the units: the
   Euclidean distance between their weight rows (every leaf where :math:`g` appears
   and whose other permuted axes belong to groups already aligned, with those axes of
   ``other`` already mapped, concatenated, so a bias is one more coordinate of its
   unit), or between their activations on data. If no leaf qualifies (attention heads:
   every head leaf also carries the per-head dimension, a later group), the leaves'
   axes of pending groups are summarised by their root mean square, which no
   permutation of them changes;
2. solves the transport problem with uniform marginals :math:`\mu=\mathbf 1/m`,
   :math:`\nu=\mathbf 1/n` for a coupling :math:`T\in\mathbb{R}_+^{m\times n}`:
   exactly (a linear assignment; for different widths one of replicas) or with
   entropic regularisation (Sinkhorn, a soft map);
3. moves ``other``'s axes of :math:`g` onto ``ref``'s units with the *marginal
   correction*: with :math:`\alpha = T\mathbf 1` and :math:`\beta = T^\top\mathbf 1`
   the coupling's marginals, an axis where a leaf **writes** the unit (its output axis,
   a bias, a norm scale) takes the barycentric map :math:`T\,\mathrm{diag}(1/\beta)`,
   so ref unit :math:`j` gets the :math:`T`-weighted *mean* of the other units sent
   to it; an axis where a leaf **reads** the unit (the input axis of the next layer)
   takes :math:`\mathrm{diag}(1/\alpha)\,T`, so the outgoing weights of an other unit
   split over several ref units are divided among them and those of several other
   units merged into one are *summed*.

The fused model is :math:`\theta = (1-w)\,\theta_{ref} + w\,\tilde\theta_{other}`
with ``ref``'s shapes (the OTFusion paper's ``ensemble_step`` is :math:`1-w`).

For equal widths and uniform marginals both maps are :math:`n\,T`, and an exact
solution is a permutation matrix: exact OT fusion is then a permutation alignment (one
forward pass of weight matching where each layer's cost uses the layers before it,
tested), and ``other``'s function is preserved exactly. For different widths the two
maps differ by the factor :math:`m/n`: the split/merge rule above preserves the
function of a network whose units are copies of the other's (tested both ways). The
paper's code applies :math:`T\,\mathrm{diag}(1/\beta)` on both kinds of axis (averaging
incoming connections), which is the same for equal widths. When the cost compares read
rows (outgoing weights) of ``other`` with those of ``ref``, ``other``'s are scaled by
:math:`m/n` for the same reason. Which axes a leaf reads or writes is decided by
layout (``roles``, see :func:`axis_roles` and :mod:`~fusionjax.alignment._ot_maps`).

**Residual streams and attention** (Transformer fusion). A residual stream is one
group of the spec, so one map is shared by every leaf that reads or writes the stream
(embeddings, norms, attention output and MLP output projections, the next blocks'
inputs): the function-preserving form of Transformer fusion's propagation of the
stream's transport map through the skip connections (the paper also averages it with
the sublayer's own map, which is not a single map). Its weight cost uses the leaves
available when the group comes up: with the stream first in the spec, the embedding,
the norm parameters and the output biases; an activation cost uses the stream itself.
Queries and keys share one group per head dimension, so their weights are
concatenated in the cost (the paper's joint Q/K fusion), and values share theirs with
the output projection's input axis; a heads group (as in
:func:`~fusionjax.alignment.transformer_spec`) is matched first, by the root-mean-square
summary above. Exact maps preserve the transformer's function (tested); soft maps mix
heads and head dimensions, as the paper's do. With unequal residual widths, LayerNorm
statistics over the stream are not preserved by any transport map: such fusion is
approximate.

**Defaults.** Exact solver, weight cost, Euclidean ground metric (the paper's code
defaults: ``--exact --ground-metric euclidean --not-squared``). For Sinkhorn,
``epsilon=0.01`` (relative to the mean cost): on two-hidden-layer MLPs on sklearn's
digits (3 seeds, 128 and 256 units) fused accuracy fell steadily as epsilon grew from
0.01 to 0.2 (about 0.95 to 0.89 with weight costs), and 0.01 came within 0.01 of the
exact solver.

References:
  Singh & Jaggi, `Model Fusion via Optimal Transport <https://arxiv.org/abs/1910.05653>`_,
  NeurIPS 2020;
  Imfeld, Graldi, Giordano, Hofmann, Anagnostidis & Singh, `Transformer Fusion with
  Optimal Transport <https://arxiv.org/abs/2310.05719>`_, ICLR 2024;
  Cuturi, `Sinkhorn Distances <https://arxiv.org/abs/1306.0895>`_, NeurIPS 2013

Modules: :mod:`~fusionjax.alignment._ot_transport` (ground costs, solvers),
:mod:`~fusionjax.alignment._ot_maps` (roles, maps, :func:`apply_transports`), this one
(the group-by-group loop and :func:`ot_fusion`).

**Dtypes** (the library's policy). Everything is computed in at least float32: bf16
and f16 leaves are upcast, float64 leaves stay float64 when ``jax_enable_x64`` is on.
``fused`` and ``aligned`` have the input leaves' dtypes; the couplings have the ground
cost's dtype (float32, or float64 for float64 models).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import pytrees as _pytree
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax.alignment._ot_maps import Roles
from fusionjax.alignment._ot_maps import Transports
from fusionjax.alignment._ot_maps import _names
from fusionjax.alignment._ot_maps import _resolve_roles
from fusionjax.alignment._ot_maps import apply_transports
from fusionjax.alignment._ot_maps import group_apply
from fusionjax.alignment._ot_transport import Activations
from fusionjax.alignment._ot_transport import check_activations
from fusionjax.alignment._ot_transport import check_costs_available
from fusionjax.alignment._ot_transport import compute_array
from fusionjax.alignment._ot_transport import group_cost
from fusionjax.alignment._ot_transport import solve_transport
from fusionjax.alignment._spec import PermutationSpec
from fusionjax.alignment._spec import check_spec
from fusionjax.alignment._spec import leaf_paths
from fusionjax.alignment._spec import path_str


class OTFusionOutput(NamedTuple):
    r"""Result of :func:`ot_fusion`.

    A pytree whose ``spec`` and ``roles`` are static, so a jitted function can return
    it whole (and :meth:`apply` it afterwards).

    Attributes:
      fused: :math:`(1-w)\,\theta_{ref} + w\,\tilde\theta_{other}`, with ``ref``'s shapes
        and dtypes (computed in at least float32).
      aligned: ``other`` moved onto ``ref``'s units, :math:`\tilde\theta_{other}`
        (``ref``'s shapes and dtypes).
      transports: ``{group: [m, n]}`` couplings :math:`T` (other's units x ref's units,
        total mass 1) before the marginal correction; float32, or float64 when the
        group's leaves (or activations) are float64 under ``jax_enable_x64``.
      permutations: ``{group: int [n]}``: for each ref unit, the other unit sending it the
        most mass. When a coupling is a permutation (exact solver, equal widths), this is
        it, in :func:`~fusionjax.alignment.apply_permutations`' convention.
      transport_cost: ``{group: scalar}`` :math:`\langle T, C\rangle`, the transport cost
        reached under each group's ground cost.
      converged: ``{group: bool}``: whether Sinkhorn converged (always true when exact).
      spec: The spec the transports belong to.
      roles: ``{(path, axis): "read" | "write"}`` used for every permuted axis (an
        immutable, static mapping).
      marginal_correction: Whether maps divide by the couplings' own marginals (a
        boolean array once returned from :func:`jax.jit`).
    """

    fused: Params
    aligned: Params
    transports: Transports
    permutations: dict
    transport_cost: dict
    converged: dict
    spec: PermutationSpec
    roles: Roles
    marginal_correction: bool = True

    def apply(self, params: Params) -> Params:
        """Moves another pytree shaped like ``other`` onto ``ref``'s units.

        Args:
          params: A pytree the spec's paths name, with ``other``'s group sizes (e.g. a
            checkpoint of ``other`` with extra collections).

        Returns:
          The pytree with every permuted axis mapped as ``aligned`` was.
        """
        return apply_transports(
            self.spec,
            self.transports,
            params,
            roles=self.roles,
            marginal_correction=self.marginal_correction,
        )


def _check_pair(spec: PermutationSpec, ref: Params, other: Params):
    """Structure, dtype and shape checks for two models that may differ in group sizes."""
    validation.check_same_tree(ref, other, name="other", ref_name="ref")
    lr, lo = leaf_paths(ref), leaf_paths(other)
    axes_r, axes_o = spec.leaf_axes(ref), spec.leaf_axes(other)
    for path, x in lr.items():
        y = lo[path]
        if not isinstance(x, (jax.Array, np.ndarray)):
            continue
        if np.shape(x) != np.shape(y) and (np.ndim(x) != np.ndim(y) or path not in axes_r):
            raise ValueError(
                f"other differs from ref at {path!r}: shape {np.shape(y)} != {np.shape(x)}"
                + ("" if path in axes_r else " (no axis of this leaf is in the spec)")
            )
        if path in axes_r:
            for a, (g, sx, sy) in enumerate(
                zip(axes_r[path], np.shape(x), np.shape(y), strict=True)
            ):
                if g is None and sx != sy:
                    raise ValueError(
                        f"other differs from ref at {path!r}: axis {a} has {sy} != {sx} "
                        "entries and is in no group of the spec."
                    )
            if not jnp.issubdtype(x.dtype, jnp.inexact):
                raise TypeError(f"{path!r} is permuted by the spec but has dtype {x.dtype}.")
        if x.dtype != y.dtype:
            raise ValueError(f"other differs from ref at {path!r}: dtype {y.dtype} != {x.dtype}")
    return lr, lo, axes_r, axes_o


@jax.jit
def _interpolate(ref, other, cur, weight):
    """``((1 - w) ref + w aligned, aligned)`` leaf by leaf; integer leaves from ``ref``."""

    def fuse(kp, x, y):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return x, x
        path = path_str(kp)
        dt = validation.compute_dtype(x.dtype)
        yt = (cur[path] if path in cur else y).astype(dt)
        w = weight.astype(dt)
        return ((1 - w) * x.astype(dt) + w * yt).astype(x.dtype), yt.astype(x.dtype)

    treedef = jax.tree.structure(ref)
    pairs = treedef.flatten_up_to(jax.tree_util.tree_map_with_path(fuse, ref, other))
    return treedef.unflatten([f for f, _ in pairs]), treedef.unflatten([a for _, a in pairs])


def _loop(
    spec, roles, solver, metric, correction, options, ref_leaves, other_leaves, acts, epsilon
):
    """Aligns other's permuted leaves group by group; returns them and per-group results."""
    role_map = dict(roles)
    sizes_r = {g: np.shape(ref_leaves[p])[a] for g, ((p, a), *_) in spec.groups.items()}
    sizes_o = {g: np.shape(other_leaves[p])[a] for g, ((p, a), *_) in spec.groups.items()}
    axes_all = {p: _names(spec, p, np.ndim(x)) for p, x in ref_leaves.items()}
    # ``cur`` holds other's permuted leaves, with the groups done so far mapped onto ref's units.
    cur = {p: compute_array(x) for p, x in other_leaves.items()}
    transports, perms, tcost, conv = {}, {}, {}, {}
    done: frozenset = frozenset()
    for g in spec.names:
        axes = tuple((p, names) for p, names in axes_all.items() if g in names)
        paths = {p for p, _ in axes}
        roles_g = tuple(sorted((k, v) for k, v in role_map.items() if k[0] in paths))
        c = group_cost(
            {p: ref_leaves[p] for p in paths},
            {p: cur[p] for p in paths},
            acts.get(g),
            g=g,
            m=sizes_o[g],
            n=sizes_r[g],
            axes=axes,
            roles=roles_g,
            done=done,
            metric=metric,
        )
        t, ok = solve_transport(c, solver=solver, epsilon=epsilon, sinkhorn_kwargs=dict(options))
        new, perms[g], tcost[g] = group_apply(
            {p: cur[p] for p in paths},
            t,
            c,
            g=g,
            axes=axes,
            roles=roles_g,
            marginal_correction=correction,
        )
        cur.update(new)
        transports[g], conv[g] = t, ok
        done = done | {g}
    return cur, transports, perms, tcost, conv


_loop_jit = jax.jit(_loop, static_argnums=(0, 1, 2, 3, 4, 5))


def ot_fusion(
    spec: PermutationSpec,
    ref: Params,
    other: Params,
    *,
    weight: ArrayLike = 0.5,
    cost: str = "weight",
    activations: tuple[Activations, Activations] | None = None,
    solver: str = "exact",
    epsilon: ArrayLike = 0.01,
    ground_metric: str = "euclidean",
    roles: str | Roles = "last",
    marginal_correction: bool = True,
    sinkhorn_kwargs: Mapping[str, Any] | None = None,
) -> OTFusionOutput:
    r"""OTFusion: align ``other`` to ``ref`` layer by layer by optimal transport, then interpolate.

    Groups are processed in the spec's order, which must be forward order. For group
    :math:`g`, ``other``'s already aligned axes are mapped first (the paper's
    :math:`\hat W = W\,T_{\ell-1}\,\mathrm{diag}(1/\beta_{\ell-1})`, with the read map of
    the module docstring), a ground cost :math:`C_g` compares units, a coupling
    :math:`T_g` is solved, and every axis of :math:`g` is mapped with the marginal
    correction. Then :math:`\theta = (1-w)\,\theta_{ref} + w\,\tilde\theta_{other}`.

    ``ref`` and ``other`` may differ in the sizes of group axes (different widths); the
    result has ``ref``'s. Every other axis, and every leaf outside the spec, must agree
    and is interpolated as is. Integer leaves must be equal and are taken from ``ref``.

    Args:
      spec: Groups in forward order (input side first); at least one.
      ref: The reference model :math:`\theta_{ref}` (its units and widths are kept):
        any pytree, e.g. a linen variables dict or an equinox module (leaves that are
        not arrays are held static and taken from ``ref``).
      other: The model aligned to ``ref``.
      weight: :math:`w`, the weight of the aligned ``other``: 0 returns ``ref``, 1 the
        aligned ``other`` (the paper's ``ensemble_step`` is :math:`1-w`). Traceable.
      cost: ``"weight"``: Euclidean distance between units' weight rows, from every leaf
        where the group appears whose other permuted axes belong to earlier groups
        (concatenated: biases and norm parameters are coordinates of their unit;
        outgoing rows of ``other`` are scaled by :math:`m/n`). ``"activation"``: distance
        between units' activations on the same data (columns of ``activations``);
        groups without activations fall back to the weight cost.
      activations: ``(ref_activations, other_activations)``, each ``{group: [M, n]}``,
        for ``cost="activation"`` (e.g. from ``fusionjax.alignment.group_activations``).
      solver: ``"exact"`` (linear assignment; a permutation for equal widths) or
        ``"sinkhorn"`` (entropic OT, soft maps). See :func:`solve_transport`.
      epsilon: Sinkhorn's regularisation relative to the mean ground cost.
      ground_metric: ``"euclidean"`` (the paper's default) or ``"sqeuclidean"``.
      roles: Which permuted axes a leaf writes or reads: ``"last"`` (flax/linen,
        default), ``"first"`` (PyTorch/equinox) or a mapping (see :func:`axis_roles`).
      marginal_correction: Divide maps by the couplings' own marginals (see
        :func:`transport_maps`).
      sinkhorn_kwargs: Extra keyword arguments of ott's ``Sinkhorn``.

    Returns:
      An :class:`OTFusionOutput`.

    Raises:
      ValueError: if the spec has no groups, the models do not fit the spec or each
        other (the message names the path), a group has no leaf to build its weight
        cost from (the spec is not in forward order), activations have the wrong shape,
        or a hyperparameter is out of range.
      TypeError: if ``spec`` is not a :class:`PermutationSpec` or a permuted leaf is
        not floating point.

    Examples:
      >>> import numpy as np
      >>> from fusionjax.alignment import PermutationSpec, ot_fusion
      >>> spec = PermutationSpec({"h": [("l0/kernel", 1), ("l0/bias", 0), ("l1/kernel", 0)]})
      >>> def mlp(seed, width):
      ...     rng = np.random.default_rng(seed)
      ...     return {"l0": {"kernel": rng.normal(size=(4, width)), "bias": np.zeros(width)},
      ...             "l1": {"kernel": rng.normal(size=(width, 2))}}
      >>> ref, other = mlp(0, 8), mlp(1, 16)
      >>> out = ot_fusion(spec, ref, other)  # 16 units onto 8: two per ref unit
      >>> out.fused["l0"]["kernel"].shape, out.transports["h"].shape
      ((4, 8), (16, 8))

    References:
      Singh & Jaggi, `Model Fusion via Optimal Transport
      <https://arxiv.org/abs/1910.05653>`_, NeurIPS 2020;
      Imfeld et al, `Transformer Fusion with Optimal Transport
      <https://arxiv.org/abs/2310.05719>`_, ICLR 2024
    """
    if cost not in ("weight", "activation"):
        raise ValueError(f"cost must be 'weight' or 'activation', got {cost!r}.")
    if solver not in ("exact", "sinkhorn"):
        raise ValueError(f"solver must be 'exact' or 'sinkhorn', got {solver!r}.")
    if ground_metric not in ("euclidean", "sqeuclidean"):
        raise ValueError(
            f"ground_metric must be 'euclidean' or 'sqeuclidean', got {ground_metric!r}."
        )
    validation.check_hparam("weight", weight, lower=0.0, upper=1.0)
    if solver == "sinkhorn":
        validation.check_hparam("epsilon", epsilon, lower=0.0, lower_open=True)
    check_spec(spec)

    lr, lo, axes_r, axes_o = _check_pair(spec, ref, other)
    sizes_r, sizes_o = spec.sizes(ref), spec.sizes(other)
    role_map = _resolve_roles(spec, ref, roles)
    acts_r = acts_o = {}
    if cost == "activation":
        acts_r, acts_o = check_activations(activations, spec.names, sizes_r, sizes_o)
    validation.check_passthrough_equal(ref, [other], name="other")
    validation.check_finite(ref, "ref")
    validation.check_finite(other, "other")

    check_costs_available(spec, axes_r, acts_r)

    args = (
        spec,
        tuple(sorted(role_map.items())),
        solver,
        ground_metric,
        bool(marginal_correction),
        tuple(sorted(dict(sinkhorn_kwargs or {}).items())),
        {p: lr[p] for p in axes_r},
        {p: lo[p] for p in axes_o},
        {g: (acts_r[g], acts_o[g]) for g in acts_r},
        jnp.asarray(epsilon, jnp.float32),
    )
    # Exact: one compiled program for all groups (the assignment is a host callback, with
    # nothing to compile). Sinkhorn: groups run one by one, so that groups of equal sizes
    # share one compiled solver instead of inlining a copy each.
    loop = _loop_jit if solver == "exact" else _loop
    cur, transports, perms, tcost, conv = loop(*args)
    (ref_arrays, rest), (other_arrays, _) = _pytree.partition(ref), _pytree.partition(other)
    fused, aligned = _interpolate(ref_arrays, other_arrays, cur, jnp.asarray(weight))
    return OTFusionOutput(
        fused=_pytree.combine(fused, rest),
        aligned=_pytree.combine(aligned, rest),
        transports=transports,
        permutations=perms,
        transport_cost=tcost,
        converged=conv,
        spec=spec,
        roles=_pytree.StaticDict(role_map),
        marginal_correction=marginal_correction,
    )
