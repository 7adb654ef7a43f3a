r"""Singular-vector merges: Task Singular Vectors (TSV-M) and isotropic merging (Iso-C, Iso-CTS).

All three work per parameter matrix. For a 2-D leaf let the task matrices be
:math:`\Delta_t \in \mathbb{R}^{m\times n}` (:math:`t = 1..T`), :math:`p = \min(m, n)`, and
write :math:`\mathrm{polar}(A) = PQ^\top` for the orthogonal factor of
:math:`A = P\Sigma Q^\top` (the nearest matrix with orthonormal columns, or rows when
:math:`A` is wide).

**TSV-M** (Gargiulo et al., CVPR 2025). Each :math:`\Delta_t = U_t S_t V_t^\top` is
truncated to its top :math:`k = \lfloor p\,\rho\rfloor` singular triplets
(:math:`\rho = 1/T` by default). The truncated singular vectors of all tasks are
concatenated, :math:`U = [U_{1,:k} \cdots U_{T,:k}]`, :math:`S = \mathrm{diag}(S_{1,:k},\dots)`,
:math:`V = [V_{1,:k} \cdots V_{T,:k}]`, and decorrelated (the paper's whitening, done by
the orthogonal Procrustes projection) before the reconstruction

.. math::
   \Delta = \mathrm{polar}(U)\; S\; \mathrm{polar}(V)^\top .

**Iso-C** (Marczak et al., ICML 2025). The sum :math:`\Delta = \sum_t \Delta_t = U S V^\top`
keeps its singular vectors and gets a flat spectrum,
:math:`\Delta_{\mathrm{iso}} = \bar\sigma\, U V^\top` with
:math:`\bar\sigma = \frac1p\sum_i\sigma_i`.

**Iso-CTS** (same paper). The top :math:`k_c` left singular vectors :math:`U_c` of the sum
span the *common* subspace; each task contributes its top :math:`d` singular triplets of
the part of :math:`\Delta_t` outside it, :math:`(I - U_cU_c^\top)\Delta_t`; the common and
task-specific vectors are concatenated, orthogonalised with :math:`\mathrm{polar}` as in
TSV-M, and the spectrum is made flat: :math:`\Delta = \bar\sigma\,\mathrm{polar}(U)\,
\mathrm{polar}(V)^\top`, :math:`\bar\sigma` the mean of the :math:`p` concatenated singular
values. With :math:`f` the ``common_fraction``, :math:`k_c = \lfloor pf\rfloor` is then
adjusted so that :math:`p - k_c` is the multiple of :math:`T` nearest to it, and
:math:`d = (p - k_c)/T` (FusionBench's rule, so every task gets the same number of
directions).

Leaves that are not matrices (biases, scalars, conv kernels) are averaged, as FusionBench
does: :math:`\frac1T\sum_t\tau_t`. Every method ends with a scaling :math:`\alpha`
(``scaling``) of the merged task vector. To keep a matrix out of the SVD (FusionBench's
``exclude_keys``), give it another merger with the per-leaf control of
:mod:`fusionjax.merging`.

Layout: TSV-M and Iso-C are unchanged by transposing every matrix (the singular values and
the roles of :math:`U` and :math:`V` just swap), so flax ``[in, out]`` and torch
``[out, in]`` kernels give the same merge. Iso-CTS is not: it removes the common subspace
from the *output* space (the column space of a torch weight). ``output_axis`` says which
axis of a leaf is the output: ``-1`` (default) for flax ``Dense`` kernels, ``0`` for
torch-layout weights.

What costs time, and what is done about it: per matrix, ``T`` thin SVDs of ``[m, n]``
(Iso-C: one) plus two SVDs of the concatenations (``[m, Tk]`` and ``[Tk, n]``), i.e.
:math:`O(T\,mn\,p)`. The steps are leafwise, so :func:`fusionjax.merge` runs them leaf by
leaf (and streams them from checkpoints); nothing is materialised beyond one leaf's
stacked task vectors and its factors. The truncation rank is static (it decides shapes):
each ``rank_fraction`` or ``common_fraction`` value compiles once per leaf shape.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Step
from fusionjax._src.merge import chain
from fusionjax.merging._linear import scale
from fusionjax.merging._linear import sum_rows

_HIGHEST = jax.lax.Precision.HIGHEST


def _mean(x):
    return sum_rows(x) / x.shape[0]


def _polar(a: jax.Array) -> jax.Array:
    r"""The orthogonal factor :math:`PQ^\top` of ``a`` (thin SVD)."""
    p, _, qt = jnp.linalg.svd(a, full_matrices=False)
    return jnp.matmul(p, qt, precision=_HIGHEST)


def _reconstruct(u, s, vt):
    return jnp.matmul(u * s[None, :], vt, precision=_HIGHEST)


def tsv_rank(p: int, num_models: int, rank_fraction: float | None) -> int:
    """Singular triplets kept per task: ``int(p * rank_fraction)`` (``1/T`` when ``None``)."""
    frac = 1.0 / num_models if rank_fraction is None else float(rank_fraction)
    return int(p * frac)


def _tsv(x, *, rank_fraction=None, **_):
    n_models = x.shape[0]
    if x.ndim != 3:
        return _mean(x)
    m, n = x.shape[1:]
    k = tsv_rank(min(m, n), n_models, rank_fraction)
    if k == 0:  # FusionBench: nothing kept, the matrix's merged update is zero
        return jnp.zeros((m, n), x.dtype)
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)  # one batched SVD over the T tasks
    ucat = jnp.swapaxes(u[:, :, :k], 0, 1).reshape(m, n_models * k)  # [U_1,:k ... U_T,:k]
    vtcat = vt[:, :k, :].reshape(n_models * k, n)
    return _reconstruct(_polar(ucat), s[:, :k].reshape(-1), _polar(vtcat))


def _check_fraction(name, value, *, allow_none):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{name} must be a Python number (it decides the kept rank, a shape), got {value!r}."
        )
    validation.check_hparam(name, value, lower=0.0, upper=1.0, lower_open=name == "rank_fraction")
    return float(value)


def tsv_merge(*, rank_fraction: float | None = None, scaling: ArrayLike = 1.0) -> Step:
    r"""TSV-M: merge the low-rank task singular vectors of every matrix after decorrelating them.

    Per 2-D leaf, each task matrix keeps its top :math:`k = \lfloor p\rho\rfloor` singular
    triplets (:math:`p = \min(m, n)`); the kept :math:`U_t`, :math:`V_t` of all tasks are
    concatenated and replaced by their orthogonal (polar) factors, and

    .. math::
       \Delta = \mathrm{polar}([U_{1,:k}\cdots U_{T,:k}])\;
       \mathrm{diag}(S_{1,:k},\dots,S_{T,:k})\;
       \mathrm{polar}([V_{1,:k}\cdots V_{T,:k}])^\top,\qquad
       \theta = \theta_0 + \alpha\,\Delta .

    Other leaves get the mean task vector. With one model and ``rank_fraction=1`` the
    result is that model. As in FusionBench, when :math:`Tk \le p` the concatenations
    are padded to :math:`p` columns there, which gives the same merge whenever they
    have full rank (the generic case); ``rank_fraction > 1/T`` (:math:`Tk > p`) is
    allowed here and orthogonalises the wide concatenations, FusionBench cannot express
    it. When :math:`k = 0` (a matrix with fewer than ``T`` rows or columns at the default
    fraction) the matrix's merged update is zero, as in FusionBench.

    Args:
      rank_fraction: Fraction :math:`\rho` of each matrix's rank :math:`p` kept per task;
        ``None`` (default, the paper's choice) is :math:`1/T`. Static: a Python number
        in ``(0, 1]``.
      scaling: Multiplier :math:`\alpha` of the merged task vector (the paper and
        FusionBench use 1).

    Returns:
      A leafwise merger ``chain(tsv, scale(scaling))`` for :func:`fusionjax.merge`.

    Raises:
      ValueError: if ``rank_fraction`` is not in ``(0, 1]`` or ``scaling`` is NaN.
      TypeError: if ``rank_fraction`` is not a Python number.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> base = {"w": jnp.zeros((2, 2))}
      >>> a, b = {"w": jnp.diag(jnp.array([3.0, 1.0]))}, {"w": jnp.diag(jnp.array([1.0, 2.0]))}
      >>> merged = fj.merge(base, [a, b], fj.merging.tsv_merge())  # rank 1 of each
      >>> [[round(abs(v), 4) for v in row] for row in merged["w"].tolist()]
      [[3.0, 0.0], [0.0, 2.0]]

    References:
      Gargiulo et al, `Task Singular Vectors: Reducing Task Interference in Model Merging
      <https://arxiv.org/abs/2412.00081>`_, CVPR 2025
    """
    frac = _check_fraction("rank_fraction", rank_fraction, allow_none=True)
    validation.check_hparam("scaling", scaling)
    step = Step("tsv_merge", _tsv, reduces=True, options={"rank_fraction": frac})
    return chain(step, scale(scaling))


def _iso_c(x, **_):
    if x.ndim != 3:
        return _mean(x)
    u, s, vt = jnp.linalg.svd(sum_rows(x), full_matrices=False)
    return jnp.mean(s) * jnp.matmul(u, vt, precision=_HIGHEST)


def iso_c(*, scaling: ArrayLike = 1.0) -> Step:
    r"""Iso-C: the summed task matrix with a flat (isotropic) spectrum.

    Per 2-D leaf, :math:`\sum_t \Delta_t = U\,\mathrm{diag}(\sigma)\,V^\top` and

    .. math::
       \Delta = \bar\sigma\, U V^\top,\quad \bar\sigma = \frac1p\sum_{i=1}^{p}\sigma_i,
       \qquad \theta = \theta_0 + \alpha\,\Delta .

    Every direction the tasks span gets the same weight, so a task whose directions have
    small singular values in the sum is not drowned out. Other leaves get the mean task
    vector (FusionBench). Transposing the matrices changes nothing, so the layout of the
    kernels does not matter.

    Args:
      scaling: Multiplier :math:`\alpha` of the merged task vector (the paper picks it on
        validation data; FusionBench's default is 1).

    Returns:
      A leafwise merger ``chain(iso_c, scale(scaling))`` for :func:`fusionjax.merge`.

    Raises:
      ValueError: if ``scaling`` is NaN.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> base = {"w": jnp.zeros((2, 2))}
      >>> a, b = {"w": jnp.diag(jnp.array([3.0, 0.0]))}, {"w": jnp.diag(jnp.array([0.0, 1.0]))}
      >>> merged = fj.merge(base, [a, b], fj.merging.iso_c())  # spectrum (3, 1) -> (2, 2)
      >>> merged["w"].tolist()
      [[2.0, 0.0], [0.0, 2.0]]

    References:
      Marczak et al, `No Task Left Behind: Isotropic Model Merging with Common and
      Task-Specific Subspaces <https://arxiv.org/abs/2502.04959>`_, ICML 2025
    """
    validation.check_hparam("scaling", scaling)
    return chain(Step("iso_c", _iso_c, reduces=True), scale(scaling))


def iso_cts_sizes(p: int, num_models: int, common_fraction: float) -> tuple[int, int]:
    r"""``(k_c, d)``: common-subspace size and directions per task (FusionBench's rule).

    :math:`k_c = \lfloor pf\rfloor`, then :math:`p - k_c` is rounded (Python's
    round-half-even, as FusionBench) to a multiple of ``T``; when that exceeds ``p``
    (only for ``p < T``) the per-task count is :math:`\lfloor p/T\rfloor` instead.
    """
    kc = int(p * common_fraction)
    d = round((p - kc) / num_models)
    if num_models * d > p:
        d = p // num_models
    return p - num_models * d, d


def _iso_cts(x, *, common_fraction, output_axis=-1, **_):
    n_models = x.shape[0]
    if x.ndim != 3:
        return _mean(x)
    flip = output_axis in (-1, 1)  # the paper's U is the output space: rows of [out, in]
    if flip:
        x = jnp.swapaxes(x, 1, 2)
    m, n = x.shape[1:]
    kc, d = iso_cts_sizes(min(m, n), n_models, common_fraction)
    u, s, vt = jnp.linalg.svd(sum_rows(x), full_matrices=False)
    uc = u[:, :kc]
    us, ss, vts = [], [], []
    if d > 0:
        # every task's residual outside the common subspace, then one batched SVD
        proj = jnp.einsum("ij,tjk->tik", uc.T, x, precision=_HIGHEST)
        w = x - jnp.einsum("ij,tjk->tik", uc, proj, precision=_HIGHEST)
        ut, st, vtt = jnp.linalg.svd(w, full_matrices=False)
        us.append(jnp.swapaxes(ut[:, :, :d], 0, 1).reshape(m, n_models * d))
        ss.append(st[:, :d].reshape(-1))
        vts.append(vtt[:, :d, :].reshape(n_models * d, n))
    us.append(uc)
    ss.append(s[:kc])
    vts.append(vt[:kc])
    out = jnp.mean(jnp.concatenate(ss)) * jnp.matmul(
        _polar(jnp.concatenate(us, axis=1)), _polar(jnp.concatenate(vts, axis=0)),
        precision=_HIGHEST,
    )
    return out.T if flip else out


def iso_cts(
    *, common_fraction: float = 0.8, scaling: ArrayLike = 1.0, output_axis: int = -1
) -> Step:
    r"""Iso-CTS: an isotropic merge over a common subspace plus task-specific directions.

    Per 2-D leaf, in the output space (see ``output_axis``): the top :math:`k_c` left
    singular vectors :math:`U_c` of :math:`\sum_t\Delta_t` (with values :math:`\sigma_c`,
    right vectors :math:`V_c`) are the common subspace; each task adds the top :math:`d`
    singular triplets :math:`(U_t, S_t, V_t)` of its residual :math:`(I - U_cU_c^\top)\Delta_t`;
    then

    .. math::
       \Delta = \bar\sigma\;\mathrm{polar}([U_1\cdots U_T\,U_c])\;
       \mathrm{polar}([V_1\cdots V_T\,V_c])^\top,\qquad
       \theta = \theta_0 + \alpha\,\Delta,

    with :math:`\bar\sigma` the mean of all :math:`p` concatenated singular values
    (:math:`S_1,\dots,S_T,\sigma_c`). :math:`k_c = \lfloor p f\rfloor` adjusted so that
    :math:`Td = p - k_c` (see :func:`iso_cts_sizes`). ``common_fraction=1`` is
    :func:`iso_c`. Other leaves get the mean task vector (FusionBench).

    Args:
      common_fraction: Fraction :math:`f` of each matrix's rank given to the common
        subspace (FusionBench's default 0.8). Static: a Python number in ``[0, 1]``.
      scaling: Multiplier :math:`\alpha` of the merged task vector (the paper picks it on
        validation data; FusionBench's default is 1).
      output_axis: The output axis of 2-D leaves: ``-1`` or ``1`` for flax ``[in, out]``
        kernels (default), ``0`` or ``-2`` for torch-layout ``[out, in]`` weights (what
        FusionBench merges).

    Returns:
      A leafwise merger ``chain(iso_cts, scale(scaling))`` for :func:`fusionjax.merge`.

    Raises:
      ValueError: if ``common_fraction`` is not in ``[0, 1]``, ``output_axis`` is not one
        of -2, -1, 0, 1, or ``scaling`` is NaN.
      TypeError: if ``common_fraction`` is not a Python number.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> base = {"w": jnp.zeros((2, 2))}
      >>> a, b = {"w": jnp.diag(jnp.array([3.0, 0.0]))}, {"w": jnp.diag(jnp.array([0.0, 1.0]))}
      >>> merged = fj.merge(base, [a, b], fj.merging.iso_cts(common_fraction=0.5))
      >>> [[round(abs(v), 4) for v in row] for row in merged["w"].tolist()]
      [[2.0, 0.0], [0.0, 2.0]]

    References:
      Marczak et al, `No Task Left Behind: Isotropic Model Merging with Common and
      Task-Specific Subspaces <https://arxiv.org/abs/2502.04959>`_, ICML 2025
    """
    frac = _check_fraction("common_fraction", common_fraction, allow_none=False)
    if isinstance(output_axis, bool) or output_axis not in (-2, -1, 0, 1):
        raise ValueError(
            f"output_axis must be one of -2, -1, 0, 1 (an axis of a matrix), got {output_axis!r}."
        )
    validation.check_hparam("scaling", scaling)
    step = Step(
        "iso_cts",
        _iso_cts,
        reduces=True,
        options={"common_fraction": frac, "output_axis": int(output_axis)},
    )
    return chain(step, scale(scaling))

