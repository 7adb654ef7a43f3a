r"""The ``fusionjax merge`` config: mergekit's YAML, parsed and validated into a plan.

Pure: parsing reads the YAML text and nothing else (no checkpoint, no tensor);
:mod:`fusionjax.cli._merge` opens the checkpoints' metadata and runs the plan.

The format is mergekit's (``mergekit-yaml config.yml out``), for the methods
both libraries have, plus a few fusionjax keys::

    merge_method: ties            # see `fusionjax merge --help` for the list
    base_model: ckpt/base         # a path; or {model: PATH, format: orbax}
    models:
      - model: ckpt/math          # a .safetensors file, a sharded safetensors
        parameters:               #   directory, or an Orbax checkpoint directory
          weight: 1.0
          density: 0.5
      - model: ckpt/code
        format: orbax             # fusionjax: safetensors | orbax (default: detected)
        parameters:
          density: [0.2, 0.5, 0.8]          # a gradient over the layers
    parameters:                   # method-wide values and defaults for per-model ones
      lambda: 1.0
      normalize: true
      density:                    # per tensor name (mergekit's `filter:`)
        - filter: self_attn
          value: 0.7
        - value: 0.5              # no filter: every other tensor
    dtype: float32                # mergekit's compute dtype (fusionjax always
                                  #   computes in float32 or wider): the output
                                  #   dtype unless out_dtype / output.dtype is set
    out_dtype: bfloat16
    seed: 0                       # fusionjax: the PRNG key of random methods
    convention: mergekit          # fusionjax: mergekit (default) | fusionjax
    layout: none                  # fusionjax: none | hf | llama | gpt2 | vit | timm_vit
    output:                       # fusionjax
      format: safetensors         # safetensors | orbax (default: safetensors for an
                                  #   OUT ending in .safetensors, else the base's)
      dtype: bfloat16             # as out_dtype
      max_shard_bytes: 5000000000 # safetensors shards

Values. A parameter is a number (or ``true``/``false`` for switches); a list of
numbers is mergekit's *gradient*, interpolated linearly over the layer index
(:func:`fusionjax.gradient`; tensors outside the numbered layers take the first
value, as mergekit evaluates them at ``t = 0``); a list of ``{filter: S,
value: V}`` picks, per tensor, the first entry whose ``S`` occurs in the tensor's
name (``model.layers.3.self_attn.q_proj.weight``; ``.`` also matches the ``/`` of
nested Orbax paths), an entry without ``filter`` matching every tensor
(:func:`fusionjax.by_path`). A value not found for a model falls back to the
top-level ``parameters``, then to the method's default.

Per-model values (``weight``, ``density``, ``gamma``, ``epsilon``) become the
``[T]`` per-model hyperparameters of the fusionjax steps. The models listed
under ``models`` that are the ``base_model`` itself are dropped from task-vector
methods (their task vector is zero; mergekit skips them too).

Methods (mergekit's names and parameters; defaults as mergekit's). Per-model
``weight`` becomes ``weights=[...]``, ``density`` ``density=[...]`` (DARE:
``drop_rate = 1 - density``), ``lambda`` ``scaling`` (default 1.0),
``normalize`` ``merge="mean"|"sum"`` (the sign-election methods) or
``normalize=`` (the linear ones), ``rescale`` ``rescale="l1"|"none"``;
``int8_mask`` is accepted and ignored:

=================  ========================================================
``linear``         ``mean(weights)`` (``normalize: false``: ``sum(weights)``)
                   on a zero base: the models' weighted average / sum
``task_arithmetic``  ``chain(sum(weights), scale(lambda))`` (normalize: mean)
``ties``           ``ties(density, weights, scaling, merge, rescale)``
                   (normalize true, rescale false)
``dare_ties``      ``dare_ties(drop_rate, weights, ...)``, normalize false,
                   rescale true; random (``seed``)
``dare_linear``    ``dare_linear``, normalize false, rescale true; random
``breadcrumbs``    ``breadcrumbs(density, gamma=0.01, ...)``, normalize false
``breadcrumbs_ties``  ``breadcrumbs_ties``, normalize false
``della``          ``della(density, epsilon=0.15, ..., rank_axis)``,
                   normalize true, rescale true; random
``della_linear``   ``della_linear``, normalize false, rescale true; random
``slerp``          ``merge(base, [base, other], slerp(t))``; ``t`` required
``nuslerp``        ``nuslerp(weights=[w0, w1], flatten=nuslerp_flatten,
                   axis from nuslerp_row_wise)``; task vectors with a
                   ``base_model``, the weights without
``multislerp``     ``multislerp(weights, normalize_weights, eps)``, likewise
``karcher``        ``karcher(max_iter=10, tol=1e-5)`` over every model,
                   a named ``base_model`` included
``nearswap``       ``merge(base, [other], nearswap(t))``; ``t`` required
``sce``            ``sce(density=select_topk)`` (default 1)
``arcee_fusion``   ``merge(base, [other], arcee_fusion(axis))``
``model_stock``    ``model_stock(filter_wise, axis)``
``passthrough``    one model copied; or ``slices`` (below)
=================  ========================================================

Convention. ``convention: mergekit`` (the default for these names) passes
``convention="mergekit"`` to the factories that have it (:mod:`fusionjax.merging`'s
"mergekit compatibility" table: kept counts, the sign of a tie, SLERP of a zero
tensor, Model Stock's unclipped cosine) and gives ``normalize``, ``rescale`` and
``epsilon`` mergekit's per-method defaults. ``convention: fusionjax`` keeps the
factories' own defaults for everything the config does not set (``lambda``,
``weight`` and ``density`` keep mergekit's defaults: they are the method's
parameters, not conventions). ``merge_method: fusionjax.NAME`` always uses
fusionjax's defaults.

Layout. ``layout: none`` (default) merges the tensors as stored; ``hf`` (the
family detected from the names) or a family name opens every checkpoint
through :func:`fusionjax.io.open_checkpoint`'s ``layout`` (flax leaves) and
writes the output back in the checkpoint's own names and layout. The axis
options follow the leaves: safetensors opened without a layout are torch
layout (``(out, in)``): nuslerp row_wise false/true ``axis=-1``/``0``,
model_stock and arcee_fusion ``axis=-1``, della ``rank_axis=1``; Orbax
checkpoints and any checkpoint opened through a layout are flax layout
(``(in, out)``): ``0``/``-1``, ``0`` and ``None``.

Slices (mergekit's layer stacking), with ``merge_method: passthrough``::

    slices:
      - sources: [{model: A, layer_range: [0, 2]}]
      - sources: [{model: B, layer_range: [1, 3]}]

The output's layers are the slices' layers in order, renumbered from 0 (``A``'s
0, 1 then ``B``'s 1, 2 as 0..3); the tensors outside the numbered layers
(``model.layers.N.`` / ``h.N.`` / ``layer.N.`` / ``blocks.N.``) come from the
``base_model``, else the first slice's model. Every range and every stacked
layer's tensors (names, shapes, dtypes against the first stacked layer) are
checked from metadata before any tensor is read; the tensors are then copied
leaf by leaf (no layout: names as stored). One source per slice: merging several
models within a slice is rejected.

fusionjax's own methods. ``merge_method: fusionjax.NAME`` builds
``fusionjax.merging.NAME(**parameters)`` with the top-level ``parameters`` as
keyword arguments (strings allowed, e.g. ``scope: model``) and per-model
``parameters`` stacked into one ``[T]`` value per name.

Not supported, rejected with an error naming the key: ``tokenizer_source``,
``tokenizer``, ``chat_template`` (fusionjax merges weights; copy the tokenizer
files yourself; vocabularies that differ need
:func:`fusionjax.io.align_embeddings` first) and ``modules``.

mergekit computes in the checkpoint's dtype (bf16); fusionjax computes in at
least float32 and rounds each merged leaf once.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import itertools
import math
import re
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import numpy as np

import fusionjax as fj
from fusionjax import merging

FORMATS = ("safetensors", "orbax")
DTYPES = ("float32", "bfloat16", "float16", "float64")
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "float": "float32"}


class ConfigError(ValueError):
    """A config that cannot be merged; ``key`` is the config key path it is about."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class ModelSpec(NamedTuple):
    """A checkpoint named in the config.

    Attributes:
      path: The checkpoint's path, as written.
      format: ``"safetensors"``, ``"orbax"`` or ``None`` (detected from the path).
      key: The config key that names it, e.g. ``models[1].model``.
    """

    path: str
    format: str | None
    key: str


