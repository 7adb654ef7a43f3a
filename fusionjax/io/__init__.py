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
"""

from fusionjax.io._checkpoint import LayoutSource
from fusionjax.io._checkpoint import detect_format
from fusionjax.io._checkpoint import open_checkpoint
from fusionjax.io._checkpoint import open_sink
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
from fusionjax.io._sink import CheckpointSink
from fusionjax.io._stream_merge import MergeCheckpointsOutput
from fusionjax.io._stream_merge import merge_checkpoints

__all__ = [
    "CheckpointSink",
    "LayoutSource",
    "MergeCheckpointsOutput",
    "OrbaxSink",
    "OrbaxSource",
    "SafetensorsSink",
    "SafetensorsSource",
    "detect_format",
    "load_orbax",
    "load_safetensors",
    "merge_checkpoints",
    "nest",
    "open_checkpoint",
    "open_sink",
    "save_orbax",
    "save_safetensors",
    "tree_to_flat",
]
