"""Per-leaf control: a hyperparameter per path pattern or per layer, a merger per subtree.

What optax's ``masked``/``multi_transform`` and mergekit's ``filter:`` and
gradient lists give, as values a step resolves per leaf from the leaf's path:

* :func:`by_path` — ordered ``pattern -> value`` rules (first match wins), the
  pattern a regular expression searched in the leaf's path name ``a/b/c``;
* :func:`gradient` — mergekit's per-layer lists, interpolated over the layer
  index;
* :func:`partition` — a different merger per subtree, chosen by label.

They resolve on the host from metadata alone, before any value is read, so a
YAML-driven merge of a checkpoint on disk fails on a bad rule before it starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from fusionjax._src.base import LeafInfo
from fusionjax._src.base import LeafValue
from fusionjax._src.base import Step
from fusionjax._src.paths import layer_index


class ByPath(LeafValue):
    """A value chosen by the first rule whose pattern matches the leaf's path."""

    def __init__(self, rules, default):
        self.rules = tuple((str(p), v) for p, v in rules)
        self.default = default
        self._compiled = tuple(re.compile(p) for p, _ in self.rules)

    def value_for(self, info: LeafInfo) -> Any:
        name = info.name
        for (_, v), rx in zip(self.rules, self._compiled, strict=True):
            if rx.search(name):
                return v.value_for(info) if isinstance(v, LeafValue) else v
        if self.default is None:
            raise ValueError(
                f"no rule of by_path matches the leaf {info.keystr} (path name {name!r}) and "
                f"there is no default; rules: {[p for p, _ in self.rules]}."
            )
        d = self.default
        return d.value_for(info) if isinstance(d, LeafValue) else d

    def values(self) -> list:
        out = []
        for v in [v for _, v in self.rules] + ([] if self.default is None else [self.default]):
            out += v.values() if isinstance(v, LeafValue) else [v]
        return out

    def __eq__(self, other):
        return (
            isinstance(other, ByPath)
            and [p for p, _ in self.rules] == [p for p, _ in other.rules]
            and all(_eq(a, b) for (_, a), (_, b) in zip(self.rules, other.rules, strict=True))
            and _eq(self.default, other.default)
        )

    def __hash__(self):
        return hash(repr(self))

    def __repr__(self):
        return f"by_path({dict(self.rules)!r}, default={self.default!r})"


def _eq(a, b) -> bool:
    if isinstance(a, LeafValue) or isinstance(b, LeafValue):
        return a == b
    if a is None or b is None:
        return a is b
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def by_path(
    rules: Mapping[str, Any] | Sequence[tuple[str, Any]], *, default: Any = None
) -> ByPath:
    r"""A hyperparameter value per leaf, chosen by path pattern.

    Rules are tried in order; the first whose pattern (a regular expression,
    searched with :func:`re.search`) matches the leaf's path name — its keys
    joined by ``/``, e.g. ``layers_3/attn/query/kernel`` — gives the value.
    Values may themselves be :func:`gradient` lists. A leaf no rule matches gets
    ``default``; with no default it is an error naming the leaf, raised before
    anything is merged.

    Args:
      rules: ``{pattern: value}`` (in insertion order) or ``[(pattern, value), ...]``.
      default: The value where no rule matches, or ``None`` to require a match.

    Returns:
      A value any step hyperparameter accepts, resolved per leaf.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"attn": jnp.zeros(2), "mlp": jnp.zeros(2)}
      >>> fts = [{"attn": jnp.ones(2), "mlp": jnp.ones(2)}]
      >>> m = fj.merging.task_arithmetic(scaling=fj.by_path({"attn": 0.5}, default=1.0))
      >>> fj.merge(base, fts, m)
      {'attn': Array([0.5, 0.5], dtype=float32), 'mlp': Array([1., 1.], dtype=float32)}
    """
    items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    for item in items:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError(f"by_path rules are (pattern, value) pairs, got {item!r}.")
        try:
            re.compile(item[0])
        except re.error as e:
            raise ValueError(
                f"by_path pattern {item[0]!r} is not a regular expression: {e}"
            ) from None
    return ByPath(items, default)


class Gradient(LeafValue):
    """mergekit's gradient: values interpolated over the layer index."""

    def __init__(self, values, outside):
        self.anchors = np.asarray(values, dtype=np.float64)
        self.outside = outside

    def value_for(self, info: LeafInfo) -> Any:
        idx = layer_index(info.name)
        if idx is None:
            if self.outside is None:
                raise ValueError(
                    f"gradient: the leaf {info.keystr} has no layer number in its path; give "
                    "gradient(..., outside=value) or a by_path rule for it."
                )
            return self.outside
        n = info.num_layers or 1
        pos = idx / max(n - 1, 1)
        xs = np.linspace(0.0, 1.0, len(self.anchors))
        return float(np.interp(pos, xs, self.anchors))

    def values(self) -> list:
        return [float(v) for v in self.anchors] + (
            [] if self.outside is None else [self.outside]
        )

    def __eq__(self, other):
        return (
            isinstance(other, Gradient)
            and np.array_equal(self.anchors, other.anchors)
            and _eq(self.outside, other.outside)
        )

    def __hash__(self):
        return hash(repr(self))

    def __repr__(self):
        return f"gradient({self.anchors.tolist()}, outside={self.outside!r})"


