"""Opening checkpoints as leaf sources and sinks, whatever their format."""

from __future__ import annotations

import os
import pathlib
from typing import Any
from typing import Literal

import jax
import numpy as np

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


def output_format(path: str | os.PathLike, format: str | None, like: Any = None) -> str:
    """The output format.

    ``format`` if given; else safetensors for a ``.safetensors`` path; else the
    format of the source ``like`` (the base), so merging safetensors shards into
    a directory gives safetensors shards; else Orbax.
    """
    if format is None:
        if str(path).endswith(".safetensors"):
            return "safetensors"
        raw = getattr(like, "raw", like)  # a LayoutSource reads through its raw source
        return "safetensors" if isinstance(raw, _safetensors.SafetensorsSource) else "orbax"
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


class _SpecSource:
    """Specs only, in a flat ``{name: spec}`` table's names (for building sinks)."""

    def __init__(self, specs: dict[str, Any], where: str):
        tree = _names.nest(specs, where)
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        self.paths = [p for p, _ in flat]
        self.specs = [s for _, s in flat]
        self.kinds = stream.leaf_kinds(tree, self.paths, self.specs)

    def read(self, index: int) -> Any:
        raise TypeError("a spec-only source has no values.")


class LayoutSink:
    """A :class:`fusionjax.LeafSink` that writes target leaves back through a layout.

    It takes the target leaves (flax layout, e.g. ``.../q_proj/kernel [in, out]``) of
    ``like`` by index and writes the checkpoint tensors they come from
    (``...q_proj.weight [out, in]``, names and array layout of the original
    checkpoint) to ``inner``. A tensor built from several leaves (a fused ``qkv``)
    is written once all of them have arrived; until then the sink keeps those
    leaves (as host arrays), and drops each leaf as soon as no pending tensor
    needs it, so it holds at most the parts of the fused tensors in progress.

    Attributes:
      inner: The checkpoint sink the tensors go to (its leaves are the tensors).
      layout: The :class:`fusionjax.io.Layout`.
      path: The output path (``inner.path``).
      names, specs: The output tensors' names and specs (``inner``'s).
      done: Target leaf indices whose tensors a resumed earlier run already wrote.
    """

    def __init__(self, inner: Any, layout: Any, like: Any):
        like = stream.as_source(like)
        self.inner = inner
        self.layout = layout
        self.path = inner.path
        self.names, self.specs = inner.names, inner.specs
        self._leaf_paths = [tuple(_names.key_name(k) for k in p) for p in like.paths]
        index = {p: i for i, p in enumerate(self._leaf_paths)}
        missing = [p for p in layout.leaves if p not in index]
        extra = [p for p in self._leaf_paths if p not in layout.leaves]
        if missing:
            raise ValueError(
                "cannot write through the layout: `like` has no leaf at the layout's target "
                f"path {'/'.join(missing[0])!r} (open the source with the same layout)."
            )
        if extra:
            raise ValueError(
                f"cannot write through the layout: `like` has the leaf {'/'.join(extra[0])!r}, "
                "which is not one of the layout's target leaves."
            )
        for p, s in zip(self._leaf_paths, like.specs, strict=True):
            want = layout.leaves[p].spec
            if tuple(s.shape) != tuple(want.shape):
                raise ValueError(
                    f"cannot write through the layout: the leaf {'/'.join(p)!r} has shape "
                    f"{tuple(s.shape)}, the layout expects {tuple(want.shape)}."
                )
        pos = {n: i for i, n in enumerate(inner.names)}
        self._tensors = []  # (output index, LayoutTensor) per checkpoint tensor
        self._writes: list[list[int]] = [[] for _ in self._leaf_paths]
        for name, t in layout.tensors.items():
            k = len(self._tensors)
            self._tensors.append((pos[name], t, [index[p] for p in t.targets]))
            for p in t.targets:
                self._writes[index[p]].append(k)
        self._pending: dict[int, Any] = {}
        self._waiting = [len(w) for w in self._writes]  # tensors not yet written, per leaf
        self._have: set[int] = set()
        inner_done = set(inner.done)
        self.done = {
            i for i, ks in enumerate(self._writes)
            if all(self._tensors[k][0] in inner_done for k in ks)
        }

    def write(self, index: int, value: Any) -> None:
        """Keeps target leaf ``index`` and writes every tensor it completes."""
        self._have.add(index)
        self._pending[index] = np.asarray(jax.device_get(value))
        for k in self._writes[index]:
            out, t, leaves = self._tensors[k]
            if not all(j in self._have for j in leaves):
                continue
            self.inner.write(out, np.ascontiguousarray(t.fn(*(self._pending[j] for j in leaves))))
            for j in leaves:
                self._waiting[j] -= 1
                if self._waiting[j] == 0:
                    self._pending.pop(j, None)
        if self._waiting[index] == 0:
            self._pending.pop(index, None)

    def finish(self) -> Any:
        """Checks every leaf arrived and completes the inner sink; returns its result.

        Raises:
          ValueError: if a target leaf was never written.
        """
        missing = [i for i in range(len(self._leaf_paths)) if i not in self._have]
        if missing:
            raise ValueError(
                f"cannot finish {self.path}: the leaf {'/'.join(self._leaf_paths[missing[0]])!r} "
                "was never written."
            )
        return self.inner.finish()

    def abort(self) -> None:
        """Aborts the inner sink (keeping its staging directory for a resume)."""
        self._pending.clear()
        self.inner.abort()