class OutputSpec(NamedTuple):
    """Where and how the merged checkpoint is written.

    Attributes:
      format: ``"safetensors"``, ``"orbax"`` or ``None`` (the base model's format).
      dtype: Output dtype name, or ``None`` to keep every leaf's dtype.
      max_shard_bytes: Largest safetensors shard, or ``None`` for one file.
    """

    format: str | None
    dtype: str | None
    max_shard_bytes: int | None


class MergePlan(NamedTuple):
    """A validated config: what to merge, how, and where.

    Attributes:
      method: The ``merge_method`` as written.
      base: The base model (the reference the task vectors are taken from).
      models: The models merged, in order (the ``T`` of the per-model values).
      merger: The :class:`fusionjax.Step` for :func:`fusionjax.merge`, built for
        leaves in torch layout (see :meth:`for_leaves`); ``None`` for ``slices``.
      hparams: The method's hyperparameters as configured, ``{name: value}``
        (for the dry run's printout; per-leaf values are resolved there).
      seed: Seed of the PRNG key, for random methods (``None`` otherwise).
      output: The output's :class:`OutputSpec`.
      convention: ``"mergekit"`` or ``"fusionjax"``.
      layout: ``None`` (tensors as stored), ``"hf"`` or a layout family name,
        for :func:`fusionjax.io.open_checkpoint`.
      zero_base: Merge on a zero base (``linear``: the models' weighted sum).
      slices: For ``slices:`` configs, the :class:`SlicePlan`; else ``None``.
      build: ``build(torch_layout) -> merger``.
    """

    method: str
    base: ModelSpec
    models: tuple[ModelSpec, ...]
    merger: Any
    hparams: dict
    seed: int | None
    output: OutputSpec
    convention: str = "mergekit"
    layout: str | None = None
    zero_base: bool = False
    slices: Any = None
    build: Any = None

    def for_leaves(self, torch_layout: bool) -> MergePlan:
        """The plan with its merger built for leaves in torch or flax layout.

        Args:
          torch_layout: Whether the leaves are torch layout (``(out, in)`` weights).

        Returns:
          The plan, its ``merger`` rebuilt if an axis option depends on the layout.
        """
        if self.build is None:
            return self
        return self._replace(merger=self.build(torch_layout))


class SliceSource(NamedTuple):
    """One ``slices[i].sources[j]``: layers ``[start, end)`` of a model.

    Attributes:
      model: The checkpoint.
      start: First layer taken.
      end: One past the last layer taken.
      key: The config key, ``slices[i].sources[j]``.
    """

    model: ModelSpec
    start: int
    end: int
    key: str


class SlicePlan(NamedTuple):
    """mergekit's layer stacking (``slices`` with ``merge_method: passthrough``).

    Attributes:
      slices: One :class:`SliceSource` per slice, in output order: the output's
        layers are their layers, renumbered from 0.
      rest: The model the tensors outside the numbered layers come from
        (``base_model``, else the first slice's model).
    """

    slices: tuple[SliceSource, ...]
    rest: ModelSpec


