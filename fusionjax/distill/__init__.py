r"""Knowledge fusion: distilling several heterogeneous models into one.

When the models to combine differ in architecture and tokenizer, their weights cannot be
merged, and fusing their logits at inference costs every model's forward pass. Knowledge
fusion distils them into one target instead (FuseLLM, FuseChat, InfiFusion, InfiGFusion,
ProFuser, WRPO, FuseRL). Every loss is a pure function of logits or log-probabilities and
masks, for the caller's optax loop; :func:`distill` is a ready compiled loop.

- **Token alignment** of two tokenizations of one text: FuseLLM's DTW
  (:func:`align_tokens`, :func:`align_tokens_batch`, :func:`dtw_reference`) and exact
  alignments from character offsets or spellings (:func:`align_by_offsets`,
  :func:`align_by_text`); :class:`TokenAlignment` with its 1:1 / 1:n / n:1 spans.
- **Vocabulary mapping**: exact and minimum-edit-distance (:func:`map_vocab`), from
  co-occurrence counts (:func:`statistical_map`); a teacher's top-k carried into the
  target vocabulary and onto the target's positions (:func:`carry_top_k`,
  :func:`project_positions`, :func:`dense_log_probs`); for byte-level students, a token
  distribution's exact next-byte distributions (:func:`next_byte_distributions`).
- **Fused teachers and FuseLLM's objective**: :func:`sequence_cross_entropy`,
  :func:`teacher_weights`, :func:`fuse_teachers` (MinCE, AvgCE), :func:`fusion_loss`,
  :func:`clm_loss`, :func:`fusellm_loss`.
- **Vocabulary-free distillation**: :func:`uld_distance`, :func:`uld_loss`,
  :func:`infifusion_loss`; InfiGFusion's graphs on logits and sorting-based
  Gromov-Wasserstein (:func:`coactivation_graph`, :func:`sorted_gw`,
  :func:`infigfusion_loss`, ...).
- **Source selection**: a selector network with top-k routing and its balancing
  feedback loss, ProFuser's training- and inference-mode advantages.
- **Preference route**: :func:`dpo_loss`, :func:`simpo_loss`, :func:`wrpo_loss` with
  :func:`wrpo_alpha`, FuseRL's :func:`fuserl_weights`, :func:`fuserl_sft_loss`,
  :func:`fuserl_po_loss`.

FuseChat's second stage merges the distilled targets with :func:`fusionjax.merging.varm`
and :func:`fusionjax.merging.sce`. Shared types: :class:`TopK` and :func:`top_k`.
"""

from fusionjax.distill._align import AlignmentSpans
from fusionjax.distill._align import TokenAlignment
from fusionjax.distill._align import align_by_offsets
from fusionjax.distill._align import align_by_text
from fusionjax.distill._align import align_tokens
from fusionjax.distill._align import align_tokens_batch
from fusionjax.distill._align import dtw_reference
from fusionjax.distill._align import edit_distances
from fusionjax.distill._align import normalize_token
from fusionjax.distill._align import stack_source_index
from fusionjax.distill._bytes import ByteTargetsOutput
from fusionjax.distill._bytes import TokenBytes
from fusionjax.distill._bytes import next_byte_distributions
from fusionjax.distill._bytes import token_bytes
from fusionjax.distill._fuse import FuseLLMOutput
from fusionjax.distill._fuse import clm_loss
from fusionjax.distill._fuse import fuse_teachers
from fusionjax.distill._fuse import fusellm_loss
from fusionjax.distill._fuse import fusion_loss
from fusionjax.distill._fuse import sequence_cross_entropy
from fusionjax.distill._fuse import teacher_weights
from fusionjax.distill._graph import CoactivationOutput
from fusionjax.distill._graph import InfiGFusionOutput
from fusionjax.distill._graph import coactivation_graph
from fusionjax.distill._graph import gw_cost
from fusionjax.distill._graph import infigfusion_loss
from fusionjax.distill._graph import infigfusion_objective
from fusionjax.distill._graph import multi_teacher_infigfusion_loss
from fusionjax.distill._graph import permutation_gw
from fusionjax.distill._graph import sorted_gw
from fusionjax.distill._loop import DistillOutput
from fusionjax.distill._loop import distill
from fusionjax.distill._loop import sample_batch
from fusionjax.distill._preference import PreferenceOutput
from fusionjax.distill._preference import dpo_loss
from fusionjax.distill._preference import fuserl_po_loss
from fusionjax.distill._preference import fuserl_sft_loss
from fusionjax.distill._preference import fuserl_weights
from fusionjax.distill._preference import simpo_loss
from fusionjax.distill._preference import wrpo_alpha
from fusionjax.distill._preference import wrpo_loss
from fusionjax.distill._select import fuse_selected
from fusionjax.distill._select import inference_mode_advantage
from fusionjax.distill._select import init_selector
from fusionjax.distill._select import profuser_weights
from fusionjax.distill._select import select_sources
from fusionjax.distill._select import selection_feedback_loss
from fusionjax.distill._select import selector_scores
from fusionjax.distill._select import top_k_mask
from fusionjax.distill._select import training_mode_advantage
from fusionjax.distill._types import TopK
from fusionjax.distill._types import top_k
from fusionjax.distill._uld import ULDOutput
from fusionjax.distill._uld import infifusion_loss
from fusionjax.distill._uld import uld_distance
from fusionjax.distill._uld import uld_loss
from fusionjax.distill._uld import uld_teacher_targets
from fusionjax.distill._vocab import ProjectionOutput
from fusionjax.distill._vocab import StatisticalMap
from fusionjax.distill._vocab import carry_top_k
from fusionjax.distill._vocab import dense_log_probs
from fusionjax.distill._vocab import map_vocab
from fusionjax.distill._vocab import project_positions
from fusionjax.distill._vocab import statistical_map

__all__ = [
    "AlignmentSpans",
    "ByteTargetsOutput",
    "CoactivationOutput",
    "DistillOutput",
    "FuseLLMOutput",
    "InfiGFusionOutput",
    "PreferenceOutput",
    "ProjectionOutput",
    "StatisticalMap",
    "TokenAlignment",
    "TokenBytes",
    "TopK",
    "ULDOutput",
    "align_by_offsets",
    "align_by_text",
    "align_tokens",
    "align_tokens_batch",
    "carry_top_k",
    "clm_loss",
    "coactivation_graph",
    "dense_log_probs",
    "distill",
    "dpo_loss",
    "dtw_reference",
    "edit_distances",
    "fuse_selected",
    "fuse_teachers",
    "fusellm_loss",
    "fuserl_po_loss",
    "fuserl_sft_loss",
    "fuserl_weights",
    "fusion_loss",
    "gw_cost",
    "inference_mode_advantage",
    "infifusion_loss",
    "infigfusion_loss",
    "infigfusion_objective",
    "init_selector",
    "map_vocab",
    "multi_teacher_infigfusion_loss",
    "next_byte_distributions",
    "normalize_token",
    "permutation_gw",
    "profuser_weights",
    "project_positions",
    "sample_batch",
    "select_sources",
    "selection_feedback_loss",
    "selector_scores",
    "sequence_cross_entropy",
    "simpo_loss",
    "sorted_gw",
    "stack_source_index",
    "statistical_map",
    "teacher_weights",
    "token_bytes",
    "top_k",
    "top_k_mask",
    "training_mode_advantage",
    "uld_distance",
    "uld_loss",
    "uld_teacher_targets",
    "wrpo_alpha",
    "wrpo_loss",
]
