"""Atomic outputs: write under a temporary name next to the output, rename at the end.

A checkpoint is written into a hidden directory next to its final path
(``.NAME.fusionjax-tmp``, on the same file system, so the final ``rename`` is
atomic) and moved into place only when complete. An interrupted write leaves the
hidden directory, never something at ``NAME``; a later write of the same output
finds it (and may resume from it, see :mod:`fusionjax.io._stream_merge`).
"""

from __future__ import annotations

import os
import pathlib
import shutil

TMP_SUFFIX = ".fusionjax-tmp"


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