# -- per-leaf values ----------------------------------------------------------


def _at(v: Any, info: Any) -> Any:
    return v.value_for(info) if isinstance(v, fj.LeafValue) else v


def _choices(v: Any) -> list:
    return list(v.values()) if isinstance(v, fj.LeafValue) else [v]


class PerLeaf(fj.LeafValue):
    """``fn(*args)`` with every argument that is a per-leaf value resolved at the leaf.

    Stacks per-model values that vary per tensor into the ``[T]`` value a
    per-model hyperparameter takes, and derives values (``1 - density``).
    """

    def __init__(self, fn: Callable[..., Any], args: tuple, label: str):
        self.fn = fn
        self.args = tuple(args)
        self.label = label

    def value_for(self, info):
        return self.fn(*[_at(a, info) for a in self.args])

    def values(self) -> list:
        options = [_choices(a) for a in self.args]
        if math.prod(len(o) for o in options) > 4096:
            return []  # too many combinations to list; each leaf is still checked
        return [self.fn(*combo) for combo in itertools.product(*options)]

    def __repr__(self):
        return self.label


def _stack(values: list, name: str) -> Any:
    """Per-model values as one ``[T]`` value (an array, or a per-leaf value)."""
    if not any(isinstance(v, fj.LeafValue) for v in values):
        return np.asarray(values, dtype=np.float64)
    label = f"{name}=[{', '.join(repr(v) for v in values)}]"
    return PerLeaf(lambda *vs: np.asarray(vs, dtype=np.float64), tuple(values), label)


def _map(fn: Callable[[Any], Any], v: Any, label: str) -> Any:
    if isinstance(v, fj.LeafValue):
        return PerLeaf(fn, (v,), label)
    return fn(v)


# -- reading values -----------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _filter_pattern(f: str) -> str:
    # mergekit: `filter in tensor_name`. Names here are path names `a/b/c`, so the
    # dots of a flat safetensors name match either separator.
    return "[./]".join(re.escape(part) for part in f.split("."))


@dataclasses.dataclass(frozen=True)
class _Param:
    """One hyperparameter a method takes from the config."""

    default: Any
    kind: str = "float"  # "float" | "bool" | "int"
    lower: float | None = None
    upper: float | None = None
    lower_open: bool = False
    upper_open: bool = False
    conv: bool = False  # a convention option: unset under `convention: fusionjax` -> None
    doc: str = ""

    def interval(self) -> str:
        lo = "(" if self.lower_open else "["
        hi = ")" if self.upper_open else "]"
        a = "-inf" if self.lower is None else f"{self.lower:g}"
        b = "inf" if self.upper is None else f"{self.upper:g}"
        return f"{lo}{a}, {b}{hi}"

    def check_number(self, x: float, key: str) -> None:
        if not math.isfinite(x):
            raise ConfigError(key, f"must be a finite number, got {x!r}")
        lo, hi = self.lower, self.upper
        bad = (lo is not None and (x < lo or (self.lower_open and x == lo))) or (
            hi is not None and (x > hi or (self.upper_open and x == hi))
        )
        if bad:
            raise ConfigError(key, f"must lie in {self.interval()}, got {x:g}")


def _value(raw: Any, p: _Param, key: str, fallback: Any) -> Any:
    """A config value as a number, bool, or per-leaf value (gradient / filter rules)."""
    if p.kind == "bool":
        if not isinstance(raw, bool):
            raise ConfigError(key, f"must be true or false, got {raw!r}")
        return raw
    if p.kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(key, f"must be an integer, got {raw!r}")
        p.check_number(raw, key)
        return raw
    if _is_number(raw):
        p.check_number(float(raw), key)
        return float(raw)
    if isinstance(raw, list) and not raw:
        raise ConfigError(key, "a gradient needs at least one value, got []")
    if isinstance(raw, list) and all(_is_number(x) for x in raw):
        for j, x in enumerate(raw):
            p.check_number(float(x), f"{key}[{j}]")
        vals = [float(x) for x in raw]
        if len(vals) == 1:
            return vals[0]
        # mergekit evaluates tensors outside the numbered layers at t = 0.
        return _Gradient(vals, key)
    if isinstance(raw, list) and all(isinstance(x, Mapping) for x in raw):
        rules, default = [], None
        for j, item in enumerate(raw):
            k = f"{key}[{j}]"
            _check_keys(item, {"filter", "value"}, k)
            if "value" not in item:
                raise ConfigError(k, "a filter rule needs a `value`")
            if default is not None:
                raise ConfigError(
                    k, "this rule is never used: an earlier rule without a filter matches "
                    "every tensor (put the rule without a filter last)"
                )
            v = _value(item["value"], p, f"{k}.value", fallback)
            f = item.get("filter")
            if f is None or f == "*":
                default = v
            elif not isinstance(f, str) or not f:
                raise ConfigError(f"{k}.filter", f"must be a non-empty string, got {f!r}")
            else:
                rules.append((_filter_pattern(f), v))
        if default is None:
            default = fallback
        if not rules:
            return default
        return fj.by_path(rules, default=default)
    raise ConfigError(
        key, "must be a number, a list of numbers (a gradient over the layers) or a list "
        f"of {{filter: ..., value: ...}} rules, got {raw!r}"
    )


class _Gradient(fj.LeafValue):
    """:func:`fusionjax.gradient` that remembers the config key (for length checks)."""

    def __init__(self, vals: list, key: str):
        self.inner = fj.gradient(vals, outside=vals[0])
        self.key = key
        self.length = len(vals)

    def value_for(self, info):
        return self.inner.value_for(info)

    def values(self):
        return self.inner.values()

    def __repr__(self):
        return f"gradient({self.inner.anchors.tolist()})"


