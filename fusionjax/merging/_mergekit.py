"""mergekit's own methods with a base model: NearSwap, SCE and Arcee Fusion."""

from __future__ import annotations

import functools
import operator

import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Step
from fusionjax.merging._ties import descending_ranks


def _exactly_one(name):
    def prepare(hp, info):
        if info.num_models != 1:
            raise ValueError(
                f"{name} merges one model into the base (pass finetuned=[model]), got "
                f"{info.num_models} models."
            )
        return hp

    return prepare


# -- NearSwap -----------------------------------------------------------------


def _nearswap(x, *, base, t, **_):
    if x.shape[0] != 1:
        raise ValueError(f"nearswap merges one model into the base, got {x.shape[0]}.")
    a = base
    b = base + x[0]
    w = jnp.clip(t.astype(x.dtype) / jnp.maximum(jnp.abs(a - b), 1e-6), 0.0, 1.0)
    return w * b + (1 - w) * a - a


def nearswap(*, t: ArrayLike) -> Step:
    r"""NearSwap (mergekit's ``nearswap``): take the other model's value where it is near the base.

    With base :math:`a` and the one fine-tuned model :math:`b`, entry by entry:

    .. math::
       w = \mathrm{clip}\Big(\frac{t}{\max(|a-b|, 10^{-6})}, 0, 1\Big),\qquad
       \theta = w\,b + (1-w)\,a .

    Entries that differ by at most :math:`t` are swapped to :math:`b`; larger
    differences move only :math:`t` towards :math:`b`. mergekit's ``nearswap``
    takes exactly two models, one of them the ``base_model``:
    ``fj.merge(base, [other], nearswap(t=...))``.

    Args:
      t: The similarity threshold :math:`t\ge0` (mergekit's ``t``); per-leaf
        values (:func:`fusionjax.merging.by_path`, :func:`gradient`) allowed.

    Returns:
      A leafwise merger for :func:`fusionjax.merge` that takes exactly one model.

    Raises:
      ValueError: if ``t`` is negative or NaN.

    References:
      alchemonaut, `QuartetAnemoi-70B-t0.0001
      <https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001>`_, 2024
    """
    validation.check_hparam("t", t, lower=0.0)
    return Step(
        "nearswap",
        _nearswap,
        reduces=True,
        flat=True,
        hparams={"t": t},
        prepare=_exactly_one("nearswap"),
    )


# -- SCE ----------------------------------------------------------------------


def _sce(x, *, density, select, **_):
    n = x.shape[0]
    dt = x.dtype
    zero = jnp.zeros((), dt)
    if select:  # density < 1: keep the top-k positions by variance over the models
        mean = functools.reduce(operator.add, [x[t] for t in range(n)]) / n
        var = functools.reduce(operator.add, [(x[t] - mean) ** 2 for t in range(n)]) / n
        nonzero = jnp.sum(var != 0).astype(jnp.float32)
        k = jnp.floor(nonzero * density.astype(jnp.float32)).astype(jnp.int32)
        keep = (descending_ranks(var[None])[0] < k) | (density >= 1)
        x = jnp.where(keep[None], x, zero)
    total = functools.reduce(operator.add, [x[t] for t in range(n)])
    sign = jnp.where(total >= 0, jnp.ones((), dt), -jnp.ones((), dt))
    weights = jnp.stack([jnp.mean(x[t] * x[t]) for t in range(n)])
    wsum = jnp.sum(weights)
    weights = jnp.where(jnp.abs(wsum) < 1e-6, 1.0 / n, weights / jnp.where(wsum == 0, 1, wsum))
    ew = [weights[t] * (jnp.sign(x[t]) == sign).astype(dt) for t in range(n)]
    merged = functools.reduce(operator.add, [x[t] * ew[t] for t in range(n)])
    return merged / jnp.maximum(functools.reduce(operator.add, ew), 1e-6)


