r"""Prediction-level fusion: pooling, steering and dynamically weighting models' logits.

Pure, batched, jit-able functions over logits ``[..., V]``, computed in log space and
safe with ``-inf`` (masked) tokens. Pools over stacked ``[M, ..., V]`` predictions:
:func:`mean_logits`, :func:`linear_pool` (mixture), :func:`log_linear_pool` (product of
experts), :func:`max_logits`, and the votes :func:`majority_vote`, :func:`runoff_vote`.
Vocabulary sizes: :func:`match_vocab`, :func:`stack_logits`. Steering one model by the
difference of two others: :func:`proxy_tuning`, :func:`dexperts`,
:func:`contrastive_decoding`, :func:`contrastive_guidance` (with :func:`nucleus_mask`).
Dynamic Logit Fusion's solved per-token weight: :func:`dynamic_alpha`,
:func:`dynamic_logit_fusion`, :func:`fusion_objective`. Feature-level ensembles of
models with per-sample weights: :func:`expert_features`, :func:`ensemble_logits`.
"""

from fusionjax.logits._dynamic import DynamicAlphaOutput
from fusionjax.logits._dynamic import DynamicFusionOutput
from fusionjax.logits._dynamic import dynamic_alpha
from fusionjax.logits._dynamic import dynamic_logit_fusion
from fusionjax.logits._dynamic import fusion_objective
from fusionjax.logits._features import ensemble_logits
from fusionjax.logits._features import expert_features
from fusionjax.logits._pool import linear_pool
from fusionjax.logits._pool import log_linear_pool
from fusionjax.logits._pool import majority_vote
from fusionjax.logits._pool import max_logits
from fusionjax.logits._pool import mean_logits
from fusionjax.logits._pool import runoff_vote
from fusionjax.logits._steering import contrastive_decoding
from fusionjax.logits._steering import contrastive_guidance
from fusionjax.logits._steering import dexperts
from fusionjax.logits._steering import nucleus_mask
from fusionjax.logits._steering import proxy_tuning
from fusionjax.logits._vocab import match_vocab
from fusionjax.logits._vocab import stack_logits

__all__ = [
    "DynamicAlphaOutput",
    "DynamicFusionOutput",
    "contrastive_decoding",
    "contrastive_guidance",
    "dexperts",
    "dynamic_alpha",
    "dynamic_logit_fusion",
    "ensemble_logits",
    "expert_features",
    "fusion_objective",
    "linear_pool",
    "log_linear_pool",
    "majority_vote",
    "match_vocab",
    "max_logits",
    "mean_logits",
    "nucleus_mask",
    "proxy_tuning",
    "runoff_vote",
    "stack_logits",
]
