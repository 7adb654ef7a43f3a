"""The part every checkpoint sink shares: staging, the resume journal, casting, progress.

A :class:`CheckpointSink` writes nothing until its first leaf arrives (so a merge
that fails its checks leaves no trace), then stages everything in the hidden
directory :func:`fusionjax.io._atomic.tmp_dir_for` gives, next to the output, and
moves the finished checkpoint into place in :meth:`CheckpointSink.finish` — never
before.

Resuming: given a ``resume_key`` (a fingerprint of what is being written, e.g.
the inputs and the merger), the sink records it in the staging directory and
appends every leaf it has made durable to a journal there. A later sink for
the same output and the same key finds the journal and reports those leaves in
:attr:`CheckpointSink.done`; it skips writing them again. A different key (or
none) discards the staging directory. The journal is flushed after every
entry, which survives the process being killed; after a power loss, discard the
staging directory by passing ``resume=False``.

Several processes (``jax.distributed``): every process runs the same merge and
writes through its own sink; process 0 alone creates (or discards) the staging
directory, keeps the journal and commits, between barriers that all processes
pass (:mod:`fusionjax.io._atomic`). Every process reads the journal before
process 0 may touch it, so all resume the same leaves.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import stream
from fusionjax.io import _atomic
from fusionjax.io import _names

FINGERPRINT_FILE = "fingerprint"
JOURNAL_FILE = "journal"


def out_spec(spec: Any, dtype: Any) -> Any:
    """The spec a leaf is written with: floating arrays cast to ``dtype`` when given."""
    if dtype is None or not stream.is_array_like(spec):
        return spec
    if jnp.issubdtype(spec.dtype, jnp.floating):
        sharding = getattr(spec, "sharding", None)
        if not isinstance(sharding, jax.sharding.Sharding):
            sharding = None
        return jax.ShapeDtypeStruct(tuple(spec.shape), jnp.dtype(dtype), sharding=sharding)
    return spec


def nbytes(spec: Any) -> int:
    """Bytes of an array spec (0 for non-array leaves)."""
    if not stream.is_array_like(spec):
        return 0
    return math.prod(spec.shape) * jnp.dtype(spec.dtype).itemsize


class CheckpointSink:
    """A :class:`fusionjax.LeafSink` that writes a checkpoint atomically.

    Subclasses implement ``_start(tmp)``, ``_write(i, array)`` (returning the
    leaf indices made durable by this call) and ``_finish(tmp) -> staged path``.
    A subclass with ``keeps_arrays = True`` gets the merged jax.Arrays as they
    are (sharded, possibly over several processes); otherwise NumPy arrays.

    Attributes:
      path: The final output path.
      names: The flat tensor name of every leaf.
      specs: The spec every leaf is written with (after ``dtype``).
      done: Leaf indices already written by an interrupted earlier run (resumed).
    """

    keeps_arrays = False

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        like: Any,
        dtype: Any = None,
        resume_key: str | None = None,
        progress: Any = None,
        overwrite: bool = True,
    ):
        self.path = _atomic.check_parent(path)
        like = stream.as_source(like)
        self.names = _names.flat_names(like.paths)
        self.paths = list(like.paths)
        if dtype is not None and not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}.")
        self.dtype = None if dtype is None else jnp.dtype(dtype)
        self.specs = [out_spec(s, self.dtype) for s in like.specs]
        self.overwrite = overwrite
        if not overwrite and (self.path.exists() or self.path.is_symlink()):
            raise FileExistsError(
                f"the output {self.path} exists (pass overwrite=True to replace it)."
            )
        self.tmp = _atomic.tmp_dir_for(self.path)
        self.resume_key = resume_key
        self.done: set[int] = self._read_journal()
        self._written: set[int] = set(self.done)
        self._started = False
        self._journal = None
        self._progress_arg = progress
        self._bar = None

    # -- journal -------------------------------------------------------------

    def _read_journal(self) -> set[int]:
        if self.resume_key is None or not self.tmp.is_dir():
            return set()
        try:
            key = (self.tmp / FINGERPRINT_FILE).read_text()
        except OSError:
            return set()
        if key != self.resume_key:
            return set()
        done = set()
        try:
            lines = (self.tmp / JOURNAL_FILE).read_text().splitlines()
        except OSError:
            return set()
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a torn last line
                break
            i = entry.get("i")
            if isinstance(i, int) and 0 <= i < len(self.names) and entry.get("n") == self.names[i]:
                done.add(i)
        return done

    def _start(self, tmp: pathlib.Path) -> None:
        raise NotImplementedError

    def _ensure_started(self) -> None:
        if self._started:
            return
        _atomic.fresh_dir(self.tmp, keep=bool(self.done))
        primary = _atomic.is_primary()
        if primary and not self.done and self.resume_key is not None:
            (self.tmp / FINGERPRINT_FILE).write_text(self.resume_key)
        self._start(self.tmp)
        if primary:
            self._journal = open(self.tmp / JOURNAL_FILE, "a")  # noqa: SIM115
        self._started = True
        self._bar = _make_bar(self._progress_arg, sum(nbytes(s) for s in self.specs))
        if self._bar is not None and self.done:
            self._bar.update(sum(nbytes(self.specs[i]) for i in self.done))

    def _record(self, indices) -> None:
        if self._journal is None:  # not process 0
            return
        for i in indices:
            self._journal.write(json.dumps({"i": i, "n": self.names[i]}) + "\n")
        self._journal.flush()

    # -- the LeafSink protocol ----------------------------------------------

    def write(self, index: int, value: Any) -> None:
        """Writes leaf ``index`` (cast to the output dtype) unless a resumed run wrote it."""
        if index in self.done:
            return
        self._ensure_started()
        spec = self.specs[index]
        if stream.is_array_like(spec):
            if not (self.keeps_arrays and isinstance(value, jax.Array)):
                if isinstance(value, jax.Array) and not value.is_fully_addressable:
                    raise ValueError(
                        f"the leaf {self.names[index]!r} is sharded over several processes; "
                        f"{type(self).__name__} cannot write it (write an Orbax checkpoint)."
                    )
                value = np.asarray(jax.device_get(value))
            if value.dtype != spec.dtype:
                value = value.astype(spec.dtype)
            if tuple(value.shape) != tuple(spec.shape):
                raise ValueError(
                    f"the leaf {self.names[index]!r} has shape {value.shape}, the output "
                    f"expects {tuple(spec.shape)}."
                )
        durable = self._write(index, value)
        self._written.add(index)
        self._record(durable)
        if self._bar is not None:
            self._bar.update(nbytes(spec))
            self._bar.set_postfix_str(self.names[index], refresh=False)

    def _write(self, index: int, value: Any) -> list[int]:
        raise NotImplementedError

    def _finish(self, tmp: pathlib.Path) -> pathlib.Path:
        raise NotImplementedError

    def finish(self) -> pathlib.Path:
        """Completes the checkpoint and moves it to :attr:`path`; returns the path.

        Raises:
          ValueError: if a leaf was never written.
        """
        missing = [self.names[i] for i in range(len(self.names)) if i not in self._written]
        if missing:
            raise ValueError(f"cannot finish {self.path}: leaf {missing[0]!r} was never written.")
        self._ensure_started()
        staged = self._finish(self.tmp)
        if self._journal is not None:
            self._journal.close()
        if self._bar is not None:
            self._bar.close()
        _atomic.commit_shared(staged, self.path, overwrite=self.overwrite, cleanup=self.tmp)
        return self.path

    def abort(self) -> None:
        """Closes open files and the progress bar; keeps the staging directory for a resume."""
        if self._journal is not None:
            self._journal.close()
        if self._bar is not None:
            self._bar.close()


def _make_bar(progress: Any, total: int):
    if progress is None or progress is False:
        return None
    if progress is True:
        from tqdm.auto import tqdm

        progress = tqdm
    if isinstance(progress, type):
        return progress(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="merge")
    return progress
