r"""Reversible model merging (RMM): a shared basis from which every task model is recovered.

Alipour and Amiri (2025) keep, instead of one merged model, a compact *basis* of weights
and, per task, *coefficients* whose linear combination recovers that task's weights.
With low-rank task updates :math:`\Delta_t = B_tA_t` (LoRA, or a truncated SVD of a
fine-tuned model's task vector), RMM works per layer and per *position*: a row of
:math:`B_t` or a column of :math:`A_t` (torch layout), an :math:`r`-vector
:math:`x_t\in\mathbb{R}^r` for each of the :math:`T` tasks. With
:math:`X = [x_1\cdots x_T]\in\mathbb{R}^{r\times T}`, its mean
:math:`\mu = \frac1T\sum_t x_t` and the centred :math:`X_c = X - \mu\mathbf 1^\top`,
the closed-form optimum of

.. math::
   \min_{P\in\mathbb{R}^{r\times k},\,C\in\mathbb{R}^{k\times T}}
   \lVert X_c - PC\rVert_F^2

is the truncated SVD (Eckart-Young): :math:`X_c = U\Sigma W^\top`,
:math:`P = U_{:k}\Sigma_{:k}`, :math:`C = W_{:k}^\top`, and task :math:`t` is recovered as
:math:`\hat x_t = \mu + P c_t`: the orthogonal projection of :math:`x_t - \mu` onto the
top-:math:`k` principal directions, i.e. the least-squares reconstruction. Here the
singular values are kept with the basis and the coefficients :math:`C` have orthonormal
rows, so no division by a small singular value ever happens (the product :math:`PC` is
the same as with an orthonormal basis). Stacked over the positions, the :math:`k` basis
vectors form :math:`k` factor-shaped arrays (":math:`k` models"), :math:`\mu` one more,
and the coefficients :math:`T k` numbers per position: storage
:math:`\frac{k(r+T)+r}{rT}` of keeping all :math:`T` adapters (the paper's count). The
factors :math:`A_t`, :math:`B_t` are compressed separately and multiplied on recovery.

Recovery is exact once :math:`k \ge \mathrm{rank}(X_c)` (at most
:math:`\min(r, T-1)`): :func:`reversible_lora` with ``num_basis = T - 1`` is lossless.
The error falls monotonically in :math:`k` (each added direction removes its squared
singular value from the residual).

Inputs:

* :func:`reversible_lora`: LoRA adapter trees (:class:`fusionjax.merging.LoRA` nodes,
  ``torch`` or ``flax`` layout); :func:`reversible_adapter` recovers task ``t``'s factors.
* :func:`reversible_merge`: dense fine-tuned models. With ``rank=r`` each matrix task
  vector is first truncated by SVD (the paper's "post-training SVD" setting),
  :math:`\Delta_t \approx (U_{:r}\Sigma_{:r}^{1/2})(\Sigma_{:r}^{1/2}V_{:r}^\top)` (the
  square root split is ours: it gives both factors one scale), and RMM runs on the
  factors. With ``rank=None`` the full task vectors are used: a matrix
  :math:`\Delta_t = \Delta_t\,I` is its own factor, so a position is a row (the last axis
  is the vector). Vectors (biases) are one position. :func:`reversible_task_model`
  recovers :math:`\theta_0 + \hat\Delta_t`.

``center=False`` drops :math:`\mu` (an uncentred basis; exact once
:math:`k\ge\mathrm{rank}(X)`, at most :math:`\min(r, T)`). ``num_basis`` larger than
what a position allows (:math:`\min(r, T)`) is capped per leaf.

Evaluation is per task: task :math:`t` is scored with its recovered model, as EMR
(:func:`fusionjax.merging.emr_merge`) is; RMM is not one merged model.

What costs time, and what is done about it: per array and position, the
:math:`T\times T` Gram matrix of the centred vectors and its eigendecomposition (the
top-:math:`k` eigenvectors are the coefficients, :math:`P = C X_c^\top`): one einsum
:math:`O(\text{positions}\cdot T^2 r)` and a batched ``eigh`` of ``[positions, T, T]``
instead of thin SVDs of ``[T, r]`` blocks (a first version with batched SVDs took
seconds on the digits testbed's encoder; this one takes 20 ms for a 512 x 512 kernel of
eight models on 2 shared CPU cores, after compiling). Jitted once per leaf shape and
``num_basis``. ``rank=...`` adds one thin SVD per task and matrix. Recovery is a
weighted sum of :math:`k` basis arrays per leaf, jitted once for every task (the task
index is traced).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax._src.base import Params
from fusionjax._src.tree import is_mergeable
from fusionjax._src.validation import compute_dtype
from fusionjax.merging._lora import LoRA
from fusionjax.merging._lora import _dims
from fusionjax.merging._lora import _flatten

_HIGHEST = jax.lax.Precision.HIGHEST


def _is_leaf(x) -> bool:
    return x is None or isinstance(x, LoRA)


class ReversibleOutput(NamedTuple):
    r"""The result of :func:`reversible_merge` or :func:`reversible_lora`.

    Every field is a pytree like the input (a model, or an adapter tree); at a matrix
    compressed in factors (``rank=...``, or an adapter layer) the entry is a
    :class:`fusionjax.merging.LoRA` of the two factors' entries; leaves that are not
    floating point hold ``None``.

    Attributes:
      mean: :math:`\mu`, shaped like each array (``None`` everywhere when
        ``center=False``).
      basis: :math:`P`: ``[k, *shape]`` per array, :math:`k` arrays shaped like it.
      coefficients: :math:`C`: ``[T, k, *shape]`` with the vector axis of size 1 (one
        number per task, basis entry and position).
    """

    mean: Any
    basis: Any
    coefficients: Any

    @property
    def num_tasks(self) -> int:
        """:math:`T`, the number of recoverable task models."""
        first = next(x for x in jax.tree.leaves(self.coefficients))
        return int(np.shape(first)[0])

    def size(self) -> int:
        """Numbers stored: mean, basis and coefficients (compare with ``T`` models)."""
        return int(
            sum(np.size(x) for f in (self.mean, self.basis, self.coefficients)
                for x in jax.tree.leaves(f))
        )


@functools.partial(jax.jit, static_argnames=("axis", "k", "center"))
def _rmm_array(x, *, axis, k, center):
    """x: [T, *S] in the compute dtype; ``axis``: the vector axis of S."""
    t = x.shape[0]
    xm = jnp.moveaxis(x, axis + 1, -1)  # [T, *P, d]
    pos_shape, d = xm.shape[1:-1], xm.shape[-1]
    xf = xm.reshape(t, -1, d)  # [T, P, d]
    mean = sum(xf[i] for i in range(t)) / t if center else None
    xc = xf - mean[None] if center else xf
    # Per position, the [T, T] Gram matrix of the tasks' vectors: its top-k eigenvectors
    # are the left singular vectors W_k of X_c^T, and P = W_k^T X_c^T (= S_k V_k^T).
    gram = jnp.einsum("tpd,spd->pts", xc, xc, precision=_HIGHEST)
    _, vecs = jnp.linalg.eigh(gram)  # ascending eigenvalues
    top = vecs[:, :, ::-1][:, :, :k]  # [P, T, k]
    coef = jnp.transpose(top, (1, 2, 0))  # [T, k, P]
    basis = jnp.einsum("ptk,tpd->kpd", top, xc, precision=_HIGHEST)  # [k, P, d]
    basis = jnp.moveaxis(basis.reshape(k, *pos_shape, d), -1, axis + 1)
    coef = jnp.expand_dims(coef.reshape(t, k, *pos_shape), axis + 2)
    if center:
        mean = jnp.moveaxis(mean.reshape(*pos_shape, d), -1, axis)
    return mean, basis, coef


def _compress(x, axis: int, num_basis: int, center: bool, dtype):
    """One stacked array ``[T, *S]`` -> (mean, basis, coefficients) in ``dtype``."""
    k = min(num_basis, x.shape[0], x.shape[axis + 1])
    mean, basis, coef = _rmm_array(x, axis=axis, k=k, center=center)
    return tuple(None if a is None else a.astype(dtype) for a in (mean, basis, coef))


def _recover(mean, basis, coef_t):
    """Weighted sum of the basis arrays (coef_t: [k, ...] broadcasting over the vector axis)."""
    dt = compute_dtype(basis.dtype)
    out = jnp.sum(coef_t.astype(dt) * basis.astype(dt), axis=0)
    return out if mean is None else out + mean.astype(dt)


def _check_num_basis(num_basis) -> int:
    return validation.check_int("num_basis", num_basis, lower=1)


@functools.partial(jax.jit, static_argnames=("rank",))
def _truncated_factors(d, *, rank):
    """Balanced rank-``rank`` factors of ``d [T, m, n]``: ``b [T, m, r]``, ``a [T, r, n]``."""
    u, s, vt = jnp.linalg.svd(d, full_matrices=False)  # one batched SVD over the tasks
    root = jnp.sqrt(s[:, :rank])
    return u[:, :, :rank] * root[:, None, :], root[:, :, None] * vt[:, :rank]


def reversible_merge(
    base: Params,
    finetuned: Sequence[Params],
    *,
    num_basis: int,
    rank: int | None = None,
    center: bool = True,
) -> ReversibleOutput:
    r"""Reversible model merging of dense fine-tuned models: a shared basis plus coefficients.

    Per leaf, the task vectors :math:`\tau_t = \theta_t - \theta_0` are compressed position
    by position: :math:`x_t \approx \mu + P c_t` with the top-``num_basis`` principal
    directions :math:`P` of the :math:`T` vectors (see
    :mod:`fusionjax.merging._reversible`). A position is a row of a matrix (its last
    axis is the vector) or, with ``rank=r``, a row of :math:`B_t` / column of
    :math:`A_t` of the rank-:math:`r` truncated SVD :math:`\tau_t\approx B_tA_t`.

    Args:
      base: The pretrained parameters :math:`\theta_0`.
      finetuned: The :math:`T` fine-tuned models (a non-empty list).
      num_basis: :math:`k`, basis arrays kept per array (capped at what a position
        allows: :math:`\min(T, d)` for vectors of length :math:`d`). ``T - 1`` (centred)
        recovers every model exactly (up to the rank truncation).
      rank: ``None`` (full task vectors) or the rank :math:`r` of the post-training SVD
        applied to every 2-D task vector first (capped at the matrix's smaller side);
        other leaves are used in full.
      center: Subtract the mean over tasks first (the paper's :math:`\mu`).

    Returns:
      A :class:`ReversibleOutput`; :func:`reversible_task_model` recovers task ``t``.

    Raises:
      ValueError: naming the model and path if the models differ from ``base``; if
        ``num_basis`` or ``rank`` is below 1.
      TypeError: if ``num_basis`` or ``rank`` is not an int, or ``finetuned`` is not a
        list or tuple.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros((2, 3))}
      >>> fts = [{"w": jnp.full((2, 3), float(i))} for i in range(3)]
      >>> out = fj.merging.reversible_merge(base, fts, num_basis=2)
      >>> fj.merging.reversible_task_model(base, out, 2)["w"].round(4).tolist()
      [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]

    References:
      Alipour and Amiri, `Towards Reversible Model Merging For Low-rank Weights
      <https://arxiv.org/abs/2510.14163>`_, 2025
    """
    num_basis = _check_num_basis(num_basis)
    if rank is not None:
        rank = validation.check_int("rank", rank, lower=1)
    if not isinstance(center, bool):
        raise TypeError(f"center must be a bool, got {center!r}.")
    validation.check_models(base, finetuned)
    flat_base, treedef = jax.tree_util.tree_flatten(base)
    flat_fts = [jax.tree.leaves(f) for f in finetuned]
    means, bases, coefs = [], [], []
    for i, b in enumerate(flat_base):
        if not is_mergeable(b):
            for lst in (means, bases, coefs):
                lst.append(None)
            continue
        dt = compute_dtype(b.dtype)
        taus = [jnp.asarray(f[i], dt) - jnp.asarray(b, dt) for f in flat_fts]
        if rank is not None and np.ndim(b) == 2:
            r = min(rank, *np.shape(b))
            fb, fa = _truncated_factors(jnp.stack(taus), rank=r)
            ma, pa, ca = _compress(fa, 0, num_basis, center, b.dtype)
            mb, pb, cb = _compress(fb, 1, num_basis, center, b.dtype)
            means.append(LoRA(ma, mb) if center else None)
            bases.append(LoRA(pa, pb))
            coefs.append(LoRA(ca, cb))
            continue
        x = jnp.stack([tau.reshape(-1) if tau.ndim == 0 else tau for tau in taus])
        mean, basis, coef = _compress(x, x.ndim - 2, num_basis, center, b.dtype)
        means.append(mean)
        bases.append(basis)
        coefs.append(coef)
    return ReversibleOutput(*(treedef.unflatten(v) for v in (means, bases, coefs)))


@jax.jit
def _task_model(base, mean, basis, coefs, task):
    def one(b, m, p, c):
        if p is None:
            return b
        dt = compute_dtype(b.dtype)
        if isinstance(p, LoRA):
            a = _recover(None if m is None else m.a, p.a, c.a[task])
            bb = _recover(None if m is None else m.b, p.b, c.b[task])
            delta = jnp.matmul(bb, a, precision=_HIGHEST)
        else:
            delta = _recover(m, p, c[task]).reshape(b.shape)
        return (b.astype(dt) + delta.astype(dt)).astype(b.dtype)

    return jax.tree.map(one, base, mean, basis, coefs, is_leaf=_is_leaf)


def _check_output(out, task) -> int:
    if not isinstance(out, ReversibleOutput):
        raise TypeError(
            f"output must be a ReversibleOutput from reversible_merge or reversible_lora, "
            f"got {type(out).__name__}."
        )
    return validation.check_int("task", task, lower=0, upper=out.num_tasks - 1)


def reversible_task_model(base: Params, output: ReversibleOutput, task: int) -> Params:
    r"""Task ``task``'s model from :func:`reversible_merge`: :math:`\theta_0 + \hat\tau_t`.

    Per array, :math:`\hat x_t = \mu + \sum_j C_{tj} P_j` (then :math:`\hat B_t\hat A_t`
    for matrices compressed in factors). One compiled function serves every task.

    Args:
      base: The base parameters the merge was computed from.
      output: The :class:`ReversibleOutput` of :func:`reversible_merge`.
      task: Index :math:`t` of the task, ``0 <= task < T``.

    Returns:
      Parameters like ``base``.

    Raises:
      ValueError: if ``task`` is out of range or ``output`` does not match ``base``.
      TypeError: if ``output`` is not a :class:`ReversibleOutput`.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(2)}
      >>> fts = [{"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([3.0, 0.0])}]
      >>> out = fj.merging.reversible_merge(base, fts, num_basis=1)
      >>> fj.merging.reversible_task_model(base, out, 0)["w"].round(4).tolist()
      [1.0, -2.0]

    References:
      Alipour and Amiri, `Towards Reversible Model Merging For Low-rank Weights
      <https://arxiv.org/abs/2510.14163>`_, 2025
    """
    task = _check_output(output, task)
    if jax.tree.structure(base) != jax.tree.structure(output.basis, is_leaf=_is_leaf):
        raise ValueError("output does not match base: output.basis has another tree structure.")
    return _task_model(base, output.mean, output.basis, output.coefficients, task)


def reversible_lora(
    adapters: Sequence[Any], *, num_basis: int, center: bool = True, layout: str = "torch"
) -> ReversibleOutput:
    r"""Reversible model merging of LoRA adapters, factor by factor (the paper's setting).

    Every position of every factor (a column of ``a`` and a row of ``b`` in the torch
    layout: an :math:`r`-vector per task) is compressed to :math:`\mu + Pc_t` with the
    top-``num_basis`` principal directions of the :math:`T` adapters' vectors. All
    adapters need the same rank per layer (the vectors are stacked).

    Args:
      adapters: ``T`` adapter trees of :class:`fusionjax.merging.LoRA` nodes with one
        structure and, per layer, one shape.
      num_basis: :math:`k` (capped at :math:`\min(T, r)`); ``T - 1`` is lossless.
      center: Subtract the mean adapter first (the paper's :math:`\mu`).
      layout: ``"torch"`` (``a: [r, in]``, ``b: [out, r]``) or ``"flax"``
        (``a: [in, r]``, ``b: [r, out]``).

    Returns:
      A :class:`ReversibleOutput` whose fields are adapter trees (each node a
      :class:`fusionjax.merging.LoRA` of the two factors' entries);
      :func:`reversible_adapter` recovers task ``t``'s adapter.

    Raises:
      ValueError: on an empty list, mismatched structures, shapes or ranks (naming the
        adapter and path), a bad layout, or ``num_basis`` below 1.
      TypeError: if a tree holds something other than LoRA nodes, or ``num_basis`` is
        not an int.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusionjax import merging
      >>> ads = [{"q": merging.LoRA(a=jnp.full((2, 3), float(i)), b=jnp.ones((4, 2)))}
      ...        for i in range(3)]
      >>> out = merging.reversible_lora(ads, num_basis=2)
      >>> merging.reversible_adapter(out, 1)["q"].a.round(4).tolist()
      [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]

    References:
      Alipour and Amiri, `Towards Reversible Model Merging For Low-rank Weights
      <https://arxiv.org/abs/2510.14163>`_, 2025; Hu et al, `LoRA
      <https://arxiv.org/abs/2106.09685>`_, ICLR 2022
    """
    num_basis = _check_num_basis(num_basis)
    if not isinstance(center, bool):
        raise TypeError(f"center must be a bool, got {center!r}.")
    treedef, paths, layers = _flatten(adapters, layout)
    a_axis, b_axis = (0, 1) if layout == "torch" else (1, 0)
    means, bases, coefs = [], [], []
    for path, ads in zip(paths, layers, strict=True):
        ranks = {_dims(ad, layout, "adapter")[0] for ad in ads}
        if len(ranks) > 1:
            raise ValueError(
                f"adapters at {jax.tree_util.keystr(path)} have ranks {sorted(ranks)}: "
                "reversible_lora stacks the factors, so every adapter needs one rank per layer."
            )
        dtype = ads[0].a.dtype
        dt = compute_dtype(dtype)
        xa = jnp.stack([jnp.asarray(ad.a, dt) for ad in ads])
        xb = jnp.stack([jnp.asarray(ad.b, dt) for ad in ads])
        ma, pa, ca = _compress(xa, a_axis, num_basis, center, dtype)
        mb, pb, cb = _compress(xb, b_axis, num_basis, center, dtype)
        means.append(LoRA(ma, mb) if center else None)
        bases.append(LoRA(pa, pb))
        coefs.append(LoRA(ca, cb))
    return ReversibleOutput(*(treedef.unflatten(v) for v in (means, bases, coefs)))


@jax.jit
def _adapter(mean, basis, coefs, task):
    def one(m, p, c):
        a = _recover(None if m is None else m.a, p.a, c.a[task]).astype(p.a.dtype)
        b = _recover(None if m is None else m.b, p.b, c.b[task]).astype(p.b.dtype)
        return LoRA(a, b)

    return jax.tree.map(one, mean, basis, coefs, is_leaf=_is_leaf)


def reversible_adapter(output: ReversibleOutput, task: int) -> Any:
    r"""Task ``task``'s adapter from :func:`reversible_lora`: its recovered factors.

    Args:
      output: The :class:`ReversibleOutput` of :func:`reversible_lora`.
      task: Index :math:`t` of the task, ``0 <= task < T``.

    Returns:
      An adapter tree of :class:`fusionjax.merging.LoRA` nodes in the layout and dtype
      the adapters had (:func:`fusionjax.merging.lora_delta` gives the updates).

    Raises:
      ValueError: if ``task`` is out of range.
      TypeError: if ``output`` is not a :class:`ReversibleOutput`.

    References:
      Alipour and Amiri, `Towards Reversible Model Merging For Low-rank Weights
      <https://arxiv.org/abs/2510.14163>`_, 2025
    """
    task = _check_output(output, task)
    return _adapter(output.mean, output.basis, output.coefficients, task)