def gradients_in(v: Any) -> list:
    """Every config gradient inside a (per-leaf) value, for checks against the model."""
    if isinstance(v, _Gradient):
        return [v]
    out = []
    if isinstance(v, PerLeaf):
        for a in v.args:
            out += gradients_in(a)
    elif isinstance(v, fj.LeafValue) and hasattr(v, "rules"):  # by_path
        for _, x in v.rules:
            out += gradients_in(x)
        out += gradients_in(v.default)
    elif isinstance(v, fj.Step):
        for x in v.hparams.values():
            out += gradients_in(x)
        for part in getattr(v, "parts", ()):
            out += gradients_in(part)
    return out


def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(d: Mapping, known, key: str) -> None:
    for k in d:
        if k not in known:
            where = f"{key}.{k}" if key else str(k)
            raise ConfigError(
                where, f"unknown key{_suggest(k, known)}; known: {', '.join(sorted(known))}"
            )


# -- methods ------------------------------------------------------------------

_UNIT = {"lower": 0.0, "upper": 1.0}
CONVENTIONS = ("mergekit", "fusionjax")


class BuildContext(NamedTuple):
    """What a method's steps depend on besides its hyperparameters.

    Attributes:
      convention: ``"mergekit"`` or ``"fusionjax"`` (the config's ``convention``).
      torch_layout: Whether the leaves are in torch layout (safetensors opened
        without a ``layout``: a Linear weight is ``(out, in)``) rather than flax
        layout (Orbax, or any checkpoint opened through a ``layout``: a Dense
        kernel is ``(in, out)``). Chooses the axis options.
      with_base: Whether the config names a ``base_model`` (task-vector space).
    """

    convention: str
    torch_layout: bool
    with_base: bool


@dataclasses.dataclass(frozen=True)
class _Method:
    """A mergekit method as fusionjax steps."""

    doc: str
    build: Callable[..., Any]
    base: str = "required"  # "required" | "optional"
    min_models: int = 1
    max_models: int | None = None
    global_params: Mapping[str, _Param] = dataclasses.field(default_factory=dict)
    model_params: Mapping[str, _Param] = dataclasses.field(default_factory=dict)
    drop_base: bool = True  # task-vector methods drop `models` entries that are the base
    base_first: bool = False  # the base is also the first model merged (slerp: t=0)
    base_in_models: bool = False  # karcher: a named base is one more input
    zero_base: bool = False  # linear: the models' weighted sum, not base + sum


def _check_nonneg_weights(w: Any, what: str) -> None:
    for v in _choices(w):
        arr = np.asarray(v, dtype=np.float64)
        if np.any(arr < 0) or not np.any(arr > 0):
            raise ConfigError(
                "models[*].parameters.weight",
                f"{what} takes non-negative weights, not all zero, got {arr.tolist()}",
            )