def sce(*, density: ArrayLike = 1.0) -> Step:
    r"""SCE (FuseChat-2.0 / mergekit's ``sce``): select, calculate, erase, per tensor.

    With task vectors :math:`\tau_t` (:math:`T` models) of one tensor:

    1. **Select** (when :math:`0<\rho<1`): the population variance over the models
       :math:`\sigma^2_i = \frac1T\sum_t(\tau_{t,i}-\bar\tau_i)^2`; the
       :math:`k=\lfloor\rho\cdot\#\{i:\sigma^2_i\ne0\}\rfloor` positions of largest
       variance are kept in every :math:`\tau_t` (ties by index), the others zeroed;
       :math:`\rho\le0` zeroes everything.
    2. **Calculate** weights :math:`w_t = \overline{\tau_t^2} / \sum_s\overline{\tau_s^2}`
       (mean of squares over the tensor; :math:`1/T` if the sum is below 1e-6).
    3. **Erase** minority signs: :math:`\gamma_i = +1` if :math:`\sum_t\tau_{t,i}\ge0`
       else :math:`-1`; :math:`m_{t,i} = [\mathrm{sgn}\,\tau_{t,i} = \gamma_i]`.

    Then :math:`\tau_i = \sum_t w_t m_{t,i}\tau_{t,i} / \max(\sum_t w_t m_{t,i}, 10^{-6})`.

    Args:
      density: :math:`\rho`, mergekit's ``select_topk`` (default 1: no selection).

    Returns:
      A merger for :func:`fusionjax.merge`.

    References:
      Wan et al, `FuseChat: Knowledge Fusion of Chat Models
      <https://arxiv.org/abs/2408.07990>`_, 2024
    """
    validation.check_hparam("density", density, upper=1.0)
    select = True
    if validation.is_concrete(density) and not hasattr(density, "value_for"):
        select = float(np.asarray(density, np.float64)) < 1.0
    return Step(
        "sce",
        _sce,
        reduces=True,
        hparams={"density": density},
        options={"select": select},
    )


# -- Arcee Fusion -------------------------------------------------------------


def _prepare_fusion(hp, info):
    if info.num_models != 1:
        raise ValueError(
            f"arcee_fusion merges one model into the base (pass finetuned=[model]), got "
            f"{info.num_models} models."
        )
    n = max(info.size, 1)
    q = np.asarray([0.25, 0.5, 0.75], np.float32) * np.float32(n - 1)
    i1, i2, i3 = (np.int32(np.floor(v)) for v in q)
    return {**hp, "i1": i1, "i2": i2, "i3": i3}


def _softmax(v, axis):
    m = jnp.max(v, axis=axis, keepdims=True)
    e = jnp.exp(v - m)
    return e / jnp.sum(e, axis=axis, keepdims=True)


def _arcee_fusion(x, *, base, axis, i1, i2, i3, **_):
    a = base
    b = base + x[0]
    if a.ndim == 0:
        kl = jnp.zeros((), a.dtype)
        imp = jnp.abs(x[0]) * kl
    else:
        ax = axis % a.ndim
        eps = 1e-8
        p = _softmax(b, ax) + eps
        q = _softmax(a, ax) + eps
        kl = jnp.sum(p * jnp.log(p / q), axis=ax, keepdims=True)
        imp = jnp.abs(b - a) * kl
    s = jnp.sort(imp.reshape(-1))
    thr = s[i2] + 1.5 * (s[i3] - s[i1])
    return jnp.where(imp >= thr, b - a, jnp.zeros((), a.dtype))


def arcee_fusion(*, axis: int = -1) -> Step:
    r"""Arcee Fusion (mergekit's ``arcee_fusion``): keep the changes that matter most.

    With base :math:`a` and the one fine-tuned model :math:`b`, per tensor: the
    importance of each entry is the size of its change times the KL divergence of
    the softmaxes along ``axis`` (each row of torch's layout),

    .. math::
       s = |b-a|\cdot\mathrm{KL}\big(\mathrm{softmax}(b)+\epsilon\,\|\,
           \mathrm{softmax}(a)+\epsilon\big),\quad \epsilon=10^{-8},

    the threshold is :math:`\tau = Q_{0.5} + 1.5(Q_{0.75}-Q_{0.25})` with
    :math:`Q_q` the entry of index :math:`\lfloor q(n-1)\rfloor` of the sorted
    importances, and :math:`\theta = a + (b-a)\odot[s\ge\tau]`. mergekit estimates
    the quantiles from a random sample of 10^6 entries when a tensor is larger;
    here they are exact.

    Args:
      axis: The softmax axis. mergekit uses torch's last dim (``-1`` for leaves in
        torch layout); for a flax ``Dense`` kernel ``(in, out)`` that is ``axis=0``.

    Returns:
      A merger for :func:`fusionjax.merge` that takes exactly one model:
      ``fj.merge(base, [other], arcee_fusion())``.

    References:
      Arcee AI, `Arcee Fusion <https://arcee.ai>`_, mergekit 0.1
    """
    if not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {axis!r}.")
    return Step(
        "arcee_fusion",
        _arcee_fusion,
        reduces=True,
        options={"axis": int(axis)},
        prepare=_prepare_fusion,
    )
