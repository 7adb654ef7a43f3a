r"""OPCM: continual merging, one fine-tuned model at a time, by orthogonal projection.

Tang et al. (2025) merge models that arrive in sequence without keeping the earlier
ones. The state after :math:`t` models is the base :math:`\theta_0`, the running sum
:math:`S_t` of *projected* task vectors, and two numbers. For the next model with task
vector :math:`\tau = \theta_{t+1} - \theta_0`, every projected leaf (a 2-D matrix)
takes the SVD of the current merged update, :math:`S_t = U\Sigma V^\top`, keeps the
top :math:`k` directions whose singular values first pass a share :math:`\alpha` of
their sum,

.. math::
   k = \min\Big\{i : \tfrac{\sum_{j\le i}\sigma_j}{\sum_j \sigma_j} > \alpha\Big\}
   \quad(0\text{-based; } 0 \text{ if none}),

and removes from :math:`\tau` its components in that subspace and on the diagonal:

.. math::
   M = U^\top \tau V,\qquad
   M_{ij} \leftarrow 0 \ \text{ if } (i<k \wedge j<k) \ \text{or}\ i=j,\qquad
   P(\tau) = U M V^\top .

Other leaves (biases, scalars, conv kernels: FusionBench's non-``nn.Linear``
parameters) are added unprojected, :math:`P(\tau)=\tau`. Then

.. math::
   S_{t+1} = S_t + P(\tau),\qquad
   \bar n_{t+1} = \tfrac{1}{t+1}\sum_{s\le t+1}\lVert\tau_s\rVert,\qquad
   \lambda_{t+1} = \lVert S_{t+1}\rVert / \bar n_{t+1},\qquad
   \theta^{\mathrm{merged}}_{t+1} = \theta_0 + S_{t+1}/\lambda_{t+1},

with norms over the whole model: the merged task vector keeps the *average* task
vector norm, whatever the number of models (the paper's adaptive scaling). The first
model is added as it is (:math:`\lambda_1 = 1`), so one model in gives that model back.
Memory is the base, :math:`S_t` and three scalars, constant in the number of models.

Semantics follow FusionBench's ``fusion_bench/method/opcm/opcm.py`` (``alpha=0.5`` by
default there): the cumulative share is of singular values (not their squares), the
whole diagonal :math:`u_i^\top\tau v_i` is dropped as well as the top-left block, and
FusionBench's ``previous_lambda * previous_merged_tv`` is :math:`S_t` here, kept
unscaled. The projection is the same for a flax ``[in, out]`` kernel and a torch
``[out, in]`` weight (transposing swaps :math:`U` and :math:`V`; block and diagonal are
unchanged), so no layout option is needed. FusionBench shuffles the order of the
models; here the caller decides the order.

What costs time, and what is done about it: one SVD of :math:`S_t` per projected
matrix per model. The thin SVD suffices (:math:`r=\min(m,n)` directions; the block and
the diagonal lie inside it), so the removed part is :math:`U_r (M\circ\text{mask})
V_r^\top` with :math:`M` only :math:`r\times r` — not FusionBench's full
:math:`m\times m` and :math:`n\times n` rotations. :math:`k` is computed on device, so
``update`` is jittable and one compiled function serves every model of a sequence (its
state keeps one tree structure and shape).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax._src.tree import is_mergeable
from fusionjax._src.validation import compute_dtype

_HIGHEST = jax.lax.Precision.HIGHEST
keystr = jax.tree_util.keystr


def _is_none(x) -> bool:
    return x is None


class OPCMState(NamedTuple):
    r"""The state of an OPCM merge: constant in size however many models it absorbed.

    Attributes:
      base: The base model :math:`\theta_0`, as given to ``init``.
      total: :math:`S_t`, the sum of the projected task vectors so far, in the compute
        dtype (at least float32); ``None`` on leaves that are not merged (integer,
        boolean, non-array).
      scaling: :math:`\lambda_t = \lVert S_t\rVert / \bar n_t` (1 before any model).
      norm_sum: :math:`\sum_s \lVert\tau_s\rVert`, the task vector norms so far.
      count: :math:`t`, the number of models absorbed (int32).
    """

    base: Params
    total: Params
    scaling: jax.Array
    norm_sum: jax.Array
    count: jax.Array

    @property
    def merged(self) -> Params:
        r"""The merged model :math:`\theta_0 + S_t/\lambda_t`, in the base's dtypes."""
        return opcm_merged(self)


