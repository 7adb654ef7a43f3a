"""Small flax linen architectures used to study and test alignment.

Their submodule names are fixed and documented, so the hand-written permutation specs
in :mod:`fusionjax.alignment` can name their leaves: :class:`MLP`, :class:`VGG`
(a VGG-style CNN), :class:`ResNet` (ResNet-20-like, BatchNorm or LayerNorm) and
:class:`Transformer` (pre-LN transformer blocks over a short sequence of tokens) — and
:class:`Decoder`, a small causal language model with a key/value cache for decoding.
"""

from fusionjax.zoo._cnn import VGG
from fusionjax.zoo._decoder import Decoder
from fusionjax.zoo._mlp import MLP
from fusionjax.zoo._resnet import ResNet
from fusionjax.zoo._transformer import Transformer

__all__ = ["Decoder", "MLP", "ResNet", "Transformer", "VGG"]
