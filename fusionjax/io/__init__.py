"""Checkpoint IO: Orbax and safetensors, leaf sources and sinks, streaming merges.

The only subpackage that imports ``orbax.checkpoint`` and ``safetensors``.

* :func:`save_safetensors` / :func:`load_safetensors`: flat ``a.b.c`` tensor names
  ↔ nested pytrees, Hugging Face shards with their index, dtypes kept exactly.
* :func:`save_orbax` / :func:`load_orbax`: ``StandardCheckpointer`` with abstract
  and sharded targets.
* :func:`open_checkpoint` / :func:`open_sink`: a checkpoint as a
  :class:`fusionjax.LeafSource` (metadata only until a leaf is read) and a
  :class:`fusionjax.LeafSink` that commits atomically.
* :func:`merge_checkpoints`: :func:`fusionjax.merge` from checkpoints to a
  checkpoint, one leaf at a time, atomic and resumable.
* :func:`opcm_checkpoints`: OPCM continual merging of checkpoints that arrive one
  after another, each read one leaf at a time (memory: base + running sum + a leaf).
* :func:`shardings_for` / :func:`load_sharded` / :func:`merge_sharded`: parameters
  sharded over a mesh (one process or several) restored, merged and saved where
  they are.
* :func:`hf_layout` / :func:`layout_for`: PyTorch / Hugging Face names and array
  layouts (Llama, GPT-2, ViT, timm ViT) mapped to flax-style leaves and back.
* :func:`align_vocabs` / :func:`align_embeddings`: embedding and output rows of
  models with different vocabularies permuted into one vocabulary.
"""

from fusionjax.io._checkpoint import LayoutSink
from fusionjax.io._checkpoint import LayoutSource
from fusionjax.io._checkpoint import detect_format
from fusionjax.io._checkpoint import open_checkpoint
from fusionjax.io._checkpoint import open_sink
from fusionjax.io._continual import OPCMCheckpointsOutput
from fusionjax.io._continual import opcm_checkpoints
from fusionjax.io._layout import FAMILIES
from fusionjax.io._layout import KINDS
from fusionjax.io._layout import Layout
from fusionjax.io._layout import LayoutLeaf
from fusionjax.io._layout import LayoutTensor
from fusionjax.io._layout import detect_family
from fusionjax.io._layout import flat_layout
from fusionjax.io._layout import hf_layout
from fusionjax.io._layout import layout_for
from fusionjax.io._names import nest
from fusionjax.io._names import tree_to_flat
from fusionjax.io._orbax import OrbaxSink
from fusionjax.io._orbax import OrbaxSource
from fusionjax.io._orbax import load_orbax
from fusionjax.io._orbax import save_orbax
from fusionjax.io._safetensors import SafetensorsSink
from fusionjax.io._safetensors import SafetensorsSource
from fusionjax.io._safetensors import load_safetensors
from fusionjax.io._safetensors import save_safetensors
from fusionjax.io._sharded import checkpoint_specs
from fusionjax.io._sharded import default_spec
from fusionjax.io._sharded import load_sharded
from fusionjax.io._sharded import merge_sharded
from fusionjax.io._sharded import save_sharded
from fusionjax.io._sharded import shard_like
from fusionjax.io._sharded import sharded_target
from fusionjax.io._sharded import shardings_for
from fusionjax.io._sink import CheckpointSink
from fusionjax.io._stream_merge import MergeCheckpointsOutput
from fusionjax.io._stream_merge import merge_checkpoints
from fusionjax.io._vocab import AlignedEmbeddingsOutput
from fusionjax.io._vocab import VocabAlignmentOutput
from fusionjax.io._vocab import align_embeddings
from fusionjax.io._vocab import align_vocabs
from fusionjax.io._vocab import read_vocab

__all__ = [
    "OPCMCheckpointsOutput",
    "opcm_checkpoints",
    "checkpoint_specs",
    "default_spec",
    "load_sharded",
    "merge_sharded",
    "save_sharded",
    "shard_like",
    "sharded_target",
    "shardings_for",
    "FAMILIES",
    "KINDS",
    "AlignedEmbeddingsOutput",
    "CheckpointSink",
    "Layout",
    "LayoutLeaf",
    "LayoutSink",
    "LayoutSource",
    "LayoutTensor",
    "MergeCheckpointsOutput",
    "OrbaxSink",
    "OrbaxSource",
    "SafetensorsSink",
    "SafetensorsSource",
    "VocabAlignmentOutput",
    "align_embeddings",
    "align_vocabs",
    "detect_family",
    "detect_format",
    "flat_layout",
    "hf_layout",
    "layout_for",
    "load_orbax",
    "load_safetensors",
    "merge_checkpoints",
    "nest",
    "open_checkpoint",
    "open_sink",
    "read_vocab",
    "save_orbax",
    "save_safetensors",
    "tree_to_flat",
]
