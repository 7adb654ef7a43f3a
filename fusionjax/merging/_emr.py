r"""EMR-merging: elect a unified task vector, then a mask and a rescaler per task.

EMR-merging (Huang et al., NeurIPS 2024) keeps one shared task vector and, per task,
a binary mask and one scalar, from which each task's model is recovered without
tuning or data. With task vectors :math:`\tau_t = \theta_t - \theta_0`:

1. *Elect*: :math:`\gamma = \mathrm{sgn}\big(\sum_t\tau_t\big)` elementwise, with a zero
   sum counted as :math:`-1` (the reference code's ``(x > 0) * 2 - 1``), and
   :math:`\epsilon = \max_t \{|\tau_t| : \tau_t\gamma > 0\}` (0 where no task agrees);
   the unified task vector is :math:`\tau_{uni} = \gamma\odot\epsilon`.
2. *Mask*: :math:`M_t = (\tau_t\odot\tau_{uni} > 0)`, stored as booleans.
3. *Rescale*: :math:`\lambda_t = \dfrac{\sum|\tau_t|}{\sum|M_t\odot\tau_{uni}|}` over the
   whole model. The reference code (EMR's repository, and FusionBench's ``emr_merge``)
   sums *per-tensor means*, :math:`\lambda_t = \sum_\ell \mathrm{mean}|\tau_{t,\ell}| /
   \sum_\ell\mathrm{mean}|M_{t,\ell}\odot\tau_{uni,\ell}|` (``rescale="leaf_mean"``, the
   default); ``rescale="total"`` is the paper's formula over all entries.
4. *Recover* task :math:`t`: :math:`\hat\theta_t = \theta_0 + \lambda_t\,M_t\odot\tau_{uni}`
   (:func:`emr_task_model`).

EMR is not one merged model: evaluating task :math:`t` uses :math:`\hat\theta_t`. The
storage is one model plus :math:`T` bit masks and :math:`T` scalars.

What costs time, and what is done about it: one jitted pass per leaf computes the
unified vector, the masks and the two per-task sums the rescalers need (elementwise
work, row by row over the models; no sort); the rescalers are then a division of
``[T]`` vectors. Leaves that are not floating point are passed through from ``base``.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax._src.base import Params
from fusionjax._src.tree import is_mergeable
from fusionjax.merging._ties import check_choice

Rescale = Literal["leaf_mean", "total"]


def _is_none(v) -> bool:
    return v is None


class EMROutput(NamedTuple):
    r"""The result of :func:`emr_merge`.

    Attributes:
      unified: The unified task vector :math:`\tau_{uni}`, a pytree like ``base``
        (``None`` at leaves that are not floating point).
      masks: Per-task masks :math:`M_t` as booleans, leaves ``[T, ...]`` (``None`` at
        leaves that are not floating point).
      rescalers: :math:`\lambda_t`, a float32 array ``[T]``.
    """

    unified: Params
    masks: Params
    rescalers: jax.Array


@jax.jit
def _emr_leaf(b, fts):
    # The [T, ...] task vectors of one leaf, in the compute dtype, formed in the same
    # program (not by eager subtract/stack programs per leaf shape and T).
    dt = validation.compute_dtype(b.dtype)
    x = jnp.stack([jnp.asarray(f, dt) - jnp.asarray(b, dt) for f in fts])
    t = x.shape[0]
    rows = [x[i] for i in range(t)]
    total = functools.reduce(operator.add, rows)
    one = jnp.ones((), x.dtype)
    sign = jnp.where(total > 0, one, -one)
    agree = [r * sign > 0 for r in rows]
    zero = jnp.zeros((), x.dtype)
    kept = [jnp.where(m, jnp.abs(r), zero) for m, r in zip(agree, rows, strict=True)]
    mag = functools.reduce(jnp.maximum, kept)
    unified = sign * mag
    masks = jnp.stack(agree)
    # mask_t * tau_uni is nonzero only where tau_t agrees with the sign, i.e. where the
    # mask is True; |M_t * tau_uni| = M_t * mag.
    abs_tau = jnp.stack([jnp.sum(jnp.abs(r)) for r in rows])
    abs_masked = jnp.stack([jnp.sum(jnp.where(m, mag, zero)) for m in agree])
    return unified, masks, abs_tau, abs_masked


def emr_merge(
    base: Params, finetuned: Sequence[Params], *, rescale: Rescale = "leaf_mean"
) -> EMROutput:
    r"""EMR-merging: a unified task vector, per-task boolean masks and rescalers.

    .. math::
       \tau_{uni} = \mathrm{sgn}\Big(\sum_t\tau_t\Big)\odot\max_{t:\,\tau_t\gamma>0}|\tau_t|,
       \quad M_t = (\tau_t\odot\tau_{uni} > 0),\quad
       \lambda_t = \frac{\sum|\tau_t|}{\sum|M_t\odot\tau_{uni}|}.

    Args:
      base: Base parameters :math:`\theta_0`.
      finetuned: The fine-tuned models (a non-empty list).
      rescale: ``"leaf_mean"`` (the reference code: sums of per-leaf means) or
        ``"total"`` (the paper: sums over all entries); see :mod:`fusionjax.merging._emr`.

    Returns:
      An :class:`EMROutput`; :func:`emr_task_model` recovers task ``t``'s model. A task
      whose masked unified vector is all zero (its task vector is zero) gets
      :math:`\lambda_t = 1`.

    Raises:
      ValueError: naming the model and path if the models differ from ``base``, or if
        ``rescale`` is unknown.
      TypeError: if ``finetuned`` is not a list or tuple.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(3)}
      >>> fts = [{"w": jnp.array([1.0, -1.0, 2.0])}, {"w": jnp.array([3.0, 2.0, -1.0])}]
      >>> out = fj.merging.emr_merge(base, fts)
      >>> out.unified["w"].tolist(), out.masks["w"].tolist()
      ([3.0, 2.0, 2.0], [[True, False, True], [True, True, False]])

    References:
      Huang et al, `EMR-Merging: Tuning-Free High-Performance Model Merging
      <https://arxiv.org/abs/2405.17461>`_, NeurIPS 2024
    """
    check_choice("rescale", rescale, ("leaf_mean", "total"))
    validation.check_models(base, finetuned)
    flat_base, treedef = jax.tree_util.tree_flatten(base)
    flat_fts = [jax.tree.leaves(f) for f in finetuned]
    t = len(finetuned)
    unified, masks = [], []
    num = np.zeros(t, np.float64)
    den = np.zeros(t, np.float64)
    for i, b in enumerate(flat_base):
        if not is_mergeable(b):
            unified.append(None)
            masks.append(None)
            continue
        u, m, a, am = _emr_leaf(b, [f[i] for f in flat_fts])
        unified.append(u.astype(b.dtype))
        masks.append(m)
        size = max(int(np.prod(np.shape(b))), 1)
        div = size if rescale == "leaf_mean" else 1
        num += np.asarray(a, np.float64) / div
        den += np.asarray(am, np.float64) / div
    ok = den > 0
    rescalers = np.where(ok, num / np.where(ok, den, 1.0), 1.0).astype(np.float32)
    return EMROutput(treedef.unflatten(unified), treedef.unflatten(masks), jnp.asarray(rescalers))


@jax.jit
def _recover(base, unified, masks, rescalers, task):
    # task's mask rows and rescaler are taken in the program (no eager slice per leaf shape)
    lam = rescalers[task]

    def one(b, u, m):
        if u is None:
            return b
        dt = validation.compute_dtype(b.dtype)
        delta = jnp.where(m[task], u.astype(dt), jnp.zeros((), dt)) * lam.astype(dt)
        return (b.astype(dt) + delta).astype(b.dtype)

    return jax.tree.map(one, base, unified, masks, is_leaf=_is_none)


def emr_task_model(base: Params, output: EMROutput, task: int) -> Params:
    r"""Task ``task``'s model from an EMR merge: :math:`\theta_0 + \lambda_t\,M_t\odot\tau_{uni}`.

    Args:
      base: The base parameters the merge was computed from.
      output: The :class:`EMROutput` of :func:`emr_merge`.
      task: Index :math:`t` of the task, ``0 <= task < T``.

    Returns:
      Parameters like ``base``.

    Raises:
      ValueError: if ``task`` is out of range or ``output`` does not match ``base``.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(2)}
      >>> out = fj.merging.emr_merge(base, [{"w": jnp.array([1.0, -2.0])}])
      >>> fj.merging.emr_task_model(base, out, 0)["w"].tolist()  # one model: itself
      [1.0, -2.0]

    References:
      Huang et al, `EMR-Merging: Tuning-Free High-Performance Model Merging
      <https://arxiv.org/abs/2405.17461>`_, NeurIPS 2024
    """
    if not isinstance(output, EMROutput):
        raise TypeError(f"output must be an EMROutput from emr_merge, got {type(output).__name__}.")
    n = int(np.shape(output.rescalers)[0])
    task = validation.check_int("task", task, lower=0, upper=n - 1)
    if jax.tree.structure(base) != jax.tree.structure(output.unified, is_leaf=_is_none):
        raise ValueError("output does not match base: output.unified has another tree structure.")
    return _recover(base, output.unified, output.masks, output.rescalers, np.int32(task))
