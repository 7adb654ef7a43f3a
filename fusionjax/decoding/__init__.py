r"""Fused decoding: generate text from a fusion of several language models' logits.

:func:`generate` runs one compiled loop (``lax.while_loop``) over members with their own
architectures, prompts and KV caches, a fusion rule over their next-token logits, and a
sampler; :func:`generate_sharded` spreads a stacked group of experts over devices.
Models enter through :class:`DecoderModel` (:func:`from_linen`, :func:`from_nnx`);
samplers are :func:`greedy` and :func:`sampling` (temperature, top-k, top-p).
"""

from fusionjax.decoding._loop import GenerateOutput
from fusionjax.decoding._loop import Member
from fusionjax.decoding._loop import generate
from fusionjax.decoding._model import DecoderModel
from fusionjax.decoding._model import from_linen
from fusionjax.decoding._model import from_nnx
from fusionjax.decoding._sampling import SamplingConfig
from fusionjax.decoding._sampling import greedy
from fusionjax.decoding._sampling import mask_top_k
from fusionjax.decoding._sampling import mask_top_p
from fusionjax.decoding._sampling import sample
from fusionjax.decoding._sampling import sampling
from fusionjax.decoding._sampling import scale_by_temperature
from fusionjax.decoding._sharded import generate_sharded

__all__ = [
    "DecoderModel",
    "GenerateOutput",
    "Member",
    "SamplingConfig",
    "from_linen",
    "from_nnx",
    "generate",
    "generate_sharded",
    "greedy",
    "mask_top_k",
    "mask_top_p",
    "sample",
    "sampling",
    "scale_by_temperature",
]
