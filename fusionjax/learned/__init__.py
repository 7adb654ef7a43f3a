r"""Learned merging: coefficients trained inside optax loops.

The pieces compose with a user's own loop: :func:`init_coefficients` (task-wise,
layer-wise or block-wise coefficients, an ordinary pytree), :func:`combine` (the merge
:math:`\theta_0 + \sum_t \lambda_t \odot \tau_t`, differentiable in the
coefficients only) and the objectives :func:`adamerging_loss` and :func:`atlas_loss`.
Ready loops with the papers' defaults: :func:`adamerging`, :func:`adamerging_plus_plus`,
:func:`atlas`.
"""

from fusionjax.learned._coefficients import (
    coefficient_table,
    combine,
    effective,
    init_coefficients,
    random_blocks,
    stacked_task_vectors,
)
from fusionjax.learned._loop import (
    LearnedMerge,
    adamerging,
    adamerging_plus_plus,
    atlas,
    fit_coefficients,
    sample_batches,
)
from fusionjax.learned._objectives import adamerging_loss, atlas_loss, entropy

__all__ = [
    "LearnedMerge",
    "adamerging",
    "adamerging_loss",
    "adamerging_plus_plus",
    "atlas",
    "atlas_loss",
    "coefficient_table",
    "combine",
    "effective",
    "entropy",
    "fit_coefficients",
    "init_coefficients",
    "random_blocks",
    "sample_batches",
    "stacked_task_vectors",
]
