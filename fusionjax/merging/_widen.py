r"""WIDEN: merge by weight disentanglement into magnitudes and directions.

WIDEN (Yu et al., 2024) weighs each model's update per *column* of a weight matrix by
how much that column moved away from the base, in magnitude and in direction, ranked
within the model so that models with updates of very different sizes (fine-tuned vs.
continually pre-trained) are comparable.

For a matrix leaf :math:`W` (torch layout ``[out, in]``; a column :math:`j` is one input
unit), :math:`m_j = \|W_{:,j}\|_2` and :math:`D_{:,j} = W_{:,j}/m_j`. For model
:math:`t` against the base :math:`W_0`:

.. math::
   \Delta m_{t,j} = |m_{t,j} - m_{0,j}|,\qquad
   \Delta D_{t,j} = 1 - \cos(D_{t,:,j}, D_{0,:,j}).

Each is ranked within its model, :math:`r_{t,j} = \mathrm{rank}_j(\Delta_{t,j})/n`
(ascending, ties by index, :math:`n` columns, so :math:`r\in[0, 1)`), and turned into
importance scores across models,

.. math::
   S_{t,j} = \begin{cases} s & r_{t,j} > \kappa\,\bar r_t \\
   \mathrm{softmax}_t(r_{\cdot,j}/T_{emp})_t & \text{otherwise,}\end{cases}

with :math:`\bar r_t` the mean over the columns, :math:`\kappa` =
``above_average_ratio`` and :math:`s` = ``score_calibration``: columns that changed
more than average in a model keep that model's update at weight :math:`s`. The
merged update is :math:`\sum_t \tfrac12(S^{m}_{t,j} + S^{D}_{t,j})\,\tau_{t,:,j}`.
Other leaves (biases, norms: 1-D; and every leaf that is not 2-D) use the same scores
entrywise with :math:`r_{t,i} = |\tau_{t,i}|` itself (no ranking, no disentanglement),
as the reference does for its 1-D parameters.

Layout: flax ``Dense`` kernels are ``[in, out]``, so an input unit is a *row*; the
column norm of the torch weight is the norm over the last axis of the flax kernel.
``axis`` names the axis the norm runs over: ``-1`` (default, flax ``[in, out]``,
also flax ``Embed`` ``[vocab, features]`` like the reference's transposed
embeddings) or ``0`` (torch ``[out, in]``).

The reference code takes the softmax at temperature 1 (``temperature=1``) and
uses :math:`\kappa = s = 1` by default. The scores need not sum to one over the
models: with :math:`s = 1` two models that both changed a column more than average
both add their full update (a sum, like task arithmetic, there).

What costs time, and what is done about it: per matrix leaf, two norms and an
inner product per column and model, and one sort per model of ``n`` column scores
(the ranks; ``n`` is a width, not the number of entries); the rest is elementwise.
Leafwise, so :func:`fusionjax.merge` streams it from checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Step
from fusionjax.merging._ties import ascending_ranks

_EPS = 1e-8


def _scores(sig, ratio, calibration, temperature):
    # sig: [T, n] significance per model; the softmax is across models (axis 0).
    soft = jax.nn.softmax(sig / temperature.astype(sig.dtype), axis=0)
    mean = jnp.mean(sig, axis=1, keepdims=True)
    return jnp.where(sig > mean * ratio.astype(sig.dtype), calibration.astype(sig.dtype), soft)


def _widen(x, *, base, above_average_ratio, score_calibration, temperature, axis, **_):
    t = x.shape[0]
    if x.ndim != 3:  # vectors, scalars, other ranks: entrywise on |tau|
        sig = jnp.abs(x.reshape(t, -1))
        w = _scores(sig, above_average_ratio, score_calibration, temperature)
        return jnp.sum(w.reshape(x.shape) * x, axis=0)
    red = 1 + (axis % 2)  # the norm axis of a stacked [T, a, b] leaf
    b0 = base.astype(x.dtype)[None]
    ft = b0 + x
    m0 = jnp.sqrt(jnp.sum(b0 * b0, axis=red))  # [1, n]
    mt = jnp.sqrt(jnp.sum(ft * ft, axis=red))  # [T, n]
    d_mag = jnp.abs(mt - m0)
    # cos of the directions = cos of the columns themselves (the norms cancel).
    dot = jnp.sum(ft * b0, axis=red)
    cos = dot / jnp.maximum(mt * m0, _EPS)
    d_dir = 1.0 - cos
    n = d_mag.shape[1]
    r_mag = ascending_ranks(d_mag).astype(x.dtype) / n
    r_dir = ascending_ranks(d_dir).astype(x.dtype) / n
    w = 0.5 * (
        _scores(r_mag, above_average_ratio, score_calibration, temperature)
        + _scores(r_dir, above_average_ratio, score_calibration, temperature)
    )
    w = jnp.expand_dims(w, red)
    return jnp.sum(w * x, axis=0)


def widen(
    *,
    above_average_ratio: ArrayLike = 1.0,
    score_calibration: ArrayLike = 1.0,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
) -> Step:
    r"""WIDEN: per-column magnitude and direction divergence, ranked, softmax across models.

    For a 2-D leaf, with :math:`r^{m}_{t}, r^{D}_{t}` the within-model ranks (scaled to
    :math:`[0, 1)`) of each column's magnitude change :math:`|m_t - m_0|` and direction
    change :math:`1-\cos(D_t, D_0)`:

    .. math::
       S_t = \begin{cases} s & r_t > \kappa\,\mathrm{mean}(r_t)\\
       \mathrm{softmax}_t(r/T_{emp}) & \text{else}\end{cases},\qquad
       \theta = \theta_0 + \sum_t \tfrac12\big(S^{m}_t + S^{D}_t\big)\odot\tau_t,

    the column scores broadcast over the column. Leaves that are not 2-D use
    :math:`r_t = |\tau_t|` entrywise (the reference's rule for 1-D parameters). See
    :mod:`fusionjax.merging._widen`.

    Args:
      above_average_ratio: :math:`\kappa` (> 0): a column (or entry) whose rank exceeds
        :math:`\kappa` times its model's mean rank gets the calibrated score.
      score_calibration: :math:`s`, the score given to those columns (>= 0).
      temperature: :math:`T_{emp}` (> 0) of the softmax across models (1 in the
        reference code).
      axis: The axis of a 2-D leaf the column norm runs over: ``-1`` for flax kernels
        ``[in, out]`` (default), ``0`` for torch weights ``[out, in]``.

    Returns:
      A leafwise merger for :func:`fusionjax.merge` (it reads the base leaf).

    Raises:
      ValueError: naming the parameter, if a value is out of range.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"b": jnp.zeros(2)}
      >>> merged = fj.merge(base, [{"b": jnp.array([1.0, 0.0])}, {"b": jnp.array([0.0, 3.0])}],
      ...                   fj.merging.widen())
      >>> merged["b"].tolist()  # each model's above-average entry kept at weight 1
      [1.0, 3.0]

    References:
      Yu et al, `Extend Model Merging from Fine-Tuned to Pre-Trained Large Language
      Models via Weight Disentanglement <https://arxiv.org/abs/2408.03092>`_, 2024
    """
    validation.check_hparam("above_average_ratio", above_average_ratio, lower=0.0, lower_open=True)
    validation.check_hparam("score_calibration", score_calibration, lower=0.0)
    validation.check_hparam("temperature", temperature, lower=0.0, lower_open=True)
    if axis not in (0, 1, -1, -2):
        raise ValueError(f"axis must be 0 or -1 (a 2-D leaf's norm axis), got {axis!r}.")
    return Step(
        "widen",
        _widen,
        reduces=True,
        hparams={
            "above_average_ratio": above_average_ratio,
            "score_calibration": score_calibration,
            "temperature": temperature,
        },
        options={"axis": axis},
    )
