"""Magnitude-aware sparsification: Model Breadcrumbs and DELLA's MagPrune."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import keys as keys_lib
from fusionjax._src import quantile
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import LeafValue
from fusionjax._src.base import Step
from fusionjax._src.merge import chain
from fusionjax.merging import _linear
from fusionjax.merging._ties import _MagnitudeThreshold
from fusionjax.merging._ties import _merger
from fusionjax.merging._ties import ascending_ranks
from fusionjax.merging._ties import check_choice
from fusionjax.merging._ties import convention_default
from fusionjax.merging._ties import elect_sign
from fusionjax.merging._ties import l1_rescale
from fusionjax.merging._ties import num_kept


def _band_ranks(hp, n):
    """Ranks ``[T, 2]`` of the outlier and the end thresholds among ``n`` magnitudes."""
    k_top = num_kept(hp["gamma"], n)
    k_end = k_top + num_kept(hp["density"], n)
    stack = np.stack if validation.is_concrete(k_end) else jnp.stack
    return stack([k_top, k_end], axis=-1)


def _keep_band(x, thr):
    """Zeroes the entries of row ``t`` outside ``thr[t, 1] <= |x| < thr[t, 0]``."""
    zero = jnp.zeros((), x.dtype)
    rows = []
    for t in range(x.shape[0]):
        mag = jnp.abs(x[t])
        rows.append(jnp.where((mag < thr[t, 0]) & (mag >= thr[t, 1]), x[t], zero))
    return jnp.stack(rows)


def _prepare_drop_extremes(hp, info):
    return {"ks": _band_ranks(hp, info.size)}


def _drop_extremes(x, *, ks, **_):
    return _keep_band(x, quantile.kth_largest([x], ks))


def _prepare_drop_extremes_model(hp, info):
    # thresholds [T, 2] are filled in by the model-wide statistic before the leaf pass
    return {"k": _band_ranks(hp, info.model_size), "thresholds": np.zeros((info.num_models, 2))}


def _drop_extremes_model(x, *, thresholds, **_):
    return _keep_band(x, thresholds.astype(x.dtype))


def _prepare_drop_extremes_mergekit(hp, info):
    n = info.size
    if validation.is_concrete(hp["density"]) and validation.is_concrete(hp["gamma"]):
        d = np.asarray(hp["density"], np.float64)
        g = np.asarray(hp["gamma"], np.float64)
        xp = np
    else:
        d = jnp.asarray(hp["density"], jnp.float32)
        g = jnp.asarray(hp["gamma"], jnp.float32)
        xp = jnp
    target, top, all_ = xp.floor(d * n), xp.floor(g * n), d >= 1.0
    bot = xp.maximum(n - target - top, 0)
    lo = xp.where(all_, 0, bot)  # density >= 1 keeps everything: [0, n)
    hi = xp.where(all_, n, bot + target)
    return {"bounds": xp.stack([lo, hi], axis=-1).astype(np.int32)}


def _drop_extremes_mergekit(x, *, bounds, rescale, **_):
    ranks = ascending_ranks(jnp.abs(x))
    shape = (-1,) + (1,) * (x.ndim - 1)
    keep = (ranks >= bounds[:, 0].reshape(shape)) & (ranks < bounds[:, 1].reshape(shape))
    masked = jnp.where(keep, x, jnp.zeros((), x.dtype))
    return l1_rescale(x, masked) if rescale == "l1" else masked


def drop_extremes(
    *,
    density: ArrayLike = 0.15,
    gamma: ArrayLike = 0.01,
    scope: Literal["leaf", "model"] = "leaf",
    count: Literal["ceil", "mergekit"] = "ceil",
    rescale: Literal["none", "l1"] = "none",
) -> Step:
    r"""Model Breadcrumbs mask: drops the largest and the smallest magnitudes.

    Per task vector and per leaf (the paper masks layer by layer), the
    :math:`\lceil\gamma n\rceil` largest :math:`|\tau_{t,i}|` (outliers) are
    zeroed, the next :math:`\lceil\rho n\rceil` are kept, and the rest (the
    negligible perturbations) are zeroed.

    Args:
      density: :math:`\rho`, fraction of entries kept. The paper masks about the
        bottom 85% per layer, i.e. ``density`` around 0.15. One value, or one per
        model (shape ``[T]``), as for ``gamma``.
      gamma: :math:`\gamma`, fraction of the largest entries dropped as outliers.
      scope: ``"leaf"`` masks layer by layer (the paper); ``"model"`` ranks the
        magnitudes over the whole model (a model-wide statistic, streamed: two extra
        reads of every leaf).
      count: ``"ceil"`` (above) or ``"mergekit"`` (its ``magnitude_outliers``):
        with :math:`k=\lfloor\rho n\rfloor`, :math:`g=\lfloor\gamma n\rfloor`
        and :math:`b=\max(0, n-k-g)`, the entries of increasing-magnitude rank
        :math:`b,\dots,b+k-1` are kept (exactly :math:`k`, ties by index; the
        outliers removed shrink when :math:`k+g>n`); :math:`\rho\ge1` keeps
        everything. Leaf scope only.
      rescale: ``"none"`` or ``"l1"`` (mergekit's ``rescale: true``, see
        :func:`fusionjax.merging.l1_rescale`); ``"l1"`` needs ``count="mergekit"``.

    Returns:
      A task-vector :class:`fusionjax.Step` ``[T, ...] -> [T, ...]``.

    References:
      Davari & Belilovsky, `Model Breadcrumbs: Scaling Multi-Task Model Merging
      with Sparse Masks <https://arxiv.org/abs/2312.06795>`_, ECCV 2024
    """
    validation.check_hparam("gamma", gamma, lower=0.0, upper=1.0, upper_open=True)
    check_choice("scope", scope, ("leaf", "model"))
    check_choice("count", count, ("ceil", "mergekit"))
    check_choice("rescale", rescale, ("none", "l1"))
    if rescale != "none" and count != "mergekit":
        raise ValueError("rescale='l1' is mergekit's: it needs count='mergekit'.")
    if count == "mergekit":
        if scope != "leaf":
            raise ValueError("count='mergekit' ranks within each tensor: it needs scope='leaf'.")
        validation.check_hparam("density", density, lower=0.0)
        return Step(
            "drop_extremes(mergekit)",
            _drop_extremes_mergekit,
            reduces=False,
            hparams={"density": density, "gamma": gamma},
            options={"rescale": rescale},
            per_model=("density", "gamma"),
            prepare=_prepare_drop_extremes_mergekit,
        )
    validation.check_hparam("density", density, lower=0.0, upper=1.0, lower_open=True)
    if scope == "model":
        return Step(
            "drop_extremes(model)",
            _drop_extremes_model,
            reduces=False,
            flat=True,
            hparams={"density": density, "gamma": gamma, "thresholds": 0.0},
            per_model=("density", "gamma"),
            prepare=_prepare_drop_extremes_model,
            statistic=_MagnitudeThreshold(output="thresholds"),
        )
    return Step(
        "drop_extremes",
        _drop_extremes,
        flat=True,
        reduces=False,
        hparams={"density": density, "gamma": gamma},
        per_model=("density", "gamma"),
        prepare=_prepare_drop_extremes,
    )


def breadcrumbs(
    *,
    density: ArrayLike = 0.15,
    gamma: ArrayLike = 0.01,
    scaling: ArrayLike = 0.3,
    scope: Literal["leaf", "model"] = "leaf",
    weights: ArrayLike | None = None,
    normalize: bool = False,
    count: Literal["ceil", "mergekit"] | None = None,
    rescale: Literal["none", "l1"] = "none",
    convention: Literal["fusionjax", "mergekit"] = "fusionjax",
) -> Step:
    r"""Model Breadcrumbs: task arithmetic on task vectors masked by :func:`drop_extremes`.

    :math:`\theta = \theta_0 + \lambda\sum_t w_t\, m_t\odot\tau_t` (divided by
    :math:`\sum_t w_t` when ``normalize``).

    Args:
      density: Fraction of entries kept per layer (see :func:`drop_extremes`).
      gamma: Fraction of the largest entries dropped per layer.
      scaling: :math:`\lambda`, as in task arithmetic (mergekit's ``lambda``).
      scope: ``"leaf"`` (per layer, the paper) or ``"model"``, see :func:`drop_extremes`.
      weights: Optional per-model weights (mergekit's ``weight``).
      normalize: Divide by :math:`\sum_t w_t` (mergekit's ``normalize``, default
        false; weights then non-negative).
      count: See :func:`drop_extremes`; default ``"ceil"``, mergekit ``"mergekit"``.
      rescale: See :func:`drop_extremes`.
      convention: ``"fusionjax"`` or ``"mergekit"``: the default of ``count``.

    Returns:
      A merger for :func:`fusionjax.merge`.

    References:
      Davari & Belilovsky, `Model Breadcrumbs <https://arxiv.org/abs/2312.06795>`_,
      ECCV 2024
    """
    count = convention_default(convention, count, fusionjax="ceil", mergekit="mergekit")
    return chain(
        drop_extremes(density=density, gamma=gamma, scope=scope, count=count, rescale=rescale),
        _linear.mean(weights) if normalize else _linear.sum(weights),
        _linear.scale(scaling),
    )


def breadcrumbs_ties(
    *,
    density: ArrayLike = 0.15,
    gamma: ArrayLike = 0.01,
    scaling: ArrayLike = 1.0,
    weights: ArrayLike | None = None,
    merge: Literal["mean", "sum"] = "sum",
    count: Literal["ceil", "mergekit"] | None = None,
    zero_sign: Literal["drop", "positive", "majority"] | None = None,
    rescale: Literal["none", "l1"] = "none",
    convention: Literal["fusionjax", "mergekit"] = "fusionjax",
) -> Step:
    r"""Breadcrumbs mask, TIES' sign election, a merge: mergekit's ``breadcrumbs_ties``.

    ``chain(drop_extremes(density, gamma), elect_sign(weights), merger, scale(λ))``:
    :math:`\hat\tau_t = m_t\odot\tau_t` with the band mask of :func:`drop_extremes`,
    :math:`\gamma = \mathrm{sgn}\sum_t w_t\hat\tau_t`, then
    :math:`\tau = \lambda\sum_{t:\,\mathrm{sgn}(w_t\hat\tau_t)=\gamma} w_t\hat\tau_t`
    (``merge="sum"``, mergekit's default ``normalize: false``) or that sum divided by
    the surviving weights (``"mean"``).

    Args:
      density: Fraction kept per tensor, see :func:`drop_extremes`.
      gamma: Fraction of the largest magnitudes dropped.
      scaling: :math:`\lambda` (mergekit's ``lambda``).
      weights: Optional per-model weights (mergekit's ``weight``).
      merge: ``"sum"`` or ``"mean"`` (mergekit's ``normalize: true``).
      count: See :func:`drop_extremes`; default by convention.
      zero_sign: See :func:`elect_sign`; default by convention.
      rescale: See :func:`drop_extremes`.
      convention: ``"fusionjax"`` or ``"mergekit"``.

    Returns:
      A merger for :func:`fusionjax.merge`.

    References:
      Davari & Belilovsky, `Model Breadcrumbs <https://arxiv.org/abs/2312.06795>`_,
      ECCV 2024; Yadav et al, `TIES-Merging <https://arxiv.org/abs/2306.01708>`_
    """
    count = convention_default(convention, count, fusionjax="ceil", mergekit="mergekit")
    zero_sign = convention_default(convention, zero_sign, fusionjax="drop", mergekit="positive")
    check_choice("merge", merge, ("mean", "sum"))
    return chain(
        drop_extremes(density=density, gamma=gamma, count=count, rescale=rescale),
        elect_sign(zero=zero_sign, weights=weights),
        _merger(merge, weights),
        _linear.scale(scaling),
    )


def _ranks01(mag: jax.Array, rank_axis: int | None = None) -> jax.Array:
    """Normalised magnitude ranks in [0, 1] within groups of a stacked leaf ``[T, ...]``.

    ``rank_axis=None``: over all axes but the first and last (per output unit of
    a flax kernel ``[..., d_out]``; a vector as a whole). An int: along that axis
    of the leaf only (a vector as a whole), ties by index.
    """
    t = mag.shape[0]
    if rank_axis is not None:
        if mag.ndim <= 2:
            return _ranks01(mag, None)
        ax = rank_axis % (mag.ndim - 1) + 1
        moved = jnp.moveaxis(mag, ax, -1)
        n = moved.shape[-1]
        ranks = jnp.argsort(jnp.argsort(moved, axis=-1, stable=True), axis=-1).astype(mag.dtype)
        return jnp.moveaxis(ranks / jnp.maximum(n - 1, 1), -1, ax)
    if mag.ndim <= 2:
        flat = mag.reshape(t, 1, -1)
    else:
        flat = jnp.moveaxis(mag.reshape(t, -1, mag.shape[-1]), -1, 1)
    n = flat.shape[-1]
    ranks = jnp.argsort(jnp.argsort(flat, axis=-1, stable=True), axis=-1).astype(mag.dtype)
    r01 = ranks / jnp.maximum(n - 1, 1)
    if mag.ndim <= 2:
        return r01.reshape(mag.shape)
    return jnp.moveaxis(r01, 1, -1).reshape(mag.shape)


def _concrete_numbers(v) -> bool:
    return validation.is_concrete(v) and not isinstance(v, LeafValue)


def _magnitude_drop(x, *, key, density, epsilon, rank_axis=None, rescale="inverse", **_):
    keys_lib.require_key(key, "magnitude_drop")
    shape = (-1,) + (1,) * (x.ndim - 1)
    d = density.astype(x.dtype).reshape(shape)
    e = epsilon.astype(x.dtype).reshape(shape)
    q = d - e + 2 * e * _ranks01(jnp.abs(x), rank_axis)
    keep = jax.random.uniform(key, x.shape, x.dtype) < q
    zero = jnp.zeros((), x.dtype)
    if rescale == "inverse":
        return jnp.where(keep, x / q, zero)
    masked = jnp.where(keep, x, zero)
    if rescale == "l1":
        masked = l1_rescale(x, masked)
    return jnp.where(d >= 1, x, masked)  # mergekit: density >= 1 leaves the tensor as it is


def magnitude_drop(
    *,
    density: ArrayLike = 0.5,
    epsilon: ArrayLike = 0.1,
    rank_axis: int | None = None,
    rescale: Literal["inverse", "l1", "none"] = "inverse",
) -> Step:
    r"""DELLA's MagPrune: random drop with keep probabilities ranked by magnitude.

    Entries are ranked by :math:`|\tau_{t,i}|` within groups (below). Entry of
    normalised rank :math:`r_i\in[0,1]` (0 smallest, :math:`r=\mathrm{rank}/(n-1)`
    as mergekit's :math:`(r-r_{\min})/(r_{\max}-r_{\min})`) is kept with probability
    :math:`q_i = \rho - \epsilon + 2\epsilon r_i` and rescaled by :math:`1/q_i`,
    so :math:`\mathbb{E}[\hat\tau] = \tau` and the mean keep rate is :math:`\rho`.
    Random: needs ``key``. Ranking sorts each group's entries.

    Groups (``rank_axis``). ``None``: per output unit, over all other axes, for a
    flax kernel ``[..., d_out]``; a vector as a whole. An int: along that one axis,
    one group per index of the other axes (a vector as a whole). mergekit ranks
    along dim 1 of torch's layout (``argsort(dim=1)``, 1-D tensors as one row):
    for a torch ``Linear`` weight ``(out, in)`` that is each output unit's ``in``
    entries. The same groups on a flax ``Dense`` kernel ``(in, out)`` (the
    transpose) are its columns, which is what ``None`` (or ``rank_axis=0``)
    does; on leaves still in torch layout (safetensors read without a layout map)
    pass ``rank_axis=1``. For conv kernels (torch ``(out, in, kh, kw)``, ranked
    over ``in``) and untransposed embeddings (``(vocab, d)``, ranked over ``d``)
    choose the axis that holds those entries in your layout.

    Args:
      density: :math:`\rho`, mean fraction kept (:math:`1 - p` in the paper).
      epsilon: :math:`\epsilon`, half-width of the keep-probability range;
        :math:`\rho\pm\epsilon` must lie in :math:`(0, 1]`.
      rank_axis: ``None`` or the leaf axis ranked along, see above.
      rescale: ``"inverse"`` (the paper, :math:`1/q_i`); ``"l1"`` (mergekit's
        ``rescale: true``: the masked tensor scaled to the unmasked one's L1
        norm, see :func:`fusionjax.merging.l1_rescale`); ``"none"`` (mergekit's
        ``rescale: false``). With ``"l1"``/``"none"`` (mergekit), :math:`\rho\ge1`
        leaves the tensor as it is and :math:`\rho\pm\epsilon` must lie in
        :math:`(0, 1)`.

    Returns:
      A random task-vector :class:`fusionjax.Step` ``[T, ...] -> [T, ...]``.

    References:
      Deep et al, `DELLA-Merging: Reducing Interference in Model Merging through
      Magnitude-Based Sampling <https://arxiv.org/abs/2406.11617>`_, 2024
    """
    check_choice("rescale", rescale, ("inverse", "l1", "none"))
    if rank_axis is not None and not isinstance(rank_axis, int):
        raise TypeError(f"rank_axis must be None or an int, got {rank_axis!r}.")
    mk = rescale != "inverse"
    validation.check_hparam("density", density, lower=0.0, upper=None if mk else 1.0,
                            lower_open=True)
    validation.check_hparam("epsilon", epsilon, lower=0.0)
    if _concrete_numbers(density) and _concrete_numbers(epsilon):
        d, e = np.asarray(density, np.float64), np.asarray(epsilon, np.float64)
        bad = (d - e <= 0.0) | ((d + e >= 1.0) if mk else (d + e > 1.0))
        if mk:
            bad = bad & (d < 1.0)
        if np.any(bad):
            interval = "(0, 1)" if mk else "(0, 1]"
            raise ValueError(
                f"density ± epsilon must lie in {interval}, got density={d.tolist()}, "
                f"epsilon={e.tolist()}."
            )
    options = {}
    if rank_axis is not None:
        options["rank_axis"] = rank_axis
    if mk:
        options["rescale"] = rescale
    return Step(
        "magnitude_drop",
        _magnitude_drop,
        reduces=False,
        hparams={"density": density, "epsilon": epsilon},
        options=options,
        per_model=("density", "epsilon"),
        needs_key=True,
    )


def della(
    *,
    density: ArrayLike = 0.5,
    epsilon: ArrayLike | None = None,
    scaling: ArrayLike = 1.0,
    weights: ArrayLike | None = None,
    merge: Literal["mean", "sum"] = "mean",
    rank_axis: int | None = None,
    rescale: Literal["inverse", "l1", "none"] | None = None,
    zero_sign: Literal["drop", "positive", "majority"] | None = None,
    convention: Literal["fusionjax", "mergekit"] = "fusionjax",
) -> Step:
    r"""DELLA-merging: MagPrune, elect sign, disjoint mean, scale.

    ``chain(magnitude_drop(density, epsilon), elect_sign(), disjoint_mean(),
    scale(scaling))``. ``convention="mergekit"`` (its ``della``): ``rescale="l1"``,
    ``zero_sign="positive"``, ``epsilon`` 0.15; its ``normalize: false`` is
    ``merge="sum"``; see :func:`magnitude_drop` for ``rank_axis``.

    Args:
      density: Mean fraction of entries kept (see :func:`magnitude_drop`).
      epsilon: Half-width of the keep-probability range; default 0.1
        (mergekit 0.15).
      scaling: :math:`\lambda` (mergekit's ``lambda``).
      weights: Optional per-model weights (mergekit's ``weight``), see :func:`ties`.
      merge: ``"mean"`` (disjoint mean) or ``"sum"``.
      rank_axis: See :func:`magnitude_drop`.
      rescale: See :func:`magnitude_drop`; default ``"inverse"`` (mergekit ``"l1"``).
      zero_sign: See :func:`elect_sign`; default ``"drop"`` (mergekit ``"positive"``).
      convention: ``"fusionjax"`` or ``"mergekit"``.

    Returns:
      A random merger for :func:`fusionjax.merge` (pass ``key=``).

    References:
      Deep et al, `DELLA-Merging <https://arxiv.org/abs/2406.11617>`_, 2024
    """
    epsilon = convention_default(convention, epsilon, fusionjax=0.1, mergekit=0.15)
    rescale = convention_default(convention, rescale, fusionjax="inverse", mergekit="l1")
    zero_sign = convention_default(convention, zero_sign, fusionjax="drop", mergekit="positive")
    check_choice("merge", merge, ("mean", "sum"))
    return chain(
        magnitude_drop(density=density, epsilon=epsilon, rank_axis=rank_axis, rescale=rescale),
        elect_sign(zero=zero_sign, weights=weights),
        _merger(merge, weights),
        _linear.scale(scaling),
    )


def della_linear(
    *,
    density: ArrayLike = 0.5,
    epsilon: ArrayLike = 0.15,
    scaling: ArrayLike = 1.0,
    weights: ArrayLike | None = None,
    normalize: bool = False,
    rank_axis: int | None = None,
    rescale: Literal["inverse", "l1", "none"] = "l1",
) -> Step:
    r"""MagPrune then a weighted sum, no sign election: mergekit's ``della_linear``.

    :math:`\tau = \lambda\sum_t w_t\hat\tau_t` (divided by :math:`\sum_t w_t` when
    ``normalize``) with :math:`\hat\tau_t` from :func:`magnitude_drop`. Defaults are
    mergekit's: ``epsilon`` 0.15, ``normalize`` false, ``rescale`` ``"l1"``.

    Args:
      density: Mean fraction kept, see :func:`magnitude_drop`.
      epsilon: Half-width of the keep-probability range.
      scaling: :math:`\lambda` (mergekit's ``lambda``).
      weights: Per-model weights (mergekit's ``weight``); default all 1.
      normalize: Divide by :math:`\sum_t w_t` (weights then non-negative).
      rank_axis: See :func:`magnitude_drop`.
      rescale: See :func:`magnitude_drop`.

    Returns:
      A random merger for :func:`fusionjax.merge` (pass ``key=``).

    References:
      Deep et al, `DELLA-Merging <https://arxiv.org/abs/2406.11617>`_, 2024
    """
    merger = _linear.mean(weights) if normalize else _linear.sum(weights)
    return chain(
        magnitude_drop(density=density, epsilon=epsilon, rank_axis=rank_axis, rescale=rescale),
        merger,
        _linear.scale(scaling),
    )
