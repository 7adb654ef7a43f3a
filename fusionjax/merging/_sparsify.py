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
from fusionjax.merging._ties import disjoint_mean
from fusionjax.merging._ties import elect_sign
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


def drop_extremes(
    *,
    density: ArrayLike = 0.15,
    gamma: ArrayLike = 0.01,
    scope: Literal["leaf", "model"] = "leaf",
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

    Returns:
      A task-vector :class:`fusionjax.Step` ``[T, ...] -> [T, ...]``.

    References:
      Davari & Belilovsky, `Model Breadcrumbs: Scaling Multi-Task Model Merging
      with Sparse Masks <https://arxiv.org/abs/2312.06795>`_, ECCV 2024
    """
    validation.check_hparam("density", density, lower=0.0, upper=1.0, lower_open=True)
    validation.check_hparam("gamma", gamma, lower=0.0, upper=1.0, upper_open=True)
    if scope not in ("leaf", "model"):
        raise ValueError(f"scope must be 'leaf' or 'model', got {scope!r}.")
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
) -> Step:
    r"""Model Breadcrumbs: task arithmetic on task vectors masked by :func:`drop_extremes`.

    :math:`\theta = \theta_0 + \lambda\sum_t m_t\odot\tau_t`.

    Args:
      density: Fraction of entries kept per layer (see :func:`drop_extremes`).
      gamma: Fraction of the largest entries dropped per layer.
      scaling: :math:`\lambda`, as in task arithmetic.
      scope: ``"leaf"`` (per layer, the paper) or ``"model"``, see :func:`drop_extremes`.

    Returns:
      A merger for :func:`fusionjax.merge`.

    References:
      Davari & Belilovsky, `Model Breadcrumbs <https://arxiv.org/abs/2312.06795>`_,
      ECCV 2024
    """
    return chain(
        drop_extremes(density=density, gamma=gamma, scope=scope),
        _linear.sum(),
        _linear.scale(scaling),
    )


def _ranks01(mag: jax.Array) -> jax.Array:
    """Normalised magnitude ranks in [0, 1] over all axes but the first and last."""
    t = mag.shape[0]
    if mag.ndim <= 2:
        flat = mag.reshape(t, 1, -1)
    else:
        flat = jnp.moveaxis(mag.reshape(t, -1, mag.shape[-1]), -1, 1)
    n = flat.shape[-1]
    ranks = jnp.argsort(jnp.argsort(flat, axis=-1), axis=-1).astype(mag.dtype)
    r01 = ranks / jnp.maximum(n - 1, 1)
    if mag.ndim <= 2:
        return r01.reshape(mag.shape)
    return jnp.moveaxis(r01, 1, -1).reshape(mag.shape)


def _concrete_numbers(v) -> bool:
    return validation.is_concrete(v) and not isinstance(v, LeafValue)


def _magnitude_drop(x, *, key, density, epsilon, **_):
    keys_lib.require_key(key, "magnitude_drop")
    shape = (-1,) + (1,) * (x.ndim - 1)
    d = density.astype(x.dtype).reshape(shape)
    e = epsilon.astype(x.dtype).reshape(shape)
    q = d - e + 2 * e * _ranks01(jnp.abs(x))
    keep = jax.random.uniform(key, x.shape, x.dtype) < q
    return jnp.where(keep, x / q, jnp.zeros((), x.dtype))


def magnitude_drop(*, density: ArrayLike = 0.5, epsilon: ArrayLike = 0.1) -> Step:
    r"""DELLA's MagPrune: random drop with keep probabilities ranked by magnitude.

    Within each output unit (for a kernel ``[..., d_out]``, over all its other
    axes; for a vector, over the whole leaf) entries are ranked by
    :math:`|\tau_{t,i}|`. Entry of normalised rank :math:`r_i\in[0,1]`
    (0 smallest) is kept with probability
    :math:`q_i = \rho - \epsilon + 2\epsilon r_i` and rescaled by :math:`1/q_i`,
    so :math:`\mathbb{E}[\hat\tau] = \tau` and the mean keep rate is :math:`\rho`.
    Random: needs ``key``. Ranking sorts each unit's entries.

    Args:
      density: :math:`\rho`, mean fraction kept (:math:`1 - p` in the paper).
      epsilon: :math:`\epsilon`, half-width of the keep-probability range;
        :math:`\rho\pm\epsilon` must lie in :math:`(0, 1]`.

    Returns:
      A random task-vector :class:`fusionjax.Step` ``[T, ...] -> [T, ...]``.

    References:
      Deep et al, `DELLA-Merging: Reducing Interference in Model Merging through
      Magnitude-Based Sampling <https://arxiv.org/abs/2406.11617>`_, 2024
    """
    validation.check_hparam("density", density, lower=0.0, upper=1.0, lower_open=True)
    validation.check_hparam("epsilon", epsilon, lower=0.0)
    if _concrete_numbers(density) and _concrete_numbers(epsilon):
        d, e = np.asarray(density, np.float64), np.asarray(epsilon, np.float64)
        if np.any(d - e <= 0.0) or np.any(d + e > 1.0):
            raise ValueError(
                f"density ± epsilon must lie in (0, 1], got density={d.tolist()}, "
                f"epsilon={e.tolist()}."
            )
    return Step(
        "magnitude_drop",
        _magnitude_drop,
        reduces=False,
        hparams={"density": density, "epsilon": epsilon},
        per_model=("density", "epsilon"),
        needs_key=True,
    )


def della(
    *, density: ArrayLike = 0.5, epsilon: ArrayLike = 0.1, scaling: ArrayLike = 1.0
) -> Step:
    r"""DELLA-merging: MagPrune, elect sign, disjoint mean, scale.

    ``chain(magnitude_drop(density, epsilon), elect_sign(), disjoint_mean(),
    scale(scaling))``.

    Args:
      density: Mean fraction of entries kept (see :func:`magnitude_drop`).
      epsilon: Half-width of the keep-probability range.
      scaling: :math:`\lambda`.

    Returns:
      A random merger for :func:`fusionjax.merge` (pass ``key=``).

    References:
      Deep et al, `DELLA-Merging <https://arxiv.org/abs/2406.11617>`_, 2024
    """
    return chain(
        magnitude_drop(density=density, epsilon=epsilon),
        elect_sign(),
        disjoint_mean(),
        _linear.scale(scaling),
    )
