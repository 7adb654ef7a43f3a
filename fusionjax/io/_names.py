"""Flat tensor names (``"a.b.0.c"``) for pytree leaves, and nested dicts back from them.

Checkpoint formats that store a flat list of named tensors (safetensors, and the
parameter names of Orbax's OCDBT store) name a leaf by its keys joined with
``"."``: ``{"model": {"layers": [{"w": x}]}}`` gives ``model.layers.0.w``. The way
back builds nested dicts of *string* keys (``"0"`` stays a string key), so the
path pattern ``model/layers/0/w`` of :func:`fusionjax.by_path` sees the same name
whichever format a model came from.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import jax

from fusionjax._src import paths as paths_lib

keystr = jax.tree_util.keystr
SEP = "."


def key_name(k: Any) -> str:
    """The string a key path entry contributes to a flat name (``TypeError`` if none)."""
    return paths_lib.key_name(k, strict=True)


def flat_name(path: Sequence[Any]) -> str:
    """A key path as a flat name ``"a.b.0.c"``.

    Raises:
      ValueError: if a key contains ``"."`` or is empty (the name would not
        split back into the same keys).
    """
    parts = []
    for k in path:
        s = key_name(k)
        if SEP in s or not s:
            raise ValueError(
                f"the leaf at {keystr(tuple(path))} has the key {s!r}, which cannot be part of "
                f"a flat tensor name (keys must be non-empty and contain no {SEP!r})."
            )
        parts.append(s)
    if not parts:
        raise ValueError(
            "a single array (a tree with no keys) has no flat name; wrap it in a dict."
        )
    return SEP.join(parts)


def flat_names(paths: Iterable[Sequence[Any]]) -> list[str]:
    """Flat names for many key paths, checked to be distinct.

    Raises:
      ValueError: if a key cannot be named (see :func:`flat_name`) or two
        leaves get the same name (e.g. ``{"a": {"b": x}}`` next to ``{"a.b": y}``
        is caught by the first check; ``{0: x, "0": y}`` by this one), naming both.
    """
    seen: dict[str, Any] = {}
    out = []
    for p in paths:
        name = flat_name(p)
        if name in seen:
            raise ValueError(
                f"the leaves at {keystr(tuple(seen[name]))} and {keystr(tuple(p))} both flatten "
                f"to the tensor name {name!r}."
            )
        seen[name] = p
        out.append(name)
    return out


def tree_to_flat(tree: Any) -> dict[str, Any]:
    """``{flat name: leaf}`` for every leaf of ``tree``, in its flatten order.

    Args:
      tree: Any pytree whose key paths are dict keys, sequence indices or attributes.

    Returns:
      An insertion-ordered dict of names to leaves.

    Raises:
      ValueError: see :func:`flat_names`.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    names = flat_names(p for p, _ in flat)
    return dict(zip(names, (x for _, x in flat), strict=True))


def split_name(name: str, where: str = "") -> tuple[str, ...]:
    """``"a.b.0"`` → ``("a", "b", "0")``; empty parts are an error naming ``where``."""
    parts = tuple(name.split(SEP))
    if any(not p for p in parts):
        loc = f" in {where}" if where else ""
        raise ValueError(f"the tensor name {name!r}{loc} has an empty part; cannot nest it.")
    return parts


def nest(flat: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Nested dicts of string keys from ``{flat name: value}``.

    Args:
      flat: Flat names (``"a.b.0.c"``) to values.
      where: The file the names come from, for messages.

    Returns:
      ``{"a": {"b": {"0": {"c": value}}}}``; digit keys stay strings.

    Raises:
      ValueError: if one name is a prefix of another (``a.b`` and ``a.b.c``:
        ``a.b`` cannot be both a tensor and a group), naming both.
    """
    root: dict[str, Any] = {}
    owner: dict[tuple, str] = {}  # node path -> the name that made it a leaf
    for name, value in flat.items():
        parts = split_name(name, where)
        node = root
        for j, p in enumerate(parts[:-1]):
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            elif not isinstance(child, dict) or parts[: j + 1] in owner:
                raise _clash(owner[parts[: j + 1]], name, where)
            node = child
        last = parts[-1]
        if last in node:
            other = owner.get(parts) or _first_below(node[last], name)
            raise _clash(other, name, where)
        node[last] = value
        owner[parts] = name
    return root


def _first_below(node: Any, name: str) -> str:
    while isinstance(node, dict) and node:
        k = next(iter(node))
        name, node = f"{name}.{k}", node[k]
    return name


def _clash(a: str, b: str, where: str) -> ValueError:
    loc = f" in {where}" if where else ""
    return ValueError(
        f"the tensor names {a!r} and {b!r}{loc} clash: one is a tensor and the other needs it "
        "to be a group of tensors."
    )
