r"""MagMax: keep, per parameter, the task-vector entry of largest magnitude.

For task vectors :math:`\tau_t` (:math:`t = 1..T`) and every parameter :math:`i`,

.. math::
   t^*_i = \arg\max_t |\tau_{t,i}|,\qquad \tau_i = \tau_{t^*_i,i},\qquad
   \theta = \theta_0 + \lambda\,\tau .

The kept entry keeps its sign; ties of magnitude go to the first model (a ``+x`` and a
``-x`` tie keeps the first model's). Unlike TIES' ``max`` merge
(:func:`fusionjax.merging.disjoint_max`) no sign is elected first: an entry of one sign can
win against a larger sum of the other sign.

What costs time, and what is done about it: one elementwise pass over the ``T`` task
vectors of a leaf (``T - 1`` compares and selects, written row by row rather than as a
reduction over the stacked model axis, which is slow on XLA:CPU). The step is leafwise and
elementwise (it works on a flattened, zero-padded leaf), so :func:`fusionjax.merge` batches
small leaves and streams large ones from checkpoints.
"""

from __future__ import annotations

import jax.numpy as jnp

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Step
from fusionjax._src.merge import chain
from fusionjax.merging._linear import scale


def _magmax(x, **_):
    best = x[0]
    for t in range(1, x.shape[0]):
        best = jnp.where(jnp.abs(x[t]) > jnp.abs(best), x[t], best)
    return best


def magmax(*, scaling: ArrayLike = 1.0) -> Step:
    r"""MagMax: per parameter, the task-vector entry of largest magnitude, then scaled.

    .. math::
       \tau_i = \tau_{t^*_i,i},\quad t^*_i = \arg\max_t |\tau_{t,i}|,\qquad
       \theta = \theta_0 + \lambda\,\tau .

    Applied to every inexact leaf alike (matrices, biases, scalars). Merging :math:`k`
    copies of one model with :math:`\lambda = 1` gives that model; the result does not
    depend on the order of the models except for exact magnitude ties of opposite sign.

    Args:
      scaling: Multiplier :math:`\lambda` of the merged task vector (the paper's scaling
        factor, picked on held-out data).

    Returns:
      A leafwise merger ``chain(magmax, scale(scaling))`` for :func:`fusionjax.merge`.

    Raises:
      ValueError: if ``scaling`` is NaN.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> base = {"w": jnp.zeros(3)}
      >>> a, b = {"w": jnp.array([1.0, -4.0, 0.5])}, {"w": jnp.array([-2.0, 3.0, 0.25])}
      >>> fj.merge(base, [a, b], fj.merging.magmax())["w"].tolist()
      [-2.0, -4.0, 0.5]

    References:
      Marczak et al, `MagMax: Leveraging Model Merging for Seamless Continual Learning
      <https://arxiv.org/abs/2407.06322>`_, ECCV 2024
    """
    validation.check_hparam("scaling", scaling)
    step = Step("magmax", _magmax, reduces=True, flat=True)
    return chain(step, scale(scaling))
