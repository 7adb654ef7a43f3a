r"""Learned merging: coefficients trained inside optax loops.

The pieces compose with a user's own loop: :func:`init_coefficients` (task-wise,
layer-wise or block-wise coefficients, an ordinary pytree), :func:`combine` (the merge
:math:`\theta_0 + \sum_t \lambda_t \odot \tau_t`, differentiable in the
coefficients only) and the objectives :func:`adamerging_loss` and :func:`atlas_loss`.
Ready loops with the papers' defaults: :func:`adamerging`, :func:`adamerging_plus_plus`,
:func:`atlas`. Beyond one set of coefficients: :func:`wemoe` (dense layers become
weight-ensembling mixtures of experts with input-dependent routers),
:func:`neural_ligand` (a Portland network's per-input weights, as an ensemble and as the
merge they induce) and :func:`twin_merging` (a shared merge plus SVD-compressed exclusive
parts of every model, mixed per input by a router trained to recognise the task).
Evolutionary: :func:`m2n2` (an archive of models merged pairwise at random split points,
with fitness sharing and attraction-based mate selection; its pure pieces
:func:`crossover`, :func:`shared_fitness`, :func:`attraction`). Expert Merging:
:func:`expert_merging` aligns the merge's hidden states and logits with each expert's on
unlabeled inputs (:func:`expert_merging_loss`), and :func:`expert_merging_plus_plus` adds
importance-guided chunks
(:func:`layer_importance`, :func:`importance_chunks`).
"""

from fusionjax.learned._coefficients import coefficient_table
from fusionjax.learned._coefficients import combine
from fusionjax.learned._coefficients import effective
from fusionjax.learned._coefficients import init_coefficients
from fusionjax.learned._coefficients import random_blocks
from fusionjax.learned._coefficients import stacked_task_vectors
from fusionjax.learned._ensemble import ensemble_logits
from fusionjax.learned._ensemble import expert_features
from fusionjax.learned._ensemble import merged_features
from fusionjax.learned._ensemble import merged_logits
from fusionjax.learned._expert import Chunks
from fusionjax.learned._expert import ExpertMergingOutput
from fusionjax.learned._expert import chunk_logits
from fusionjax.learned._expert import expert_coefficients
from fusionjax.learned._expert import expert_merging
from fusionjax.learned._expert import expert_merging_loss
from fusionjax.learned._expert import expert_merging_plus_plus
from fusionjax.learned._expert import expert_targets
from fusionjax.learned._expert import importance_chunks
from fusionjax.learned._expert import layer_importance
from fusionjax.learned._ligand import NeuralLigandOutput
from fusionjax.learned._ligand import neural_ligand
from fusionjax.learned._ligand import neural_ligand_loss
from fusionjax.learned._ligand import offset_matrix
from fusionjax.learned._loop import LearnedMergeOutput
from fusionjax.learned._loop import adamerging
from fusionjax.learned._loop import adamerging_plus_plus
from fusionjax.learned._loop import atlas
from fusionjax.learned._loop import fit_coefficients
from fusionjax.learned._loop import sample_batches
from fusionjax.learned._m2n2 import M2N2Output
from fusionjax.learned._m2n2 import attraction
from fusionjax.learned._m2n2 import crossover
from fusionjax.learned._m2n2 import m2n2
from fusionjax.learned._m2n2 import shared_fitness
from fusionjax.learned._moe import init_routers
from fusionjax.learned._moe import moe_dense
from fusionjax.learned._moe import routing_weights
from fusionjax.learned._objectives import adamerging_loss
from fusionjax.learned._objectives import atlas_loss
from fusionjax.learned._objectives import entropy
from fusionjax.learned._portland import init_portland
from fusionjax.learned._portland import portland_weights
from fusionjax.learned._twin import TwinMergingOutput
from fusionjax.learned._twin import exclusive_factors
from fusionjax.learned._twin import twin_apply
from fusionjax.learned._twin import twin_dense
from fusionjax.learned._twin import twin_features
from fusionjax.learned._twin import twin_logits
from fusionjax.learned._twin import twin_merging
from fusionjax.learned._twin import twin_weights
from fusionjax.learned._wemoe import WEMoEOutput
from fusionjax.learned._wemoe import wemoe
from fusionjax.learned._wemoe import wemoe_apply
from fusionjax.learned._wemoe import wemoe_logits
from fusionjax.learned._wemoe import wemoe_loss
from fusionjax.learned._wemoe import wemoe_upscale

__all__ = [
    "Chunks",
    "ExpertMergingOutput",
    "LearnedMergeOutput",
    "M2N2Output",
    "NeuralLigandOutput",
    "TwinMergingOutput",
    "WEMoEOutput",
    "adamerging",
    "adamerging_loss",
    "adamerging_plus_plus",
    "atlas",
    "atlas_loss",
    "attraction",
    "chunk_logits",
    "coefficient_table",
    "combine",
    "crossover",
    "effective",
    "ensemble_logits",
    "entropy",
    "exclusive_factors",
    "expert_coefficients",
    "expert_features",
    "expert_merging",
    "expert_merging_loss",
    "expert_merging_plus_plus",
    "expert_targets",
    "fit_coefficients",
    "importance_chunks",
    "init_coefficients",
    "init_portland",
    "init_routers",
    "m2n2",
    "layer_importance",
    "merged_features",
    "merged_logits",
    "moe_dense",
    "neural_ligand",
    "neural_ligand_loss",
    "offset_matrix",
    "portland_weights",
    "random_blocks",
    "routing_weights",
    "sample_batches",
    "shared_fitness",
    "stacked_task_vectors",
    "twin_apply",
    "twin_dense",
    "twin_features",
    "twin_logits",
    "twin_merging",
    "twin_weights",
    "wemoe",
    "wemoe_apply",
    "wemoe_logits",
    "wemoe_loss",
    "wemoe_upscale",
]
