"""PRNG keys: one convention for every random step and loop.

A random function takes an explicit ``key`` and never falls back to a default:
:func:`require_key` raises when it is missing. A leaf's key is derived from the
key and the leaf's *path* (:func:`leaf_key`), not its position, so a streamed
merge draws what an in-memory one draws however the tree is split, filtered or
read, and step ``j`` of a chain draws from ``fold_in(leaf_key, j)``.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

PRNGKey = jax.Array


def require_key(key: PRNGKey | None, who: str) -> PRNGKey:
    """Returns ``key``, or raises ``ValueError`` saying that ``who`` needs one."""
    if key is None:
        raise ValueError(f"{who} is random and needs a PRNG key, e.g. key=jax.random.key(0).")
    return key


def fold_in(key: PRNGKey | None, data: int) -> PRNGKey | None:
    """``jax.random.fold_in(key, data)``, or ``None`` for no key."""
    return None if key is None else jax.random.fold_in(key, data)


def leaf_key(key: PRNGKey | None, path) -> PRNGKey | None:
    """A PRNG key for one leaf, derived from ``key`` and the leaf's path.

    Keys depend on the path (not on the leaf's position), so a random step gives
    a leaf the same randomness however the tree around it is split or filtered.
    """
    if key is None:
        return None
    return jax.random.fold_in(key, path_hash(path))


def path_hash(path) -> int:
    """The 31-bit hash of a leaf's path that :func:`leaf_key` folds in."""
    return zlib.crc32(jax.tree_util.keystr(path).encode()) & 0x7FFFFFFF


def leaf_keys(key: PRNGKey | None, leaf_paths) -> PRNGKey | None:
    """:func:`leaf_key` for many paths in one call: keys ``[len(leaf_paths)]``."""
    if key is None:
        return None
    data = np.asarray([path_hash(p) for p in leaf_paths], np.uint32)
    return _fold_in_many(key, data)


@jax.jit
def _fold_in_many(key, data):
    return jax.vmap(jax.random.fold_in, (None, 0))(key, data)
