r"""Streaming merges: from checkpoints on disk to a checkpoint on disk, leaf by leaf.

:func:`merge_checkpoints` opens every input as a :class:`fusionjax.LeafSource`
(reading headers and metadata only), checks files, structure, shapes and dtypes,
and runs :func:`fusionjax.merge` with a checkpoint sink. For each leaf it reads
that leaf from the :math:`N` inputs, merges it and writes it out, so

.. math:: \text{peak memory} \approx (N + 1) \times \text{largest leaf}

plus the readers' and writer's batches (Orbax: ``batch_bytes`` per source and
for the writer; safetensors: none), independent of the model's size. Leaves
are read whole (no chunking of a large leaf). Model-wide methods (e.g. TIES with
``scope="model"``) read every leaf once more per statistic pass.

**Layouts.** Hugging Face checkpoints opened with a layout (``layout="hf"``)
are merged as flax leaves and, by default (``out_layout="checkpoint"``),
written back in the checkpoint's own names and torch layout through
:class:`fusionjax.io.LayoutSink`: merging Hugging Face checkpoints gives a
Hugging Face checkpoint. A fused tensor (GPT-2's ``c_attn``) is written when
its query, key and value leaves have all been merged; until then only those
parts are held.

**Sharded and multi-process.** With ``mesh=`` (or a ``target=`` whose leaves
carry shardings) every input leaf is read straight onto its sharding, the
sources' specs say so (the merge plans sharded leaves from metadata and reads
each leaf once), and an Orbax output is written by every process from its own
shards; process 0 alone stages and commits (:mod:`fusionjax.io._atomic`).
Every process of a ``jax.distributed`` run calls :func:`merge_checkpoints`
with the same arguments.

**Atomic output.** The output is staged in a hidden directory next to ``out``
and renamed into place after the last leaf is merged and the NaN/Inf check
passed: an interrupted merge (even by ``SIGKILL``) leaves nothing at ``out``.

**Resume.** The staging directory holds a fingerprint of the merge (the input
files' paths, sizes and modification times, the merger and its
hyperparameters, the key, the output format, dtype and sharding) and a journal
of the leaves already made durable. A re-run with the same fingerprint keeps
them: for a leafwise merger it neither reads nor writes them again (the inputs
of those leaves are replaced by zeros, whose merge is discarded); for a
model-wide merger the statistics need every leaf, so everything is read again
but finished leaves are not rewritten. Any other re-run starts afresh.

What costs time, and what is done about it: reading and writing are the cost
(the merge kernels are compiled once per leaf shape); safetensors inputs are
memory-mapped, outputs are written at precomputed offsets with ``pwrite``, and
nothing is copied between leaves.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import numpy as np

from fusionjax._src import stream
from fusionjax._src import validation
from fusionjax._src.merge import merge
from fusionjax.io import _checkpoint
from fusionjax.io import _sink


class MergeCheckpointsOutput(NamedTuple):
    """What :func:`merge_checkpoints` did.

    Attributes:
      path: The committed output.
      format: ``"safetensors"`` or ``"orbax"``.
      num_leaves: Leaves in the output.
      bytes_written: Bytes of tensor data in the output.
      resumed_leaves: Leaves kept from an interrupted earlier run.
      seconds: Wall time of the merge.
    """

    path: pathlib.Path
    format: str
    num_leaves: int
    bytes_written: int
    resumed_leaves: int
    seconds: float


def _as_source(x: Any, what: str, layout: Any = None, target: Any = None) -> Any:
    if isinstance(x, (str, os.PathLike)):
        try:
            return _checkpoint.open_checkpoint(x, layout=layout, target=target)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{what}: {e}") from None
    if isinstance(x, stream.LeafSource) and not isinstance(x, dict):
        return x
    raise TypeError(f"{what} must be a checkpoint path or a fusionjax.LeafSource, got {type(x)}.")


def output_path(out: str | os.PathLike, sources: Sequence[Any]) -> pathlib.Path:
    """``out`` as an absolute path, checked not to be one of the inputs (base first)."""
    out_path = pathlib.Path(out).absolute()
    for j, s in enumerate(sources):
        p = getattr(s, "path", None)
        if p is not None and pathlib.Path(p).absolute() == out_path:
            who = "base" if j == 0 else f"finetuned[{j - 1}]"
            raise ValueError(f"the output {out_path} is also the input {who}.")
    return out_path


def _files_of(path: pathlib.Path) -> list[pathlib.Path]:
    if path.is_file():
        return [path]
    return sorted(f for f in path.rglob("*") if f.is_file())


def _hash_tree(h, tree: Any) -> None:
    leaves, treedef = jax.tree.flatten(tree)
    # Static parts may print function objects: drop their (per-process) addresses.
    h.update(re.sub(r" at 0x[0-9a-fA-F]+", "", str(treedef)).encode())
    for x in leaves:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            a = np.asarray(jax.device_get(x))
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        else:
            h.update(repr(x).encode())


def fingerprint(sources: Sequence[Any], merger: Any, key: Any, settings: dict, extras: dict):
    """A hex digest identifying a merge, or ``None`` if an input has no files to identify it by."""
    h = hashlib.sha256()
    for s in sources:
        path = getattr(s, "path", None)
        if path is None:
            return None
        path = pathlib.Path(path).absolute()
        h.update(str(path).encode())
        for f in _files_of(path):
            st = f.stat()
            h.update(
                f"{f.relative_to(path) if f != path else ''}:{st.st_size}:{st.st_mtime_ns}".encode()
            )
        h.update(repr(list(getattr(s, "names", []))).encode())
    _hash_tree(h, merger)
    _hash_tree(h, key)
    h.update(repr(sorted(settings.items())).encode())
    for k in sorted(extras):
        h.update(k.encode())
        _hash_tree(h, extras[k])
    return h.hexdigest()


class _SkipDone:
    """A source whose finished leaves read as zeros (their merge is discarded by the sink)."""

    def __init__(self, src: Any, done: set[int]):
        self._src, self._done = src, done
        self.treedef, self.paths, self.specs, self.kinds = (
            src.treedef,
            src.paths,
            src.specs,
            src.kinds,
        )

    def read(self, index: int) -> Any:
        if index in self._done and stream.is_array_like(self.specs[index]):
            s = self.specs[index]
            return np.zeros(s.shape, s.dtype)
        return self._src.read(index)


def _read_target(base: Any, mesh: Any, rules: Any, target: Any, layout: Any) -> Any:
    """The sharded target the inputs are read onto (``None``: read to the host)."""
    if mesh is None and target is None:
        if rules is not None:
            raise ValueError("rules= needs a mesh= to split the leaves over.")
        return None
    if mesh is not None and target is not None:
        raise ValueError("pass mesh= (with rules=) or target=, not both.")
    if layout is not None:
        raise ValueError(
            "a sharded merge (mesh= or target=) reads the tensors as stored; it cannot be "
            "combined with layout=."
        )
    if target is not None:
        return target
    from fusionjax.io import _sharded

    src = _as_source(base, "base")
    return _sharded.sharded_target(src.treedef.unflatten(src.specs), mesh, rules=rules)


def merge_checkpoints(
    base: Any,
    finetuned: Sequence[Any],
    merger: Any,
    out: str | os.PathLike,
    *,
    format: str | None = None,
    dtype: Any = None,
    key: Any = None,
    progress: Any = True,
    resume: bool = True,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    layout: Any = None,
    out_layout: str = "checkpoint",
    mesh: Any = None,
    rules: Any = None,
    target: Any = None,
    **extras: Any,
) -> MergeCheckpointsOutput:
    r"""Merges checkpoints on disk into a checkpoint on disk, one leaf at a time.

    Equivalent to ``fusionjax.merge(load(base), [load(f) ...], merger, key=key)``
    saved to ``out`` — the same values bit for bit, random methods included
    (each leaf's key comes from ``key`` and its path) — with peak memory near
    :math:`(N+1)\times` the largest leaf instead of :math:`N+1` models.

    Args:
      base: The base checkpoint: a path (safetensors file or directory, Orbax
        directory) or a :class:`fusionjax.LeafSource` (e.g. from
        :func:`fusionjax.io.open_checkpoint` with a ``layout``).
      finetuned: The fine-tuned checkpoints, paths or sources; formats may mix.
      merger: A merging method, e.g. ``fusionjax.merging.ties(density=0.2)``.
      out: The output path: a ``.safetensors`` file, a directory of safetensors
        shards, or an Orbax checkpoint directory.
      format: ``"safetensors"`` or ``"orbax"``; ``None``: ``.safetensors`` paths
        and outputs of a safetensors base are safetensors, anything else Orbax.
      dtype: Cast floating-point output leaves to this dtype (e.g.
        ``jnp.bfloat16``); ``None`` keeps the inputs' dtypes.
      key: PRNG key for random methods (DARE, DELLA).
      progress: ``True`` for a tqdm bar (bytes written, bytes/s, current leaf),
        ``False``/``None`` for none, or a tqdm-like class or bar.
      resume: Continue an interrupted run of the same merge (see the module
        docstring); ``False`` starts afresh.
      overwrite: Replace an existing ``out`` (else ``FileExistsError`` before
        anything is read).
      max_shard_bytes: safetensors directory output: the largest shard.
      layout: How checkpoints given as paths are opened: ``None`` (tensors as
        stored), or a layout for :func:`fusionjax.io.open_checkpoint` (``"hf"``,
        a family name, a ``Layout`` or a callable): the merge then sees flax
        leaves (``q_proj/kernel [in, out]``, fused ``c_attn`` split into
        query/key/value), so per-leaf methods and ``fj.by_path`` patterns work
        on those.
      out_layout: ``"checkpoint"`` (the default): when the base has a layout
        (opened with ``layout=`` here, or a :class:`fusionjax.io.LayoutSource`),
        the output is written back through it — the checkpoint's own tensor
        names, shapes and torch layout, fused tensors re-fused — so merging
        Hugging Face checkpoints gives a Hugging Face checkpoint.
        ``"target"``: the merged target leaves are written as they are, named
        by their target paths (``model.layers.0.self_attn.q_proj.kernel``).
        Without a layout both are the same.
      mesh: A :class:`jax.sharding.Mesh` to merge on: every leaf of the
        checkpoints given as paths is read straight onto its sharding (from
        :func:`fusionjax.io._sharded.shardings_for` with ``rules``), each
        process reading only the slices its devices hold, merged there, and
        written from there (Orbax output: every process writes its own shards
        and process 0 commits one checkpoint). In a multi-process run
        (``jax.distributed``) every process calls this with the same
        arguments. Without ``mesh`` or ``target`` every process would read
        and merge everything.
      rules: How ``mesh`` splits each leaf (``{regex: PartitionSpec}`` or a
        callable), as for :func:`fusionjax.io._sharded.shardings_for`.
      target: Instead of ``mesh``: a pytree like the checkpoints' leaves whose
        leaves carry the shardings to read onto (``ShapeDtypeStruct(...,
        sharding=)``).
      **extras: Per-parameter inputs some mergers need (``fishers=``, ...), as
        for :func:`fusionjax.merge`.

    Returns:
      A :class:`MergeCheckpointsOutput`.

    Raises:
      FileNotFoundError: a checkpoint, a shard or the output's directory is
        missing (named).
      FileExistsError: ``out`` exists and ``overwrite`` is false.
      ValueError: a corrupt file, models that differ in structure, shape or
        dtype, an input with NaN/Inf, or bad hyperparameters. All but the NaN/Inf
        check happen before any tensor is read; nothing is written at ``out``.
      TypeError: as :func:`fusionjax.merge`.

    Multi-process output: Orbax (each process writes its shards) or, for leaves
    that are whole on process 0, safetensors written by process 0; safetensors
    output of leaves sharded over several processes is refused before anything
    is read (see :class:`fusionjax.io.SafetensorsSink`).

    Examples:
      >>> import numpy as np, tempfile, os, fusionjax as fj
      >>> from fusionjax import io
      >>> d = tempfile.mkdtemp()
      >>> for name, v in [("base", 0.0), ("a", 1.0), ("b", 3.0)]:
      ...     _ = io.save_safetensors({"w": np.full(2, v, np.float32)}, f"{d}/{name}.safetensors")
      >>> r = io.merge_checkpoints(f"{d}/base.safetensors",
      ...                          [f"{d}/a.safetensors", f"{d}/b.safetensors"],
      ...                          fj.merging.task_arithmetic(scaling=0.5),
      ...                          f"{d}/out.safetensors", progress=False)
      >>> io.load_safetensors(r.path)
      {'w': array([2., 2.], dtype=float32)}
    """
    t0 = time.perf_counter()
    validation.check_nonempty(finetuned)
    if out_layout not in ("checkpoint", "target"):
        raise ValueError(f"out_layout must be 'checkpoint' or 'target', got {out_layout!r}.")
    target = _read_target(base, mesh, rules, target, layout)
    base_src = _as_source(base, "base", layout, target)
    ft_srcs = [_as_source(f, f"finetuned[{j}]", layout, target) for j, f in enumerate(finetuned)]
    fmt = _checkpoint.output_format(out, format, like=base_src)
    out_path = output_path(out, [base_src, *ft_srcs])
    validation.check_sources(base_src, ft_srcs)
    write_layout = getattr(base_src, "layout", None) if out_layout == "checkpoint" else None
    settings = {
        "format": fmt,
        "dtype": str(dtype),
        "max_shard_bytes": max_shard_bytes,
        "out_layout": out_layout if write_layout is not None else "target",
    }
    resume_key = (
        fingerprint([base_src, *ft_srcs], merger, key, settings, extras) if resume else None
    )
    sink = _checkpoint.open_sink(
        out_path,
        format=fmt,
        like=base_src,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        resume_key=resume_key,
        progress=progress,
        overwrite=overwrite,
        layout=write_layout,
    )
    done = set(sink.done)
    srcs = [base_src, *ft_srcs]
    if done and getattr(merger, "leafwise", False):
        srcs = [_SkipDone(s, done) for s in srcs]
    try:
        path = merge(srcs[0], srcs[1:], merger, key=key, sink=sink, **extras)
    except BaseException:
        sink.abort()
        raise
    if write_layout is not None:
        sink = sink.inner
    return MergeCheckpointsOutput(
        path=path,
        format=fmt,
        num_leaves=len(sink.specs),
        bytes_written=sum(_sink.nbytes(s) for s in sink.specs),
        resumed_leaves=len(done),
        seconds=time.perf_counter() - t0,
    )