def _opt(**kwargs) -> dict:
    """The keyword arguments that are set (``None``: the factory's default)."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _merge_of(normalize: Any) -> str | None:
    # mergekit's `normalize` of the sign-election methods: mean (true) or sum (false)
    return None if normalize is None else ("mean" if normalize else "sum")


def _rescale_of(rescale: Any) -> str | None:
    # mergekit's `rescale`: scale each masked tensor back to its L1 norm, or not at all
    return None if rescale is None else ("l1" if rescale else "none")


def _conv(ctx: BuildContext) -> str:
    return "mergekit" if ctx.convention == "mergekit" else "fusionjax"


def _drop_rate(density: Any) -> Any:
    return _map(lambda d: 1.0 - np.asarray(d, np.float64), density, f"1-{density!r}")


def _linear(g, m, ctx):
    # mergekit: sum_t w_t theta_t (/ sum_t w_t if normalize), on a zero base
    if g["normalize"] is False:
        return merging.sum(weights=m["weight"])
    _check_nonneg_weights(m["weight"], "linear with normalize: true")
    return merging.mean(weights=m["weight"])


def _task_arithmetic(g, m, ctx):
    w = m["weight"]
    if g["normalize"]:
        _check_nonneg_weights(w, "task_arithmetic with normalize: true")
        return fj.chain(merging.mean(weights=w), merging.scale(g["lambda"]))
    return fj.chain(merging.sum(weights=w), merging.scale(g["lambda"]))


def _ties(g, m, ctx):
    return merging.ties(
        density=m["density"], weights=m["weight"], scaling=g["lambda"], convention=_conv(ctx),
        **_opt(merge=_merge_of(g["normalize"]), rescale=_rescale_of(g["rescale"])),
    )


def _dare_ties(g, m, ctx):
    return merging.dare_ties(
        drop_rate=_drop_rate(m["density"]), weights=m["weight"], scaling=g["lambda"],
        convention=_conv(ctx),
        **_opt(merge=_merge_of(g["normalize"]), rescale=_rescale_of(g["rescale"])),
    )


def _dare_linear(g, m, ctx):
    return merging.dare_linear(
        drop_rate=_drop_rate(m["density"]), weights=m["weight"], scaling=g["lambda"],
        **_opt(normalize=g["normalize"], rescale=_rescale_of(g["rescale"])),
    )


def _breadcrumbs(g, m, ctx):
    return merging.breadcrumbs(
        density=m["density"], gamma=m["gamma"], weights=m["weight"], scaling=g["lambda"],
        convention=_conv(ctx),
        **_opt(normalize=g["normalize"], rescale=_rescale_of(g["rescale"])),
    )


def _breadcrumbs_ties(g, m, ctx):
    return merging.breadcrumbs_ties(
        density=m["density"], gamma=m["gamma"], weights=m["weight"], scaling=g["lambda"],
        convention=_conv(ctx),
        **_opt(merge=_merge_of(g["normalize"]), rescale=_rescale_of(g["rescale"])),
    )


def _rank_axis(ctx: BuildContext) -> int | None:
    # mergekit ranks along torch's dim 1 (each output unit's inputs); on a flax
    # (in, out) kernel the same groups are what rank_axis=None does.
    return 1 if ctx.torch_layout else None


def _della(g, m, ctx):
    return merging.della(
        density=m["density"], weights=m["weight"], scaling=g["lambda"],
        rank_axis=_rank_axis(ctx), convention=_conv(ctx),
        **_opt(epsilon=m["epsilon"], merge=_merge_of(g["normalize"]),
               rescale=_rescale_of(g["rescale"])),
    )


def _della_linear(g, m, ctx):
    return merging.della_linear(
        density=m["density"], weights=m["weight"], scaling=g["lambda"],
        rank_axis=_rank_axis(ctx),
        **_opt(epsilon=m["epsilon"], normalize=g["normalize"],
               rescale=_rescale_of(g["rescale"])),
    )


def _slerp(g, m, ctx):
    return merging.slerp(t=g["t"], convention=_conv(ctx))


def _row_axis(ctx: BuildContext) -> int:
    # torch's last dim (each row of an (out, in) weight) is axis 0 of a flax (in, out) kernel
    return -1 if ctx.torch_layout else 0


def _nuslerp(g, m, ctx):
    if g["nuslerp_row_wise"]:
        axis = 0 if ctx.torch_layout else -1  # torch's dim 0
    else:
        axis = _row_axis(ctx)
    return merging.nuslerp(
        weights=m["weight"], flatten=g["nuslerp_flatten"], axis=axis,
        space="task_vectors" if ctx.with_base else "weights",
    )


def _multislerp(g, m, ctx):
    return merging.multislerp(
        weights=m["weight"], normalize_weights=g["normalize_weights"], eps=g["eps"],
        space="task_vectors" if ctx.with_base else "weights",
    )


def _karcher(g, m, ctx):
    return merging.karcher(max_iter=g["max_iter"], tol=g["tol"])


def _nearswap(g, m, ctx):
    return merging.nearswap(t=g["t"])


def _sce(g, m, ctx):
    return merging.sce(density=g["select_topk"])


def _arcee_fusion(g, m, ctx):
    return merging.arcee_fusion(axis=_row_axis(ctx))


def _model_stock(g, m, ctx):
    return merging.model_stock(
        filter_wise=g["filter_wise"], axis=_row_axis(ctx), convention=_conv(ctx)
    )


def _passthrough(g, m, ctx):
    # one model copied as it is: on a zero base, the mean of its one "task vector"
    return merging.mean()


_WEIGHT = _Param(1.0, doc="the model's weight")
_DENSITY = _Param(1.0, lower=0.0, upper=1.0, lower_open=True, doc="fraction of entries kept")
_GAMMA = _Param(0.01, lower=0.0, upper=1.0, upper_open=True, doc="fraction of largest dropped")
# conv=True: a table option of fusionjax.merging's "mergekit compatibility"; left
# unset under `convention: fusionjax`, the factory's own default applies.
_EPSILON = _Param(0.15, lower=0.0, conv=True, doc="half-width of the keep-probability range")


def _gta(normalize: bool, rescale: bool) -> dict:
    return {
        "lambda": _Param(1.0, doc="scaling of the merged task vector"),
        "normalize": _Param(normalize, kind="bool", conv=True,
                            doc="divide by the sum of the weights (mean, else sum)"),
        "rescale": _Param(rescale, kind="bool", conv=True,
                          doc="rescale masked tensors to their L1 norm"),
        "int8_mask": _Param(False, kind="bool", doc="mergekit memory option (no effect)"),
    }


METHODS: dict[str, _Method] = {
    "linear": _Method(
        "weighted average of the models (normalize: false: their weighted sum)", _linear,
        base="optional", drop_base=False, zero_base=True,
        global_params={"normalize": _Param(True, kind="bool")},
        model_params={"weight": _WEIGHT},
    ),
    "task_arithmetic": _Method(
        "base + lambda * sum_t weight_t * tau_t (sum, scale)", _task_arithmetic,
        global_params={k: v for k, v in _gta(False, False).items() if k != "rescale"},
        model_params={"weight": _WEIGHT},
    ),
    "ties": _Method(
        "trim to density, elect sign, disjoint mean or sum (ties)",
        _ties, global_params=_gta(True, False),
        model_params={"weight": _WEIGHT, "density": _DENSITY},
    ),
    "dare_ties": _Method(
        "random drop (1 - density), rescale, elect sign (dare_ties; seed)",
        _dare_ties, global_params=_gta(False, True),
        model_params={"weight": _WEIGHT, "density": _DENSITY},
    ),
    "dare_linear": _Method(
        "random drop (1 - density), rescale, weighted sum (dare_linear; seed)",
        _dare_linear, global_params=_gta(False, True),
        model_params={"weight": _WEIGHT, "density": _DENSITY},
    ),
    "breadcrumbs": _Method(
        "drop the largest gamma and the smallest entries, weighted sum (breadcrumbs)",
        _breadcrumbs, global_params=_gta(False, False),
        model_params={"weight": _WEIGHT, "density": _DENSITY, "gamma": _GAMMA},
    ),
    "breadcrumbs_ties": _Method(
        "breadcrumbs' mask, then TIES' sign election (breadcrumbs_ties)",
        _breadcrumbs_ties, global_params=_gta(False, False),
        model_params={"weight": _WEIGHT, "density": _DENSITY, "gamma": _GAMMA},
    ),
    "della": _Method(
        "magnitude-ranked random drop, elect sign, disjoint merge (della; seed)",
        _della, global_params=_gta(True, True),
        model_params={"weight": _WEIGHT, "density": _DENSITY, "epsilon": _EPSILON},
    ),
    "della_linear": _Method(
        "magnitude-ranked random drop, weighted sum (della_linear; seed)",
        _della_linear, global_params=_gta(False, True),
        model_params={"weight": _WEIGHT, "density": _DENSITY, "epsilon": _EPSILON},
    ),
    "slerp": _Method(
        "spherical interpolation from base_model (t=0) to the other model (t=1)",
        _slerp, min_models=1, max_models=1, base_first=True,
        global_params={"t": _Param(None, **_UNIT, doc="interpolation factor")},
    ),
    "nuslerp": _Method(
        "SLERP of two models by their weights, whole or row by row (task vectors with a "
        "base_model)", _nuslerp, base="optional", min_models=2, max_models=2,
        global_params={"nuslerp_flatten": _Param(True, kind="bool"),
                       "nuslerp_row_wise": _Param(False, kind="bool")},
        model_params={"weight": _WEIGHT},
    ),
    "multislerp": _Method(
        "barycentric SLERP of the models (task vectors with a base_model)", _multislerp,
        base="optional", min_models=1,
        global_params={"normalize_weights": _Param(True, kind="bool"),
                       "eps": _Param(1e-8, lower=0.0, lower_open=True)},
        model_params={"weight": _WEIGHT},
    ),
    "karcher": _Method(
        "Karcher mean of every model on the sphere (a base_model is one more model)",
        _karcher, base="optional", min_models=1, drop_base=False, base_in_models=True,
        global_params={"max_iter": _Param(10, kind="int", lower=1),
                       "tol": _Param(1e-5, lower=0.0, lower_open=True)},
    ),
    "nearswap": _Method(
        "take the other model's entries where they lie within t of the base", _nearswap,
        min_models=1, max_models=1,
        global_params={"t": _Param(None, lower=0.0, doc="similarity threshold")},
    ),
    "sce": _Method(
        "select by variance, calculate weights, erase minority signs (sce)", _sce,
        global_params={"select_topk": _Param(1.0, **_UNIT),
                       "int8_mask": _Param(False, kind="bool")},
    ),
    "arcee_fusion": _Method(
        "keep the base's entries except the changes that matter most", _arcee_fusion,
        min_models=1, max_models=1,
    ),
    "model_stock": _Method(
        "Model Stock: interpolate base and the models' average by their angle",
        _model_stock, min_models=2,
        global_params={"filter_wise": _Param(False, kind="bool")},
    ),
    "passthrough": _Method(
        "copy one model as it is; with `slices:`, stack layers of several models",
        _passthrough, base="optional", min_models=1, max_models=1, drop_base=False,
        zero_base=True,
    ),
}

# fusionjax factories that make a merger from hyperparameters alone.
NATIVE = (
    "arcee_fusion", "breadcrumbs", "breadcrumbs_ties", "dare", "dare_linear", "dare_ties",
    "della", "della_linear", "disjoint_max", "karcher", "mean", "model_stock", "multislerp",
    "nearswap", "nuslerp", "sce", "slerp", "sum", "task_arithmetic", "ties", "uniform_soup",
    "weighted_average",
)
NATIVE_PREFIX = "fusionjax."
_TOKENIZER = (
    "fusionjax merges weights only; copy the tokenizer files yourself (models whose "
    "vocabularies differ need their embedding rows aligned first: "
    "fusionjax.io.align_embeddings)"
)
_UNSUPPORTED = {
    "tokenizer_source": _TOKENIZER,
    "tokenizer": _TOKENIZER,
    "chat_template": _TOKENIZER,
    "modules": "mergekit's multi-module configs are not supported",
}
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
             "seed", "key", "output", "name", "convention", "layout", "slices",
             *_UNSUPPORTED}
_MISSING = object()


def method_names() -> list[str]:
    """Every ``merge_method`` the config accepts."""
    return sorted(METHODS) + [NATIVE_PREFIX + n for n in NATIVE]


# -- the config ---------------------------------------------------------------


def _model_ref(raw: Any, key: str) -> ModelSpec:
    fmt = None
    path_key = key
    if isinstance(raw, Mapping):  # {model: PATH, format: ...} (fusionjax), {path: ...}
        _check_keys(raw, {"model", "path", "format"}, key)
        name = "model" if "model" in raw else "path"
        if name not in raw:
            raise ConfigError(key, "needs `model: PATH`")
        path_key = f"{key}.{name}"
        fmt = raw.get("format")
        if fmt is not None and fmt not in FORMATS:
            raise ConfigError(
                f"{key}.format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}"
                + _suggest(fmt, FORMATS)
            )
        raw = raw[name]
    if not isinstance(raw, str) or not raw:
        raise ConfigError(path_key, f"must be a checkpoint path, got {raw!r}")
    return ModelSpec(raw, fmt, path_key)


def _dtype(raw: Any, key: str) -> str | None:
    if raw is None:
        return None
    name = _DTYPE_ALIASES.get(raw, raw) if isinstance(raw, str) else raw
    if name not in DTYPES:
        raise ConfigError(
            key, f"must be one of {', '.join(DTYPES)}, got {raw!r}" + _suggest(raw, DTYPES)
        )
    return name


def _output(cfg: Mapping) -> OutputSpec:
    out = cfg.get("output") or {}
    if not isinstance(out, Mapping):
        raise ConfigError("output", f"must be a mapping, got {out!r}")
    _check_keys(out, {"format", "dtype", "max_shard_bytes"}, "output")
    fmt = out.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(
            "output.format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}"
            + _suggest(fmt, FORMATS)
        )
    if out.get("dtype") is not None:
        dtype = _dtype(out["dtype"], "output.dtype")
    elif cfg.get("out_dtype") is not None:
        dtype = _dtype(cfg["out_dtype"], "out_dtype")
    else:
        dtype = _dtype(cfg.get("dtype"), "dtype")
    shard = out.get("max_shard_bytes")
    if shard is not None and (isinstance(shard, bool) or not isinstance(shard, int) or shard <= 0):
        raise ConfigError("output.max_shard_bytes", f"must be a positive integer, got {shard!r}")
    if shard is not None and fmt == "orbax":
        raise ConfigError("output.max_shard_bytes", "applies to safetensors output only")
    return OutputSpec(fmt, dtype, shard)


def _seed(cfg: Mapping) -> int | None:
    if "seed" in cfg and "key" in cfg:
        raise ConfigError("key", "give `seed` or `key`, not both")
    k = "seed" if "seed" in cfg else "key"
    s = cfg.get(k)
    if s is None:
        return None
    if isinstance(s, bool) or not isinstance(s, int) or s < 0:
        raise ConfigError(k, f"must be a non-negative integer, got {s!r}")
    return s


def _layout(cfg: Mapping) -> str | None:
    raw = cfg.get("layout")
    if raw is None or raw == "none":
        return None
    from fusionjax.io import _layout as layout_lib

    known = ("hf", *sorted(layout_lib.FAMILIES))
    if raw not in known:
        raise ConfigError(
            "layout", f"must be none, {', '.join(known)}; got {raw!r}" + _suggest(raw, known)
        )
    return raw


def _convention(cfg: Mapping, method: str) -> str:
    raw = cfg.get("convention")
    if raw is None:
        return "fusionjax" if method.startswith(NATIVE_PREFIX) else "mergekit"
    if raw not in CONVENTIONS:
        raise ConfigError(
            "convention", f"must be one of {', '.join(CONVENTIONS)}, got {raw!r}"
            + _suggest(raw, CONVENTIONS)
        )
    if method.startswith(NATIVE_PREFIX):
        raise ConfigError(
            "convention", f"{method} takes fusionjax's defaults; pass the factory's own "
            "option instead (parameters: {convention: mergekit} where it has one)"
        )
    return raw


def parse_config(cfg: Any) -> MergePlan:
    """Validates a config (the YAML as Python data) into a :class:`MergePlan`.

    Reads nothing: paths are checked when the checkpoints are opened.

    Args:
      cfg: The parsed YAML: a mapping with ``merge_method``, ``models``, ...

    Returns:
      The :class:`MergePlan`.

    Raises:
      ConfigError: naming the config key at fault (``models[1].parameters.density``).
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError("", f"the config must be a YAML mapping, got {type(cfg).__name__}")
    _check_keys(cfg, _TOP_KEYS, "")
    for k, why in _UNSUPPORTED.items():
        if cfg.get(k) is not None:
            raise ConfigError(k, why)
    if "merge_method" not in cfg:
        raise ConfigError("merge_method", "missing")
    method = cfg["merge_method"]
    if not isinstance(method, str):
        raise ConfigError("merge_method", f"must be a method name, got {method!r}")
    base = None
    if cfg.get("base_model") is not None:
        base = _model_ref(cfg["base_model"], "base_model")
    top = cfg.get("parameters") or {}
    if not isinstance(top, Mapping):
        raise ConfigError("parameters", f"must be a mapping, got {top!r}")
    output = _output(cfg)
    _dtype(cfg.get("dtype"), "dtype")
    seed = _seed(cfg)
    convention = _convention(cfg, method)
    layout = _layout(cfg)
    if cfg.get("slices") is not None:
        return _slices(cfg, method, base, top, output, convention, layout)
    models_raw = cfg.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError("models", "must be a non-empty list of {model: PATH, ...}")
    entries = []
    for i, item in enumerate(models_raw):
        key = f"models[{i}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, Mapping):
            raise ConfigError(key, f"must be a mapping with `model: PATH`, got {item!r}")
        _check_keys(item, {"model", "format", "parameters"}, key)
        if "model" not in item:
            raise ConfigError(key, "needs `model: PATH`")
        ref = _model_ref({k: item[k] for k in ("model", "format") if k in item}, key)
        params = item.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise ConfigError(f"{key}.parameters", f"must be a mapping, got {params!r}")
        entries.append((i, ref, params))
    if method.startswith(NATIVE_PREFIX):
        plan = _native(method, base, entries, top, output, seed)
    elif method not in METHODS:
        raise ConfigError(
            "merge_method",
            f"unknown method {method!r}{_suggest(method, method_names())}; known: "
            f"{', '.join(method_names())}",
        )
    else:
        plan = _mergekit(method, METHODS[method], base, entries, top, output, seed, convention)
    return plan._replace(convention=convention, layout=layout)


