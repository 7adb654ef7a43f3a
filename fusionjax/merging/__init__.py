"""Merging methods for models fine-tuned from one base, as chains of steps.

Task-vector steps (``[T, ...] -> [T, ...]``): :func:`trim`, :func:`elect_sign`,
:func:`drop_and_rescale`, :func:`drop_extremes`, :func:`magnitude_drop`,
:func:`scale`. Mergers (``[T, ...] -> [...]``): :func:`sum`, :func:`mean`,
:func:`disjoint_mean`, :func:`slerp`, :func:`model_stock`, and the data-aware
:func:`fisher_merging` (with :func:`fisher_diagonal`) and :func:`regmean` (with
:func:`gram_matrices` or :func:`fusionjax.interop.dense_grams`). Methods are chains of
them (:func:`ties`, :func:`dare`, :func:`breadcrumbs`, :func:`della`, ...).
"""

from fusionjax.merging._dare import dare
from fusionjax.merging._dare import dare_ties
from fusionjax.merging._dare import drop_and_rescale
from fusionjax.merging._fisher import fisher_diagonal
from fusionjax.merging._fisher import fisher_merging
from fusionjax.merging._linear import mean
from fusionjax.merging._linear import scale
from fusionjax.merging._linear import sum  # pylint: disable=redefined-builtin
from fusionjax.merging._linear import task_arithmetic
from fusionjax.merging._linear import uniform_soup
from fusionjax.merging._linear import weighted_average
from fusionjax.merging._model_stock import model_stock
from fusionjax.merging._regmean import gram_matrices
from fusionjax.merging._regmean import regmean
from fusionjax.merging._slerp import slerp
from fusionjax.merging._slerp import slerp_arrays
from fusionjax.merging._soup import GreedySoupResult
from fusionjax.merging._soup import greedy_soup
from fusionjax.merging._sparsify import breadcrumbs
from fusionjax.merging._sparsify import della
from fusionjax.merging._sparsify import drop_extremes
from fusionjax.merging._sparsify import magnitude_drop
from fusionjax.merging._ties import disjoint_mean
from fusionjax.merging._ties import elect_sign
from fusionjax.merging._ties import ties
from fusionjax.merging._ties import trim

__all__ = [
    "GreedySoupResult",
    "breadcrumbs",
    "dare",
    "dare_ties",
    "della",
    "disjoint_mean",
    "drop_and_rescale",
    "drop_extremes",
    "elect_sign",
    "fisher_diagonal",
    "fisher_merging",
    "gram_matrices",
    "greedy_soup",
    "magnitude_drop",
    "mean",
    "model_stock",
    "regmean",
    "scale",
    "slerp",
    "slerp_arrays",
    "sum",
    "task_arithmetic",
    "ties",
    "trim",
    "uniform_soup",
    "weighted_average",
]