def layout_specs(layout: Any) -> dict[str, Any]:
    """The checkpoint tensors' ``{name: ShapeDtypeStruct}`` a layout writes back."""
    return {n: t.spec for n, t in layout.tensors.items()}


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
    layout: Any = None,
    **kwargs: Any,
) -> Any:
    """A :class:`fusionjax.LeafSink` writing a checkpoint atomically, leaf by leaf.

    Nothing is written until the first leaf arrives; everything is staged in a
    hidden directory next to ``path`` and renamed into place by ``finish()``.

    With a ``layout`` the sink takes the layout's *target* leaves (those of a
    source opened with ``open_checkpoint(..., layout=...)``) and writes the
    checkpoint's own tensors: original names, shapes and array layout (torch's
    ``[out, in]``, fused ``qkv`` re-fused), each ``tensor.fn(*leaves)`` written
    contiguous as soon as every leaf it needs has arrived (see :class:`LayoutSink`).

    Args:
      path: The output (a ``.safetensors`` file, a directory of safetensors
        shards, or an Orbax checkpoint directory).
      format: ``"safetensors"`` or ``"orbax"``; when ``None``, ``.safetensors``
        paths are safetensors and anything else Orbax.
      like: The source (or pytree) whose structure and specs the output has.
      dtype: Cast floating-point leaves to this dtype on writing.
      max_shard_bytes: safetensors directory output only: the largest shard.
      layout: A :class:`fusionjax.io.Layout` (e.g. ``source.layout`` of a
        :class:`LayoutSource`) to write the leaves back through; ``like``'s leaf
        paths must be its target paths. ``None``: leaves are written as named.
      **kwargs: Passed to the sink: ``resume_key``, ``progress``, ``overwrite``,
        ``metadata`` (safetensors), ``batch_bytes`` (Orbax).

    Returns:
      A :class:`fusionjax.io.CheckpointSink` (a :class:`LayoutSink` around one
      with a ``layout``); ``finish()`` returns the output path.

    Raises:
      ValueError: if the format is unknown, a leaf cannot be stored, a
        sharding option is given for Orbax, or ``like`` does not have the
        layout's target leaves (naming the first that differs).
      FileNotFoundError: if the output's parent directory does not exist.
    """
    if layout is not None:
        if not (hasattr(layout, "tensors") and hasattr(layout, "leaves")):
            raise TypeError(f"layout must be a fusionjax.io.Layout, got {type(layout).__name__}.")
        where = f"the layout of {path}"
        inner = open_sink(
            path,
            format=format,
            like=_SpecSource(layout_specs(layout), where),
            dtype=dtype,
            max_shard_bytes=max_shard_bytes,
            **kwargs,
        )
        return LayoutSink(inner, layout, like)
    fmt = output_format(path, format)
    if fmt == "safetensors":
        return _safetensors.SafetensorsSink(
            path, like=like, dtype=dtype, max_shard_bytes=max_shard_bytes, **kwargs
        )
    if max_shard_bytes is not None:
        raise ValueError("max_shard_bytes applies to safetensors output only.")
    return _orbax.OrbaxSink(path, like=like, dtype=dtype, **kwargs)
