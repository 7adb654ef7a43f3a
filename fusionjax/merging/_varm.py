r"""VaRM (FuseChat v1): merge by the variation ratio of each parameter matrix.

FuseChat's second stage merges several target models, each distilled from one source, that
share one base. For every parameter matrix :math:`m` and model :math:`t` with task vector
:math:`\tau_{t,m} = \theta_{t,m} - \theta_{\mathrm{base},m}`, the weight is the model's share
of the mean squared update of that matrix,

.. math::
   w_{t,m} = \frac{\overline{\tau_{t,m}^2}}{\sum_s \overline{\tau_{s,m}^2}},\qquad
   \theta_m = \theta_{\mathrm{base},m} + \sum_t w_{t,m}\,\tau_{t,m},

where :math:`\overline{\,\cdot\,}` is the mean over the matrix's entries. A model that moved a
matrix more during fine-tuning owns more of the merged matrix. When every model leaves a
matrix unchanged (the sum is below :math:`10^{-12}`) the weights are :math:`1/T` and the
matrix stays the base's.

What costs time, and what is done about it: two passes over the ``T`` task vectors of a leaf
(the mean squares, then the weighted sum), written as sums of rows rather than reductions
over the stacked model axis (a reduction over a stacked ``[T, N]`` leaf is slow on XLA:CPU,
see the style guide). The step is leafwise, so :func:`fusionjax.merge` streams it leaf by
leaf from checkpoints without holding whole models.
"""

from __future__ import annotations

import functools
import operator

import jax.numpy as jnp

from fusionjax._src.base import Step

_TINY = 1e-12


def _varm(x, **_):
    n = x.shape[0]
    ms = [jnp.mean(x[t] * x[t]) for t in range(n)]
    total = functools.reduce(operator.add, ms)
    small = total < _TINY
    denom = jnp.where(small, jnp.ones((), x.dtype), total)
    uniform = jnp.asarray(1.0 / n, x.dtype)
    weights = [jnp.where(small, uniform, m / denom) for m in ms]
    return functools.reduce(operator.add, [weights[t] * x[t] for t in range(n)])


def varm() -> Step:
    r"""VaRM (FuseChat v1): per-matrix weights proportional to each model's mean squared update.

    For each leaf (parameter matrix) and model :math:`t` with task vector :math:`\tau_t`:

    .. math::
       w_t = \frac{\mathrm{mean}(\tau_t^2)}{\sum_s \mathrm{mean}(\tau_s^2)},\qquad
       \theta = \theta_{\mathrm{base}} + \sum_t w_t\,\tau_t .

    The weights sum to one per leaf, so merging :math:`k` copies of one model gives that model,
    and permuting the models changes nothing. A leaf no model changed (the sum of mean squares
    below :math:`10^{-12}`) keeps the base's value (weights :math:`1/T`). The weights are per
    leaf: FuseChat computes them per parameter matrix, which is what a leaf is here.

    Args:
      (none): VaRM has no hyperparameters; the weights come from the task vectors.

    Returns:
      A merger for :func:`fusionjax.merge`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> base = {"w": jnp.zeros(2)}
      >>> merged = fj.merge(base, [{"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([3.0, 3.0])}],
      ...                   fj.merging.varm())
      >>> [round(v, 4) for v in merged["w"].tolist()]  # weights 1/10 and 9/10
      [2.8, 2.8]

    References:
      Wan et al, `FuseChat: Knowledge Fusion of Chat Models
      <https://arxiv.org/abs/2402.16107>`_ (v1: VaRM), 2024
    """
    return Step("varm", _varm, reduces=True)