class ContinualMerger(NamedTuple):
    """A continual merger in the optax style: a pure ``init`` / ``update`` pair.

    Attributes:
      init: ``init(base) -> state``.
      update: ``update(state, finetuned) -> state``: absorbs one more model.
    """

    init: Callable[[Params], Any]
    update: Callable[[Any, Params], Any]


def opcm_merged(state: OPCMState) -> Params:
    r"""The merged parameters of an OPCM state, :math:`\theta_0 + S_t/\lambda_t`.

    Args:
      state: An :class:`OPCMState` from :func:`opcm`'s ``init``/``update``.

    Returns:
      Parameters with the structure and dtypes of ``state.base``; the base itself
      before any model was absorbed.
    """

    def add(b, s):
        if s is None:
            return b
        dt = compute_dtype(b.dtype)
        return (jnp.asarray(b, dt) + s / state.scaling.astype(dt)).astype(b.dtype)

    return jax.tree.map(add, state.base, state.total, is_leaf=_is_none)


def _scalar_dtype(leaves) -> jnp.dtype:
    dts = [compute_dtype(x.dtype) for x in leaves if is_mergeable(x)]
    return max(dts, key=lambda d: d.itemsize) if dts else jnp.dtype(jnp.float32)


def _sq_norm(x, dt) -> jax.Array:
    x = x.reshape(-1)
    return jnp.vdot(x, x, precision=_HIGHEST).astype(dt)


def project(total: jax.Array, tv: jax.Array, alpha: ArrayLike, drop_diagonal: bool = True):
    r"""OPCM's projection of one matrix's task vector away from the merged update's subspace.

    Args:
      total: The merged update :math:`S` of this matrix, ``[m, n]`` (only its singular
        vectors and the shares of its singular values matter, not its scale).
      tv: The new task vector :math:`\tau`, ``[m, n]``.
      alpha: Share :math:`\alpha` of the sum of singular values that decides :math:`k`.
      drop_diagonal: Also drop :math:`u_i^\top\tau v_i` for every :math:`i` (FusionBench).

    Returns:
      :math:`P(\tau) = \tau - U_r(M\circ\text{mask})V_r^\top`, ``[m, n]``.
    """
    u, s, vt = jnp.linalg.svd(total, full_matrices=False)
    r = s.shape[0]
    ssum = jnp.sum(s)
    share = jnp.cumsum(s) / jnp.where(ssum > 0, ssum, jnp.ones_like(ssum))
    k = jnp.argmax(share > jnp.asarray(alpha, share.dtype))  # 0 when none passes alpha
    m = jnp.matmul(jnp.matmul(u.T, tv, precision=_HIGHEST), vt.T, precision=_HIGHEST)
    idx = jnp.arange(r)
    block = (idx[:, None] < k) & (idx[None, :] < k)
    if drop_diagonal:
        block = block | (idx[:, None] == idx[None, :])
    removed = jnp.matmul(
        jnp.matmul(u, jnp.where(block, m, jnp.zeros_like(m)), precision=_HIGHEST),
        vt,
        precision=_HIGHEST,
    )
    return tv - removed


def _absorb_leaf(b, f, s, alpha, first, proj, drop_diagonal, dt):
    """One leaf of one model: ``(S + P(tau), |tau|^2, |S + P(tau)|^2)``."""
    cd = compute_dtype(b.dtype)
    tv = jnp.asarray(f, cd) - jnp.asarray(b, cd)
    sq_tv = _sq_norm(tv, dt)
    if proj:
        tv = jax.lax.cond(
            first,
            lambda s_, t_: t_,
            lambda s_, t_: project(s_, t_, alpha, drop_diagonal),
            s,
            tv,
        )
    new = s + tv
    return new, sq_tv, _sq_norm(new, dt)


