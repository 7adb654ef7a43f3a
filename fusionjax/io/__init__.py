"""Checkpoint input/output: layout maps and vocabulary alignment.

(Minimal version from the layout branch; the io branch owns this file and adds the
safetensors / Orbax readers and writers.)
"""

from fusionjax.io._layout import FAMILIES
from fusionjax.io._layout import KINDS
from fusionjax.io._layout import Layout
from fusionjax.io._layout import LayoutLeaf
from fusionjax.io._layout import LayoutTensor
from fusionjax.io._layout import detect_family
from fusionjax.io._layout import flat_layout
from fusionjax.io._layout import hf_layout
from fusionjax.io._layout import layout_for
from fusionjax.io._vocab import AlignedEmbeddingsOutput
from fusionjax.io._vocab import VocabAlignmentOutput
from fusionjax.io._vocab import align_embeddings
from fusionjax.io._vocab import align_vocabs
from fusionjax.io._vocab import read_vocab

__all__ = [
    "FAMILIES",
    "KINDS",
    "AlignedEmbeddingsOutput",
    "Layout",
    "LayoutLeaf",
    "LayoutTensor",
    "VocabAlignmentOutput",
    "align_embeddings",
    "align_vocabs",
    "detect_family",
    "flat_layout",
    "hf_layout",
    "layout_for",
    "read_vocab",
]
