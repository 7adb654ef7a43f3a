"""Opening checkpoints as leaf sources and sinks, whatever their format."""

from __future__ import annotations

import os
import pathlib
from typing import Any
from typing import Literal

import jax

from fusionjax._src import stream
from fusionjax.io import _names
from fusionjax.io import _orbax
from fusionjax.io import _safetensors

Format = Literal["safetensors", "orbax"]
FORMATS = ("safetensors", "orbax")


def detect_format(path: str | os.PathLike) -> str:
    """``"safetensors"`` or ``"orbax"`` from what is at ``path``.

    Args:
      path: A ``.safetensors`` file or a checkpoint directory.

    Returns:
      The format's name.

    Raises:
      FileNotFoundError: if nothing is at ``path``.
      ValueError: if it is neither format.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_file():
        if p.suffix == ".safetensors":
            return "safetensors"
        raise ValueError(f"{p} is a file but not a .safetensors file; cannot tell its format.")
    if _orbax.is_orbax_dir(p):
        return "orbax"
    if any(p.glob("*.safetensors")) or any(p.glob("*.safetensors.index.json")):
        return "safetensors"
    raise ValueError(
        f"{p} is neither a safetensors checkpoint (no *.safetensors files) nor an Orbax "
        "checkpoint (no _METADATA file)."
    )


def output_format(path: str | os.PathLike, format: str | None) -> str:
    """The output format: ``format``, or ``.safetensors`` paths safetensors, else orbax."""
    if format is None:
        return "safetensors" if str(path).endswith(".safetensors") else "orbax"
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
    return format


class LayoutSource:
    """A :class:`fusionjax.LeafSource` that maps a flat checkpoint through a layout.

    Each target leaf is ``leaf.fn(*tensors)`` of the checkpoint tensors it is
    built from; tensors are read from the underlying source when the leaf is read.
    """

    def __init__(self, raw: Any, layout: Any):
        self.raw = raw
        self.layout = layout
        self.path = getattr(raw, "path", None)
        self._pos = {n: i for i, n in enumerate(raw.names)}
        tree = layout.abstract()
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        self.paths = [p for p, _ in flat]
        self.specs = [s for _, s in flat]
        self.names = _names.flat_names(self.paths)
        self._leaves = [layout.leaves[tuple(_names.key_name(k) for k in p)] for p in self.paths]
        self.kinds = stream.leaf_kinds(tree, self.paths, self.specs)

    def read(self, index: int) -> Any:
        """Leaf ``index``, computed from its checkpoint tensors."""
        leaf = self._leaves[index]
        return leaf.fn(*(self.raw.read(self._pos[n]) for n in leaf.sources))


def _resolve_layout(layout: Any, raw: Any) -> Any:
    if layout is None:
        return None
    specs = dict(zip(raw.names, raw.specs, strict=True))
    if isinstance(layout, str):
        from fusionjax.io import _layout

        if layout in ("hf", "auto"):
            return _layout.hf_layout(specs)
        return _layout.layout_for(layout, specs)
    if hasattr(layout, "leaves") and hasattr(layout, "abstract"):
        return layout
    if callable(layout):
        return layout(specs)
    raise TypeError(f"layout must be a Layout, a family name or a callable, got {layout!r}.")


def open_checkpoint(
    path: str | os.PathLike,
    *,
    format: Format | None = None,
    target: Any = None,
    layout: Any = None,
    batch_bytes: int | None = None,
) -> stream.LeafSource:
    """Opens a checkpoint as a :class:`fusionjax.LeafSource`, reading only its metadata.

    Leaves are nested dicts of string keys split from the tensor names on
    ``"."``, so ``fusionjax.by_path`` patterns see ``model/layers/3/mlp/w``
    whichever the format. Nothing but headers / Orbax metadata is read here;
    ``source.read(i)`` reads one leaf (safetensors: memory-mapped; Orbax: a
    partial restore, batched up to ``batch_bytes``).

    Args:
      path: A ``.safetensors`` file, a directory of safetensors shards, or an
        Orbax checkpoint directory.
      format: ``"safetensors"`` or ``"orbax"``; detected from ``path`` when ``None``.
      target: Optional pytree whose leaves are matched to the tensors by flat
        name (shapes and dtypes checked); leaves with a ``sharding`` are read
        onto it.
      layout: Optional layout from :mod:`fusionjax.io._layout`: a ``Layout``,
        a family name (``"llama"``, ``"gpt2"``, ``"vit"``, ``"timm_vit"``, or
        ``"hf"`` to detect it), or a callable ``{name: spec} -> Layout`` such as
        ``hf_layout``. Leaves are then the layout's target leaves.
      batch_bytes: Orbax only: bytes of consecutive leaves fetched per restore call.

    Returns:
      A source with ``treedef``, ``paths``, ``specs``, ``kinds``, ``names`` and ``read(i)``.

    Raises:
      FileNotFoundError: if the checkpoint or one of its files is missing.
      ValueError: if the format cannot be told, a header or index is corrupt,
        or ``target`` does not match, naming the file.

    Examples:
      >>> import numpy as np, tempfile, os
      >>> from fusionjax import io
      >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
      >>> _ = io.save_safetensors({"layers": [{"w": np.ones(3, np.float32)}]}, p)
      >>> src = io.open_checkpoint(p)
      >>> src.names, src.specs[0].shape
      (['layers.0.w'], (3,))
    """
    fmt = detect_format(path) if format is None else output_format(path, format)
    if fmt == "safetensors":
        raw = _safetensors.SafetensorsSource(path, target=None if layout else target)
    else:
        kw = {} if batch_bytes is None else {"batch_bytes": batch_bytes}
        raw = _orbax.OrbaxSource(path, target=None if layout else target, **kw)
    lay = _resolve_layout(layout, raw)
    return raw if lay is None else LayoutSource(raw, lay)


def open_sink(
    path: str | os.PathLike,
    *,
    format: Format | None = None,
    like: Any,
    dtype: Any = None,
    max_shard_bytes: int | None = None,
    **kwargs: Any,
) -> Any:
    """A :class:`fusionjax.LeafSink` writing a checkpoint atomically, leaf by leaf.

    Nothing is written until the first leaf arrives; everything is staged in a
    hidden directory next to ``path`` and renamed into place by ``finish()``.

    Args:
      path: The output (a ``.safetensors`` file, a directory of safetensors
        shards, or an Orbax checkpoint directory).
      format: ``"safetensors"`` or ``"orbax"``; when ``None``, ``.safetensors``
        paths are safetensors and anything else Orbax.
      like: The source (or pytree) whose structure and specs the output has.
      dtype: Cast floating-point leaves to this dtype on writing.
      max_shard_bytes: safetensors directory output only: the largest shard.
      **kwargs: Passed to the sink: ``resume_key``, ``progress``, ``overwrite``,
        ``metadata`` (safetensors), ``batch_bytes`` (Orbax).

    Returns:
      A :class:`fusionjax.io.CheckpointSink`; ``finish()`` returns the output path.

    Raises:
      ValueError: if the format is unknown, a leaf cannot be stored, or a
        sharding option is given for Orbax.
      FileNotFoundError: if the output's parent directory does not exist.
    """
    fmt = output_format(path, format)
    if fmt == "safetensors":
        return _safetensors.SafetensorsSink(
            path, like=like, dtype=dtype, max_shard_bytes=max_shard_bytes, **kwargs
        )
    if max_shard_bytes is not None:
        raise ValueError("max_shard_bytes applies to safetensors output only.")
    return _orbax.OrbaxSink(path, like=like, dtype=dtype, **kwargs)
