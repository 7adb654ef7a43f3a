"""The on-disk cache of the testbeds: file names keyed by what the models depend on, atomic writes.

A testbed's file name holds a digest of its configuration, of the source of the modules
that build it and of anything else it depends on (e.g. the corpus), so a change to any of
them builds anew instead of reading stale models. Files are written to a temporary name
and renamed, so a concurrent reader never sees a partial file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import numpy as np

from fusionjax._src.progress import Progress


def root() -> str:
    """The cache folder: ``$FUSIONJAX_CACHE``, else ``~/.cache/fusionjax``."""
    return os.environ.get("FUSIONJAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "fusionjax"
    )


def _source_digest(module, fallback: str) -> str:
    try:
        with open(module.__file__, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:  # e.g. a zipped install: fall back to the version string
        return fallback


def path(prefix: str, version: str, spec: dict[str, Any], sources: Sequence[Any], seed: int) -> str:
    """The cache file of one seed of a testbed.

    Args:
      prefix: The testbed's name in the file name (``"testbed"``, ``"language"``).
      version: Its format version (also the digest of a module whose source is unreadable).
      spec: JSON-serialisable description of what the models depend on.
      sources: Modules whose source code builds the models.
      seed: The seed.

    Returns:
      ``<root>/<prefix>-v<version>-<digest>-seed<seed>.npz``.
    """
    full = {"version": version, **spec, "sources": [_source_digest(m, version) for m in sources]}
    digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(root(), f"{prefix}-v{version}-{digest}-seed{seed}.npz")


def save(file: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes ``arrays`` to the ``.npz`` ``file`` atomically (temporary file, then rename).

    Args:
      file: Destination path; its folder is created.
      arrays: Name to array.
    """
    os.makedirs(os.path.dirname(file), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(file), suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, file)  # atomic: concurrent readers never see a partial file
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def building(file: str) -> Iterator[None]:
    """Holds an exclusive lock on ``file``'s build, across processes, while the block runs.

    Two processes that need the same uncached testbed at once (pytest-xdist workers, a
    notebook kernel next to the tests) would both train it; under this lock the second
    waits for the first and then reads its file. The lock is an ``flock`` on
    ``.locks/NAME.lock`` in the cache folder (kept: deleting a lock file another process
    may be waiting on would let a third one build alongside), released when the block
    ends or the process dies; where ``fcntl`` is missing (Windows) the block runs unlocked.

    Args:
      file: The cache file about to be read or built.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder = os.path.join(os.path.dirname(file), ".locks")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, os.path.basename(file) + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def load_or_build(
    file: str,
    *,
    cache: bool,
    restore: Callable[[str], Any],
    build: Callable[[], Any],
    save: Callable[[str, Any], None],
    progress: Any | None = None,
    desc: str = "testbed",
) -> tuple[Any, bool]:
    """Reads a testbed from ``file``, or builds it and writes it there, under its lock.

    A file that cannot be read (truncated, corrupt, written by other code) is rebuilt and
    replaced; with ``cache=False`` the file is neither read nor written, and nothing is
    locked.

    Args:
      file: The cache file (:func:`path`).
      cache: Whether to use the disk cache at all.
      restore: ``restore(file) -> built``; raises ``OSError``, ``KeyError``,
        ``ValueError``, ``EOFError`` or ``zipfile.BadZipFile`` on a bad file.
      build: ``build() -> built``, the expensive part.
      save: ``save(file, built)``, writing atomically (:func:`save`).
      progress: The caller's progress argument (see
        :class:`fusionjax._src.progress.Progress`): a read from the cache is reported as
        one stage, "loaded from cache".
      desc: The bar's name.

    Returns:
      ``(built, from_cache)``.
    """
    with building(file) if cache else contextlib.nullcontext():
        if cache and os.path.exists(file):
            try:
                built = restore(file)
            except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
                pass  # corrupt: rebuilt below
            else:
                bar = Progress(progress, total=1, desc=desc)
                bar.start("loaded from cache")
                bar.done()
                bar.close()
                return built, True
        built = build()
        if cache:
            save(file, built)
        return built, False
