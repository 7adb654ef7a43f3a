r"""Knowledge fusion: distilling several heterogeneous models into one.

When the models to combine differ in architecture and tokenizer, their weights cannot be
merged, and fusing their logits at inference costs every model's forward pass. Knowledge
fusion distils them into one target instead (FuseLLM, FuseChat, InfiFusion, InfiGFusion,
ProFuser, WRPO, FuseRL). Every loss here is a pure function of logits or log-probabilities
and masks, to be used inside the caller's optax loop.

Shared types: :class:`TopK` (a truncated distribution) and :func:`top_k`.
"""

from fusionjax.distill._fuse import FuseLLMOutput
from fusionjax.distill._fuse import clm_loss
from fusionjax.distill._fuse import fuse_teachers
from fusionjax.distill._fuse import fusellm_loss
from fusionjax.distill._fuse import fusion_loss
from fusionjax.distill._fuse import sequence_cross_entropy
from fusionjax.distill._fuse import teacher_weights
from fusionjax.distill._types import TopK
from fusionjax.distill._types import top_k
from fusionjax.distill._uld import ULDOutput
from fusionjax.distill._uld import infifusion_loss
from fusionjax.distill._uld import uld_distance
from fusionjax.distill._uld import uld_loss

__all__ = [
    "FuseLLMOutput",
    "TopK",
    "ULDOutput",
    "clm_loss",
    "fuse_teachers",
    "fusellm_loss",
    "fusion_loss",
    "infifusion_loss",
    "sequence_cross_entropy",
    "teacher_weights",
    "top_k",
    "uld_distance",
    "uld_loss",
]