def _slices(cfg, method, base, top, output, convention, layout) -> MergePlan:
    if method != "passthrough":
        raise ConfigError(
            "merge_method", f"slices take merge_method: passthrough (layer stacking); a "
            f"merge per slice ({method}) is not supported yet"
        )
    if cfg.get("models") is not None:
        raise ConfigError("models", "give `slices:` or `models:`, not both")
    if top:
        raise ConfigError("parameters", "passthrough slices take no parameters")
    raw = cfg["slices"]
    if not isinstance(raw, list) or not raw:
        raise ConfigError("slices", "must be a non-empty list of {sources: [...]}")
    out = []
    for i, item in enumerate(raw):
        key = f"slices[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(key, f"must be a mapping with `sources:`, got {item!r}")
        _check_keys(item, {"sources"}, key)
        sources = item.get("sources")
        if not isinstance(sources, list) or not sources:
            raise ConfigError(f"{key}.sources", "must be a non-empty list of "
                              "{model: PATH, layer_range: [START, END]}")
        if len(sources) > 1:
            raise ConfigError(
                f"{key}.sources", f"{len(sources)} sources: merging several models within a "
                "slice is not supported yet; give one source per slice"
            )
        skey = f"{key}.sources[0]"
        src = sources[0]
        if not isinstance(src, Mapping):
            raise ConfigError(skey, f"must be a mapping with `model:` and `layer_range:`, "
                              f"got {src!r}")
        _check_keys(src, {"model", "format", "layer_range"}, skey)
        if "model" not in src:
            raise ConfigError(skey, "needs `model: PATH`")
        ref = _model_ref({k: src[k] for k in ("model", "format") if k in src}, skey)
        rng = src.get("layer_range")
        if (not isinstance(rng, list) or len(rng) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) for x in rng)):
            raise ConfigError(f"{skey}.layer_range", f"must be [START, END] (integers), "
                              f"got {rng!r}")
        start, end = rng
        if start < 0 or end <= start:
            raise ConfigError(f"{skey}.layer_range", f"needs 0 <= START < END, got {rng!r}")
        out.append(SliceSource(ref, start, end, skey))
    rest = base if base is not None else out[0].model
    models = tuple(dict.fromkeys(s.model for s in out))
    return MergePlan("passthrough", rest, models, None, {}, None, output, convention,
                     layout, False, SlicePlan(tuple(out), rest))


