"""Atomic outputs: write under a temporary name next to the output, rename at the end.

A checkpoint is written into a hidden directory next to its final path
(``.NAME.fusionjax-tmp``, on the same file system, so the final ``rename`` is
atomic) and moved into place only when complete. An interrupted write leaves the
hidden directory, never something at ``NAME``; a later write of the same output
finds it (and may resume from it, see :mod:`fusionjax.io._stream_merge`).

**Several processes** (``jax.distributed``) write one output together: only
process 0 (:func:`is_primary`) removes a stale staging directory, creates it
and renames the finished output into place, between barriers
(:func:`barrier`, ``jax.experimental.multihost_utils.sync_global_devices``) that
every process passes: :func:`fresh_dir` before anyone writes into the staging
directory, :func:`commit_shared` after everyone finished writing. Every process
must call them in the same order. In a one-process run the barriers are no-ops.
"""

from __future__ import annotations

import os
import pathlib
import shutil

TMP_SUFFIX = ".fusionjax-tmp"


def is_primary() -> bool:
    """Whether this process creates, removes and commits shared outputs (process 0)."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reached ``barrier(name)`` (no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"fusionjax:{name}")


def fresh_dir(tmp: pathlib.Path, *, keep: bool = False) -> None:
    """An empty staging directory ``tmp`` (kept as it is when ``keep``), seen by every process.

    Process 0 removes what is there and creates it; the others wait at a
    barrier until it exists.
    """
    barrier("stage-begin")  # everyone looked at the old staging directory (a resume)
    if is_primary() and not keep:
        remove(tmp)
        tmp.mkdir()
    barrier("stage-end")


def commit_shared(
    staged: pathlib.Path, out: pathlib.Path, *, overwrite: bool = True, cleanup=None
) -> None:
    """:func:`commit` by process 0 once every process finished writing ``staged``.

    Removes ``cleanup`` (the staging directory) afterwards; returns when the
    output is in place for every process.
    """
    barrier("commit-begin")
    if is_primary():
        commit(staged, out, overwrite=overwrite)
        if cleanup is not None:
            remove(cleanup)
    barrier("commit-end")


def tmp_dir_for(out: str | os.PathLike) -> pathlib.Path:
    """The temporary directory that stages ``out`` (next to it, hidden)."""
    out = pathlib.Path(out).absolute()
    return out.parent / f".{out.name}{TMP_SUFFIX}"


def check_parent(out: str | os.PathLike) -> pathlib.Path:
    """``out`` as an absolute path whose parent directory exists, or ``FileNotFoundError``."""
    out = pathlib.Path(out).absolute()
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the directory of the output {out} does not exist: {out.parent}")
    return out


def commit(staged: pathlib.Path, out: pathlib.Path, *, overwrite: bool = True) -> None:
    """Moves the complete ``staged`` file or directory to ``out`` atomically.

    An existing ``out`` is replaced (when ``overwrite``): it is first renamed
    aside, so ``out`` is at every moment either the old output or the new one.
    """
    _fsync_tree(staged)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise FileExistsError(f"the output {out} exists.")
        if out.is_dir() and not out.is_symlink():
            trash = out.parent / f".{out.name}.fusionjax-old"
            if trash.exists():
                shutil.rmtree(trash)
            os.rename(out, trash)
            os.rename(staged, out)
            shutil.rmtree(trash)
            _fsync_dir(out.parent)
            return
    os.replace(staged, out)  # atomic for files (and for a directory onto nothing)
    _fsync_dir(out.parent)


def remove(path: pathlib.Path) -> None:
    """Removes a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_tree(p: pathlib.Path) -> None:
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(d: pathlib.Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
