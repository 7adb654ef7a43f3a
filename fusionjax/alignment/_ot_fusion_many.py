r"""OT fusion of more than two models: align each to a reference, then average.

OTFusion fuses :math:`K` models by choosing one as the reference (the paper's *target*
model, whose units and widths the fused model keeps), aligning every other model to it
layer by layer with optimal transport (:func:`~fusionjax.alignment.ot_fusion`), and
averaging the reference with the aligned models:

.. math::

  \theta = \sum_k w_k\,\tilde\theta_k,\qquad \tilde\theta_{ref} = \theta_{ref},\quad
  \tilde\theta_k = \mathrm{OT}_{\to ref}(\theta_k),\qquad \sum_k w_k = 1 .

Models may differ in the widths of the spec's groups (each is transported onto the
reference's widths). For :math:`K = 2` and weights :math:`(1-w, w)` this is
:func:`~fusionjax.alignment.ot_fusion` with ``weight=w``.

**What costs time, and what is done about it.** :math:`K-1` pairwise OT alignments, each
one exact assignment (or Sinkhorn solve) per group; models of equal shapes share one
compiled alignment program, so the cost grows linearly in :math:`K`.

References:
  Singh & Jaggi, `Model Fusion via Optimal Transport <https://arxiv.org/abs/1910.05653>`_,
  NeurIPS 2020 (Sec. 4, fusing more than two models by aligning them to a target model)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax.alignment._ot_fusion import ot_fusion
from fusionjax.alignment._spec import PermutationSpec
from fusionjax.alignment._spec import check_spec


class OTFusionManyOutput(NamedTuple):
    r"""Result of :func:`ot_fusion_many`.

    Attributes:
      fused: :math:`\sum_k w_k\tilde\theta_k`, with the reference's shapes and dtypes.
      aligned: Every model moved onto the reference's units (the reference itself at its
        index).
      transports: One ``{group: [m_k, n]}`` coupling dict per model (``None`` at the
        reference).
      weights: The normalised weights :math:`w_k`.
      reference: Index of the reference model.
    """

    fused: Params
    aligned: list
    transports: list
    weights: jax.Array
    reference: int


@jax.jit
def _weighted_sum(trees, weights):
    def avg(*xs):
        if not jnp.issubdtype(xs[0].dtype, jnp.inexact):
            return xs[0]
        dt = jnp.promote_types(xs[0].dtype, jnp.float32)
        acc = sum(w.astype(dt) * x.astype(dt) for w, x in zip(weights, xs, strict=True))
        return acc.astype(xs[0].dtype)

    return jax.tree.map(avg, *trees)


def ot_fusion_many(
    spec: PermutationSpec,
    models: Sequence[Params],
    *,
    reference: int = 0,
    weights: ArrayLike | None = None,
    **ot_kwargs: Any,
) -> OTFusionManyOutput:
    r"""OTFusion of :math:`K\ge 2` models: OT-align each to ``models[reference]``, then average.

    Args:
      spec: Groups in forward order (as for :func:`~fusionjax.alignment.ot_fusion`).
      models: The models, one architecture; group widths may differ from model to model.
      reference: Index of the reference model, whose units and widths are kept.
      weights: ``[K]`` non-negative weights :math:`w_k` (normalised to sum to one);
        default uniform.
      **ot_kwargs: Passed to :func:`~fusionjax.alignment.ot_fusion` for every pairwise
        alignment (``solver``, ``cost``, ``epsilon``, ``ground_metric``, ``roles``, ...;
        ``cost="activation"`` needs per-model activations and is not supported here).

    Returns:
      An :class:`OTFusionManyOutput`.

    Raises:
      ValueError: if fewer than two models are given, ``reference`` is out of range,
        ``weights`` has the wrong length, a negative entry or a zero sum, or a model
        does not fit the reference (see :func:`~fusionjax.alignment.ot_fusion`).
      TypeError: if ``models`` is not a sequence or ``activations`` is passed.

    Examples:
      >>> import numpy as np
      >>> from fusionjax.alignment import PermutationSpec
      >>> spec = PermutationSpec({"h": [("l0", 1), ("l1", 0)]})
      >>> r = np.random.default_rng(0)
      >>> ms = [{"l0": r.normal(size=(3, w)), "l1": r.normal(size=(w, 2))} for w in (4, 8, 4)]
      >>> ot_fusion_many(spec, ms).fused["l0"].shape
      (3, 4)

    References:
      Singh & Jaggi, `Model Fusion via Optimal Transport
      <https://arxiv.org/abs/1910.05653>`_, NeurIPS 2020
    """
    check_spec(spec)
    if isinstance(models, dict) or not isinstance(models, Sequence):
        raise TypeError(f"models must be a sequence of pytrees, got {type(models).__name__}.")
    k = len(models)
    if k < 2:
        raise ValueError(f"models must hold at least 2 models, got {k}.")
    if isinstance(reference, bool) or not isinstance(reference, (int, np.integer)):
        raise TypeError(f"reference must be an integer index, got {reference!r}.")
    if not -k <= reference < k:
        raise ValueError(f"reference must be in [0, {k}), got {reference}.")
    reference = int(reference) % k
    if "activations" in ot_kwargs or "weight" in ot_kwargs:
        raise TypeError("ot_fusion_many takes neither activations nor weight; use weights.")
    if weights is None:
        w = np.full(k, 1.0 / k)
    else:
        w = np.asarray(weights, np.float64)
        if w.shape != (k,):
            raise ValueError(f"weights must have shape ({k},), got {w.shape}.")
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {w}.")
        w = w / w.sum()
    ref = models[reference]
    aligned, transports = [], []
    for i, model in enumerate(models):
        if i == reference:
            aligned.append(ref)
            transports.append(None)
            continue
        out = ot_fusion(spec, ref, model, weight=1.0, **ot_kwargs)
        aligned.append(out.aligned)
        transports.append(out.transports)
    weights_arr = jnp.asarray(w, jnp.float32)
    fused = _weighted_sum(aligned, weights_arr)
    return OTFusionManyOutput(fused, aligned, transports, weights_arr, reference)
