r"""Knowledge fusion: distilling several heterogeneous models into one.

When the models to combine differ in architecture and tokenizer, their weights cannot be
merged, and fusing their logits at inference costs every model's forward pass. Knowledge
fusion distils them into one target instead (FuseLLM, FuseChat, InfiFusion, InfiGFusion,
ProFuser, WRPO, FuseRL). Every loss here is a pure function of logits or log-probabilities
and masks, to be used inside the caller's optax loop.

Shared types: :class:`TopK` (a truncated distribution) and :func:`top_k`.
"""

from fusionjax.distill._graph import CoactivationOutput
from fusionjax.distill._graph import InfiGFusionOutput
from fusionjax.distill._graph import coactivation_graph
from fusionjax.distill._graph import gw_cost
from fusionjax.distill._graph import infigfusion_loss
from fusionjax.distill._graph import infigfusion_objective
from fusionjax.distill._graph import multi_teacher_infigfusion_loss
from fusionjax.distill._graph import permutation_gw
from fusionjax.distill._graph import sorted_gw
from fusionjax.distill._types import TopK
from fusionjax.distill._types import top_k

__all__ = [
    "CoactivationOutput",
    "InfiGFusionOutput",
    "coactivation_graph",
    "gw_cost",
    "infigfusion_loss",
    "infigfusion_objective",
    "multi_teacher_infigfusion_loss",
    "permutation_gw",
    "sorted_gw",
    "TopK",
    "top_k",
]