def _next_scaling(sq_tv, sq_total, norm_sum, count):
    """The scalars after one model: ``(scaling, norm_sum, count)`` from its squared norms."""
    dt = norm_sum.dtype
    norm_sum = norm_sum + jnp.sqrt(sq_tv)
    count = count + 1
    mean_norm = norm_sum / count.astype(dt)
    total_norm = jnp.sqrt(sq_total)
    ok = (total_norm > 0) & (mean_norm > 0)
    scaling = jnp.where(ok, total_norm / jnp.where(ok, mean_norm, 1), jnp.ones((), dt))
    return scaling, norm_sum, count


@functools.partial(jax.jit, static_argnames=("projected", "drop_diagonal"))
def _absorb(base, finetuned, total, scaling, norm_sum, count, alpha, *, projected, drop_diagonal):
    # One jitted program per model structure: the eager path does not dispatch op by op,
    # and alpha is traced, so a sweep over it reuses the compiled code.
    dt = scaling.dtype
    first = count == 0
    sq_tv = sq_total = jnp.zeros((), dt)
    new_total = []
    for b, f, s, proj in zip(base, finetuned, total, projected, strict=True):
        new, a, c = _absorb_leaf(b, f, s, alpha, first, proj, drop_diagonal, dt)
        new_total.append(new)
        sq_tv, sq_total = sq_tv + a, sq_total + c
    return new_total, *_next_scaling(sq_tv, sq_total, norm_sum, count)


# The same, one leaf per call: models streamed from checkpoints (fusionjax.io).
absorb_leaf = jax.jit(_absorb_leaf, static_argnums=(5, 6, 7))
next_scaling = jax.jit(_next_scaling)


def _resolve_mask(mask, base) -> list[bool]:
    leaves_p = jax.tree_util.tree_flatten_with_path(base)[0]
    if mask is None:
        return [is_mergeable(x) and np.ndim(x) == 2 for _, x in leaves_p]
    tree = mask(base) if callable(mask) else mask
    try:
        flags = jax.tree.structure(base).flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"mask must have the tree structure of base: {e}") from None
    out = []
    for (path, x), f in zip(leaves_p, flags, strict=True):
        if not isinstance(f, (bool, np.bool_)):
            raise TypeError(
                f"mask must hold Python booleans, got {type(f).__name__} at {keystr(path)}."
            )
        if f and not (is_mergeable(x) and np.ndim(x) == 2):
            raise ValueError(
                f"mask is True at {keystr(path)}, but only floating-point 2-D leaves can be "
                f"projected; that leaf is {validation.describe(x)}."
            )
        out.append(bool(f))
    return out


