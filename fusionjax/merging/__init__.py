r"""Merging methods for models fine-tuned from one base, as chains of steps.

Task-vector steps (``[T, ...] -> [T, ...]``): :func:`trim`, :func:`elect_sign`,
:func:`drop_and_rescale`, :func:`drop_extremes`, :func:`magnitude_drop`,
:func:`scale`. Mergers (``[T, ...] -> [...]``): :func:`sum`, :func:`mean`,
:func:`disjoint_mean`, :func:`disjoint_max`, :func:`slerp`, :func:`model_stock`,
and the data-aware :func:`fisher_merging` (with :func:`fisher_diagonal`) and
:func:`regmean` (with :func:`gram_matrices` or :func:`fusionjax.interop.dense_grams`).
Methods are chains of them (:func:`ties`, :func:`dare`, :func:`breadcrumbs`,
:func:`della`, ...). mergekit's own methods: :func:`nuslerp`, :func:`multislerp`,
:func:`karcher`, :func:`nearswap`, :func:`sce`, :func:`arcee_fusion`,
:func:`della_linear`, :func:`dare_linear`, :func:`breadcrumbs_ties`. FuseChat's
merges of distilled targets: :func:`varm` and :func:`sce`.

Singular-vector and magnitude merges: :func:`tsv_merge` (TSV-M), :func:`iso_c`,
:func:`iso_cts`, :func:`magmax`. Balancing and elect-style merges:
:func:`pcb_merging` (with :func:`pcb_balance` and the validation search
:func:`pcb_scaling_search`), :func:`widen`, and :func:`emr_merge` (per-task models by
:func:`emr_task_model`), and reversible merging of low-rank weights, a shared basis
plus per-task coefficients: :func:`reversible_merge` (models, optionally truncated by
SVD), :func:`reversible_lora` (adapters), recovered by :func:`reversible_task_model` and
:func:`reversible_adapter`. Continual merging, one model at a time in constant memory:
:func:`opcm` (an ``init``/``update`` pair). LoRA adapters without full updates where
the math allows: :func:`lora_task_arithmetic`, :func:`lora_tsv`, :func:`lora_svd`;
PEFT's TIES and DARE (on the factors, or on the updates with an SVD back to factors):
:func:`lora_ties`, :func:`lora_dare_linear`, :func:`lora_dare_ties`; any merger on the
full updates: :func:`lora_merge`.

mergekit compatibility
----------------------
Where mergekit (0.1.5) differs from the papers or FusionBench, an option reproduces
it; defaults are unchanged. ``convention="mergekit"`` on :func:`ties`,
:func:`dare_ties`, :func:`della`, :func:`breadcrumbs`, :func:`breadcrumbs_ties`,
:func:`slerp` and :func:`model_stock` sets every option below to mergekit's
value at once (an option passed explicitly wins); the steps take the options
individually.

=======================  =============================  =====================================
difference               default (papers / fusionjax)   mergekit: option
=======================  =============================  =====================================
DARE/DELLA rescale       :math:`1/q` per entry          ``rescale="l1"``: each tensor scaled
                                                        to its L1 norm before masking
                                                        (``"none"``: mergekit
                                                        ``rescale: false``)
kept count (TIES)        :math:`\lceil\rho n\rceil`,    ``count="mergekit"``:
                         ties with the threshold kept   :math:`\max(1,\lfloor\rho n\rfloor)`,
                                                        exactly :math:`k`, ties by index
kept band (Breadcrumbs)  :math:`\lceil\gamma n\rceil`,  ``count="mergekit"``: ``int()`` of
                         :math:`\lceil\rho n\rceil`     both, keep all when
                                                        :math:`\rho\ge1`
elected sign 0           entry zeroed (``"drop"``)      ``zero_sign="positive"`` (+1);
                                                        FusionBench: ``"majority"``
                                                        (model-wide majority sign)
dare_ties merge          disjoint mean                  ``merge="sum"`` (normalize false)
per-model weights        --                             ``weights=`` (election and merge on
                                                        :math:`w_t\tau_t`)
unnormalised sums        --                             :func:`sum` ``(weights)``,
                                                        :func:`dare_linear`,
                                                        :func:`della_linear`
model stock              one :math:`t` per leaf,        ``filter_wise=True, axis=``;
                         cos clipped at 0               ``convention="mergekit"`` (no clip)
DELLA ranking groups     per output unit of a flax      ``rank_axis=1`` on torch-layout
                         kernel ``[..., out]``          leaves (``None`` already matches a
                                                        transposed ``Dense`` kernel)
SLERP of a zero tensor   lerp                           ``zero_norm="right_angle"``
                                                        (:math:`\Omega=\pi/2`)
DELLA epsilon default    0.1                            0.15
TIES ``merge_func``      mean, sum                      FusionBench ``"max"``:
                                                        ``merge="max"``
=======================  =============================  =====================================

"Ties by index": mergekit sorts with torch's unstable ``argsort``, which breaks
ties in no fixed order, so on data with tied magnitudes (common in bf16) no
implementation reproduces its kept set; on tie-free data the options above give
mergekit's result to float32 rounding. mergekit computes in the checkpoint's dtype
(bf16); fusionjax computes in at least float32 and rounds the merged leaf once (see
:func:`fusionjax.merge`); ``chain(round_to("bfloat16"), ...)`` starts from
mergekit's rounded task vectors, but its later bf16 roundings are not reproduced.
Methods mergekit runs without a base model work on the weights
(``space="weights"``): the ``base`` argument of :func:`fusionjax.merge` then
only carries the structure (see :func:`karcher`).
"""

