r"""Knowledge fusion: distilling several heterogeneous models into one.

When the models to combine differ in architecture and tokenizer, their weights cannot be
merged, and fusing their logits at inference costs every model's forward pass. Knowledge
fusion distils them into one target instead (FuseLLM, FuseChat, InfiFusion, InfiGFusion,
ProFuser, WRPO, FuseRL). Every loss here is a pure function of logits or log-probabilities
and masks, to be used inside the caller's optax loop.

Shared types: :class:`TopK` (a truncated distribution) and :func:`top_k`.
"""

from fusionjax.distill._bytes import ByteTargetsOutput
from fusionjax.distill._bytes import TokenBytes
from fusionjax.distill._bytes import next_byte_distributions
from fusionjax.distill._bytes import token_bytes
from fusionjax.distill._loop import DistillOutput
from fusionjax.distill._loop import distill
from fusionjax.distill._loop import sample_batch
from fusionjax.distill._types import TopK
from fusionjax.distill._types import top_k

__all__ = [
    "ByteTargetsOutput",
    "DistillOutput",
    "TokenBytes",
    "TopK",
    "distill",
    "next_byte_distributions",
    "sample_batch",
    "token_bytes",
    "top_k",
]