def gradient(values: Sequence[float], *, outside: float | None = None) -> Gradient:
    r"""Mergekit's per-layer gradient: a value interpolated over the layer index.

    With :math:`L` numbered layers in the model and anchors
    :math:`v_0, \dots, v_{m-1}` spread evenly over :math:`[0, 1]`, layer
    :math:`\ell` gets the linear interpolation of the anchors at
    :math:`\ell / (L - 1)`. The layer number is read from the path
    (``layers_3``, ``layers/3``, ``h.3``, ``block_3``, else the first bare integer
    key); :math:`L` is one more than the largest number in the model.

    Args:
      values: The anchors, e.g. ``[0.0, 0.5, 1.0]``.
      outside: The value for leaves with no layer number (embeddings, final
        norms); ``None`` makes such a leaf an error naming it.

    Returns:
      A value any step hyperparameter accepts, resolved per leaf.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {f"layers_{i}": jnp.zeros(1) for i in range(3)}
      >>> fts = [{f"layers_{i}": jnp.ones(1) for i in range(3)}]
      >>> out = fj.merge(base, fts, fj.merging.task_arithmetic(scaling=fj.gradient([0.0, 1.0])))
      >>> [float(out[f"layers_{i}"][0]) for i in range(3)]
      [0.0, 0.5, 1.0]
    """
    vals = list(values)
    if not vals:
        raise ValueError("gradient needs at least one value.")
    for v in vals:
        if isinstance(v, (str, bytes, bool)) or not np.isscalar(v):
            raise TypeError(f"gradient values must be numbers, got {v!r}.")
    return Gradient(vals, outside)


@jax.tree_util.register_pytree_node_class
class Partition(Step):
    """A merger (or task-vector step) per subtree; see :func:`partition`."""

    def __init__(self, steps: Mapping[str, Step], labels):
        first = next(iter(steps.values()))
        super().__init__(
            "partition(" + ", ".join(f"{k}={s.name}" for k, s in steps.items()) + ")",
            None,
            reduces=first.reduces,
            needs_key=any(s.needs_key for s in steps.values()),
            elementwise=all(s.elementwise for s in steps.values()),
        )
        self.labels = labels
        self.steps = dict(steps)

    def tree_flatten(self):
        keys = tuple(self.steps)
        return tuple(self.steps[k] for k in keys), (keys, self.labels)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, labels = aux
        return cls(dict(zip(keys, children, strict=True)), labels)

    @property
    def parts(self) -> tuple[Step, ...]:
        return tuple(self.steps.values())

    def required_extras(self) -> tuple[str, ...]:
        out: list[str] = []
        for p in self.steps.values():
            out += [e for e in p.required_extras() if e not in out]
        return tuple(out)

    def label_for(self, info: LeafInfo) -> str:
        """The label of one leaf."""
        if isinstance(self.labels, LeafValue):
            label = self.labels.value_for(info)
        else:
            label = self.labels(info.name)
        if label not in self.steps:
            raise ValueError(
                f"partition: the leaf {info.keystr} has label {label!r}, which names no "
                f"step; labels: {sorted(self.steps)}."
            )
        return label

    def resolve(self, info: LeafInfo) -> Step:
        return self.steps[self.label_for(info)].resolve(info)

    def apply(self, x, *, key=None, base=None, extras=None):
        raise TypeError("a partition is resolved per leaf before it is applied.")

    def replace(self, **changes) -> Step:
        raise TypeError("partition steps are replaced by building a new partition.")

    def __repr__(self) -> str:
        return f"partition({self.steps!r}, labels={self.labels!r})"


def partition(
    steps: Mapping[str, Step], labels: Callable[[str], str] | ByPath
) -> Partition:
    r"""A different merger per subtree, like :func:`optax.multi_transform`.

    Each leaf gets the label ``labels`` gives its path name (``a/b/c``), and is
    merged by ``steps[label]``. The steps must all be mergers (or all
    task-vector steps); none may need a model-wide statistic.

    Args:
      steps: ``{label: step}``.
      labels: A function ``path_name -> label``, or :func:`by_path` rules whose
        values are labels.

    Returns:
      A :class:`fusionjax.Step` resolved per leaf by :func:`fusionjax.merge`.

    Raises:
      TypeError: if ``steps`` is empty, mixes mergers and task-vector steps, or
        holds something that is not a step.
      ValueError: if a step needs a model-wide statistic.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"norm": jnp.zeros(2), "dense": jnp.zeros(2)}
      >>> fts = [{"norm": jnp.ones(2), "dense": jnp.ones(2)},
      ...        {"norm": 3 * jnp.ones(2), "dense": -jnp.ones(2)}]
      >>> steps = {"avg": fj.merging.mean(), "ta": fj.merging.task_arithmetic(scaling=1.0)}
      >>> m = fj.partition(steps, fj.by_path({"norm": "avg"}, default="ta"))
      >>> fj.merge(base, fts, m)
      {'dense': Array([0., 0.], dtype=float32), 'norm': Array([2., 2.], dtype=float32)}
    """
    if not isinstance(steps, Mapping) or not steps:
        raise TypeError("partition needs a non-empty {label: step} mapping.")
    for k, s in steps.items():
        if not isinstance(s, Step):
            raise TypeError(
                f"partition: steps[{k!r}] is {type(s).__name__}, not a fusionjax step. "
                "Did you forget to call the factory?"
            )
        if not s.leafwise:
            raise ValueError(
                f"partition: steps[{k!r}] ({s.name}) needs a model-wide statistic; inside "
                "a partition only leafwise steps are supported."
            )
    kinds = {s.reduces for s in steps.values()}
    if len(kinds) != 1:
        raise TypeError("partition: the steps must all be mergers or all task-vector steps.")
    if not (callable(labels) or isinstance(labels, ByPath)):
        raise TypeError(f"partition labels must be a function or by_path rules, got {labels!r}.")
    if isinstance(labels, ByPath):
        bad = [v for v in labels.values() if v not in steps]
        if bad:
            raise ValueError(f"partition: label {bad[0]!r} names no step; labels: {sorted(steps)}.")
    return Partition(steps, labels)