def opcm(
    *, alpha: ArrayLike = 0.5, drop_diagonal: bool = True, mask: Any = None
) -> ContinualMerger:
    r"""OPCM continual merging: absorb fine-tuned models one at a time, constant memory.

    For each projected matrix, the new task vector loses its components in the top
    singular subspace of the merged update so far (the first :math:`k` directions, where
    the cumulative share of singular values first exceeds :math:`\alpha`) and on the
    diagonal :math:`u_i v_i^\top`; other leaves are added as they are. The running sum
    is then rescaled so the merged task vector's norm is the average task vector norm:

    .. math::
       S_{t+1} = S_t + P_{\alpha}(\tau_{t+1}),\qquad
       \theta_{t+1} = \theta_0 + \bar n_{t+1}\,\frac{S_{t+1}}{\lVert S_{t+1}\rVert}.

    See :mod:`fusionjax.merging._opcm` for the full math. Which leaves are projected:
    every floating-point 2-D leaf by default (Dense kernels; FusionBench projects
    ``nn.Linear`` weights only, so pass ``mask`` to leave e.g. embedding tables
    unprojected). Biases, scalars and conv kernels are summed as in FusionBench.
    Integer and boolean leaves are not merged and must equal the base's.

    Args:
      alpha: Share :math:`\alpha\in[0,1]` of the merged update's singular-value sum
        whose directions the new task vector must avoid: larger protects more of the
        earlier models (FusionBench's default 0.5). At 1 (or 0) only the diagonal is
        dropped. May be traced.
      drop_diagonal: Drop the diagonal components :math:`u_i^\top\tau v_i` of every
        direction, as FusionBench does (``False``: only the top-:math:`k` block).
      mask: Which leaves are projected: ``None`` (every floating-point 2-D leaf), a
        pytree of Python booleans with the structure of the base, or a callable
        ``mask(base)`` returning one.

    Returns:
      A :class:`ContinualMerger` ``(init, update)``: ``init(base)`` gives an
      :class:`OPCMState`, ``update(state, finetuned)`` absorbs one model; both are pure
      and jittable. ``state.merged`` (or :func:`opcm_merged`) gives the merged model.

    Raises:
      ValueError: if ``alpha`` is outside ``[0, 1]``, if a model differs from the base
        in structure, shape or dtype (naming the path), if its integer leaves differ,
        if it has NaN or Inf values, or if ``mask`` selects a leaf that is not a
        floating-point matrix.
      TypeError: if ``mask`` holds something other than booleans.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> base = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
      >>> merger = fj.merging.opcm(alpha=0.5)
      >>> state = merger.init(base)
      >>> state = merger.update(state, {"w": jnp.eye(2), "b": jnp.ones(2)})
      >>> state.merged["b"].tolist()  # one model in: that model back
      [1.0, 1.0]
      >>> state = merger.update(state, {"w": jnp.array([[0.0, 2.0], [0.0, 0.0]]),
      ...                               "b": jnp.ones(2)})
      >>> int(state.count)
      2

    References:
      Tang et al, `Merging Models on the Fly Without Retraining: A Sequential Approach
      to Scalable Continual Model Merging <https://arxiv.org/abs/2501.09522>`_, NeurIPS
      2025; FusionBench ``method/opcm``.
    """
    validation.check_hparam("alpha", alpha, lower=0.0, upper=1.0)
    if not isinstance(drop_diagonal, (bool, np.bool_)):
        raise TypeError(f"drop_diagonal must be a bool, got {type(drop_diagonal).__name__}.")
    if mask is not None and not callable(mask):
        _check_mask_leaves(mask)

    def init(base: Params) -> OPCMState:
        leaves = jax.tree.leaves(base)
        _resolve_mask(mask, base)  # fail here, not at the first update
        for path, x in jax.tree_util.tree_flatten_with_path(base)[0]:
            if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(
                x.dtype, jnp.complexfloating
            ):
                raise ValueError(f"base has a complex leaf at {keystr(path)}: not supported.")
        validation.check_finite(base, "base")
        dt = _scalar_dtype(leaves)
        total = jax.tree.map(
            lambda x: jnp.zeros(np.shape(x), compute_dtype(x.dtype)) if is_mergeable(x) else None,
            base,
        )
        one = jnp.ones((), dt)
        return OPCMState(base, total, one, jnp.zeros((), dt), jnp.zeros((), jnp.int32))

    def update(state: OPCMState, finetuned: Params) -> OPCMState:
        if not isinstance(state, OPCMState):
            raise TypeError(f"state must be an OPCMState from init, got {type(state).__name__}.")
        base = state.base
        validation.check_same_structure(base, finetuned, name="finetuned")
        validation.check_passthrough_equal(base, [finetuned], name="finetuned")
        validation.check_finite(finetuned, "finetuned")
        flags = _resolve_mask(mask, base)
        lb, treedef = jax.tree.flatten(base)
        lf = jax.tree.leaves(finetuned)
        ls = treedef.flatten_up_to(state.total)
        live = [i for i, s in enumerate(ls) if s is not None]
        new_live, scaling, norm_sum, count = _absorb(
            [lb[i] for i in live],
            [lf[i] for i in live],
            [ls[i] for i in live],
            state.scaling,
            state.norm_sum,
            state.count,
            jnp.asarray(alpha, state.scaling.dtype),
            projected=tuple(flags[i] for i in live),
            drop_diagonal=bool(drop_diagonal),
        )
        new_total = list(ls)
        for i, s in zip(live, new_live, strict=True):
            new_total[i] = s
        return OPCMState(base, treedef.unflatten(new_total), scaling, norm_sum, count)

    return ContinualMerger(init, update)


def _check_mask_leaves(mask) -> None:
    for path, f in jax.tree_util.tree_flatten_with_path(mask)[0]:
        if not isinstance(f, (bool, np.bool_)):
            raise TypeError(
                f"mask must hold Python booleans, got {type(f).__name__} at {keystr(path)}."
            )