def _mergekit(name, spec, base, entries, top, output, seed, convention) -> MergePlan:
    known = set(spec.global_params) | set(spec.model_params)
    _check_keys(top, known, "parameters")
    for i, _, params in entries:
        _check_keys(params, set(spec.model_params), f"models[{i}].parameters")
    if base is None and spec.base == "required":
        raise ConfigError("base_model", f"{name} needs a base_model")
    with_base = base is not None
    if spec.drop_base and base is not None:
        entries = [e for e in entries if e[1].path != base.path]
    if spec.base_in_models and base is not None and all(
            e[1].path != base.path for e in entries):
        entries = [(-1, base, {}), *entries]
    n = len(entries)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        want = (
            f"exactly {spec.min_models}" if spec.max_models == spec.min_models
            else f"at least {spec.min_models}"
        )
        besides = " besides the base" if spec.drop_base and with_base else ""
        raise ConfigError("models", f"{name} merges {want} model(s){besides}, got {n}")
    mergekit = convention == "mergekit"
    g = {}
    for k, p in spec.global_params.items():
        if k in top:
            g[k] = _value(top[k], p, f"parameters.{k}", p.default)
        elif p.default is None:
            raise ConfigError(f"parameters.{k}", f"{name} needs `{k}`")
        else:
            g[k] = p.default if mergekit or not p.conv else None
    per_model = {}
    for k, p in spec.model_params.items():
        default = p.default if mergekit or not p.conv else None
        set_anywhere = k in top or any(k in params for _, _, params in entries)
        if default is None and not set_anywhere:
            per_model[k] = None
            continue
        if default is None:
            default = p.default
        fallback = _value(top[k], p, f"parameters.{k}", default) if k in top else default
        vals = [
            _value(params[k], p, f"models[{i}].parameters.{k}", fallback) if k in params
            else fallback
            for i, _, params in entries
        ]
        per_model[k] = _stack(vals, k)

    def build(torch_layout: bool):
        ctx = BuildContext(convention, torch_layout, with_base)
        try:
            return spec.build(g, per_model, ctx)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError("parameters", f"{name}: {e}") from None

    merger = build(True)
    if base is None:  # no base: the first model carries the structure
        base = entries[0][1]
    hparams = {k: v for k, v in {**g, **per_model}.items() if v is not None}
    models = tuple(r for _, r, _ in entries)
    if spec.base_first:
        models = (base, *models)
    return MergePlan(name, base, models, merger, hparams, seed, output,
                     zero_base=spec.zero_base, build=build)