from fusionjax.merging._dare import dare
from fusionjax.merging._dare import dare_linear
from fusionjax.merging._dare import dare_ties
from fusionjax.merging._dare import drop_and_rescale
from fusionjax.merging._emr import EMROutput
from fusionjax.merging._emr import emr_merge
from fusionjax.merging._emr import emr_task_model
from fusionjax.merging._fisher import fisher_diagonal
from fusionjax.merging._fisher import fisher_merging
from fusionjax.merging._linear import mean
from fusionjax.merging._linear import round_to
from fusionjax.merging._linear import scale
from fusionjax.merging._linear import sum  # pylint: disable=redefined-builtin
from fusionjax.merging._linear import task_arithmetic
from fusionjax.merging._linear import uniform_soup
from fusionjax.merging._linear import weighted_average
from fusionjax.merging._lora import LoRA
from fusionjax.merging._lora import LoRASVD
from fusionjax.merging._lora import lora_dare_linear
from fusionjax.merging._lora import lora_dare_ties
from fusionjax.merging._lora import lora_delta
from fusionjax.merging._lora import lora_merge
from fusionjax.merging._lora import lora_svd
from fusionjax.merging._lora import lora_task_arithmetic
from fusionjax.merging._lora import lora_ties
from fusionjax.merging._lora import lora_tsv
from fusionjax.merging._magmax import magmax
from fusionjax.merging._mergekit import arcee_fusion
from fusionjax.merging._mergekit import nearswap
from fusionjax.merging._mergekit import sce
from fusionjax.merging._model_stock import model_stock
from fusionjax.merging._opcm import ContinualMerger
from fusionjax.merging._opcm import OPCMState
from fusionjax.merging._opcm import opcm
from fusionjax.merging._opcm import opcm_merged
from fusionjax.merging._pcb import PCBSearchOutput
from fusionjax.merging._pcb import pcb_balance
from fusionjax.merging._pcb import pcb_merging
from fusionjax.merging._pcb import pcb_scaling_search
from fusionjax.merging._regmean import gram_matrices
from fusionjax.merging._regmean import regmean
from fusionjax.merging._reversible import ReversibleOutput
from fusionjax.merging._reversible import reversible_adapter
from fusionjax.merging._reversible import reversible_lora
from fusionjax.merging._reversible import reversible_merge
from fusionjax.merging._reversible import reversible_task_model
from fusionjax.merging._singular import iso_c
from fusionjax.merging._singular import iso_cts
from fusionjax.merging._singular import tsv_merge
from fusionjax.merging._slerp import slerp
from fusionjax.merging._slerp import slerp_arrays
from fusionjax.merging._soup import GreedySoupResult
from fusionjax.merging._soup import greedy_soup
from fusionjax.merging._sparsify import breadcrumbs
from fusionjax.merging._sparsify import breadcrumbs_ties
from fusionjax.merging._sparsify import della
from fusionjax.merging._sparsify import della_linear
from fusionjax.merging._sparsify import drop_extremes
from fusionjax.merging._sparsify import magnitude_drop
from fusionjax.merging._sphere import karcher
from fusionjax.merging._sphere import multislerp
from fusionjax.merging._sphere import nuslerp
from fusionjax.merging._ties import disjoint_max
from fusionjax.merging._ties import disjoint_mean
from fusionjax.merging._ties import elect_sign
from fusionjax.merging._ties import l1_rescale
from fusionjax.merging._ties import ties
from fusionjax.merging._ties import trim
from fusionjax.merging._varm import varm
from fusionjax.merging._widen import widen

__all__ = [
    "ContinualMerger",
    "EMROutput",
    "GreedySoupResult",
    "LoRA",
    "LoRASVD",
    "OPCMState",
    "PCBSearchOutput",
    "ReversibleOutput",
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "disjoint_max",
    "disjoint_mean",
    "drop_and_rescale",
    "drop_extremes",
    "elect_sign",
    "emr_merge",
    "emr_task_model",
    "fisher_diagonal",
    "fisher_merging",
    "gram_matrices",
    "greedy_soup",
    "iso_c",
    "iso_cts",
    "karcher",
    "l1_rescale",
    "lora_dare_linear",
    "lora_dare_ties",
    "lora_delta",
    "lora_merge",
    "lora_svd",
    "lora_task_arithmetic",
    "lora_ties",
    "lora_tsv",
    "magmax",
    "magnitude_drop",
    "mean",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "opcm",
    "opcm_merged",
    "pcb_balance",
    "pcb_merging",
    "pcb_scaling_search",
    "regmean",
    "reversible_adapter",
    "reversible_lora",
    "reversible_merge",
    "reversible_task_model",
    "round_to",
    "scale",
    "sce",
    "slerp",
    "slerp_arrays",
    "sum",
    "task_arithmetic",
    "ties",
    "trim",
    "tsv_merge",
    "uniform_soup",
    "varm",
    "weighted_average",
    "widen",
]
