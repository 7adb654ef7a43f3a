"""Leaf paths: one format for messages, one for patterns, and prefix trees.

Every message names a leaf as :func:`jax.tree_util.keystr` prints its path
(``['dense']['kernel']``). Path *patterns* (per-leaf hyperparameters, choosing a
merger per subtree) are matched against :func:`path_name`, the keys joined by
``/`` (``dense/kernel``, ``layers/3/mlp/kernel``, ``layers_3/mlp/kernel``), the
form mergekit's ``filter:`` strings and checkpoint tensor names take.
"""

from __future__ import annotations

import re
from typing import Any

import jax

keystr = jax.tree_util.keystr


def key_name(k: Any, *, strict: bool = False) -> str:
    """The string one key path entry contributes to a leaf's name.

    Args:
      k: A key path entry (``DictKey``, ``SequenceKey``, ``GetAttrKey``,
        ``FlattenedIndexKey``).
      strict: Raise ``TypeError`` for any other entry instead of using ``str(k)``.
    """
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    if strict:
        raise TypeError(f"cannot name a key path entry of type {type(k).__name__}: {k!r}")
    return str(k)


def path_name(path: tuple) -> str:
    """A key path as ``"a/b/0/c"`` (flax nnx ``.value`` attributes left out)."""
    names = [key_name(k) for k in path]
    if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return "/".join(names)


_LAYER = re.compile(r"(?:^|[/._])(?:layers?|blocks?|h|encoderblock|block)[_./]?(\d+)(?:$|[/._])")
_ANY_INT = re.compile(r"(?:^|[/._])(\d+)(?:$|[/._])")


def layer_index(name: str) -> int | None:
    """The layer number in a path name, or ``None``.

    Recognises ``layers_3``, ``layers/3``, ``layers.3``, ``h.3``, ``block_3``
    and, failing those, the first bare integer key (``encoder/3/mlp``).
    """
    m = _LAYER.search(name) or _ANY_INT.search(name)
    return int(m.group(1)) if m else None


def _is_none(x) -> bool:
    return x is None


def broadcast_leaves(full: Any, extra: Any, name: str) -> list:
    """Leaves of ``extra`` aligned with the leaves of ``full``.

    ``extra`` has the structure of ``full`` (``None`` where it has no value) or is
    a prefix of it, whose leaves then apply to whole subtrees.

    Args:
      full: The reference pytree.
      extra: The tree to align, or ``None``.
      name: Name used in the error message.

    Returns:
      A list with one entry per leaf of ``full``.
    """
    treedef = jax.tree.structure(full)
    if extra is None:
        return [None] * treedef.num_leaves
    try:
        return treedef.flatten_up_to(extra)
    except (ValueError, TypeError):
        pass
    try:
        nested = jax.tree.map(
            lambda pre, sub: [pre] * len(jax.tree.leaves(sub)), extra, full, is_leaf=_is_none
        )
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"{name} must have the structure of the parameters (or a prefix of it): {e}"
        ) from None
    out = []
    for chunk in jax.tree.leaves(nested, is_leaf=lambda x: isinstance(x, list)):
        out.extend(chunk)
    return out