def _native(method, base, entries, top, output, seed) -> MergePlan:
    fname = method[len(NATIVE_PREFIX):]
    if fname not in NATIVE:
        raise ConfigError(
            "merge_method",
            f"unknown method {method!r}{_suggest(method, method_names())}; known: "
            f"{', '.join(method_names())}",
        )
    factory = getattr(merging, fname)
    sig = inspect.signature(factory)
    known = [k for k in sig.parameters if k != "merger"]
    _check_keys(top, known, "parameters")
    for i, _, params in entries:
        _check_keys(params, known, f"models[{i}].parameters")
    if base is None:
        raise ConfigError("base_model", f"{method} needs a base_model")
    entries = [e for e in entries if e[1].path != base.path]
    if not entries:
        raise ConfigError("models", "no model to merge besides the base")
    anything = _Param(None)
    kwargs = {}
    for k, v in top.items():
        kwargs[k] = v if isinstance(v, str) else _value(v, anything, f"parameters.{k}", None)
    names = {k for _, _, params in entries for k in params}
    for k in names:
        fallback = kwargs.get(k, _MISSING)
        vals = []
        for i, _, params in entries:
            if k in params:
                vals.append(_value(params[k], anything, f"models[{i}].parameters.{k}", None))
            elif fallback is not _MISSING:
                vals.append(fallback)
            else:
                raise ConfigError(
                    f"models[{i}].parameters.{k}",
                    f"missing: other models set `{k}`, so every model needs it (or set it "
                    "under the top-level parameters)",
                )
        kwargs[k] = _stack(vals, k)
    try:
        merger = factory(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError("parameters", f"{method}: {e}") from None
    if not isinstance(merger, fj.Step) or not merger.reduces:
        raise ConfigError("merge_method", f"{method} does not make a merger")
    return MergePlan(method, base, tuple(r for _, r, _ in entries), merger, kwargs, seed,
                     output)


def load_config(path: str) -> MergePlan:
    """Reads a YAML config file and validates it (:func:`parse_config`).

    Args:
      path: The YAML file.

    Returns:
      The :class:`MergePlan`.

    Raises:
      ConfigError: if the file is missing, is not YAML, or fails validation.
    """
    import yaml  # only the command line needs PyYAML

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("", f"cannot read the config {path}: {e.strerror}") from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path} is not valid YAML: {e}") from None
    return parse_config(cfg)
