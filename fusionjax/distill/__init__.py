r"""Knowledge fusion: distilling several heterogeneous models into one.

When the models to combine differ in architecture and tokenizer, their weights cannot be
merged, and fusing their logits at inference costs every model's forward pass. Knowledge
fusion distils them into one target instead (FuseLLM, FuseChat, InfiFusion, InfiGFusion,
ProFuser, WRPO, FuseRL). Every loss here is a pure function of logits or log-probabilities
and masks, to be used inside the caller's optax loop.

Shared types: :class:`TopK` (a truncated distribution) and :func:`top_k`.
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
from fusionjax.distill._types import TopK
from fusionjax.distill._types import top_k
from fusionjax.distill._vocab import ProjectionOutput
from fusionjax.distill._vocab import StatisticalMap
from fusionjax.distill._vocab import carry_top_k
from fusionjax.distill._vocab import dense_log_probs
from fusionjax.distill._vocab import map_vocab
from fusionjax.distill._vocab import project_positions
from fusionjax.distill._vocab import statistical_map

__all__ = [
    "TopK",
    "top_k",
    "AlignmentSpans",
    "TokenAlignment",
    "align_by_offsets",
    "align_by_text",
    "align_tokens",
    "align_tokens_batch",
    "dtw_reference",
    "edit_distances",
    "normalize_token",
    "stack_source_index",
    "ProjectionOutput",
    "StatisticalMap",
    "carry_top_k",
    "dense_log_probs",
    "map_vocab",
    "project_positions",
    "statistical_map",
]
