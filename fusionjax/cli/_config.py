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

fusionjax's own methods. ``merge_method: fusionjax.NAME`` builds
``fusionjax.merging.NAME(**parameters)`` with the top-level ``parameters`` as
keyword arguments (strings allowed, e.g. ``scope: model``) and per-model
``parameters`` stacked into one ``[T]`` value per name.

Not supported, rejected with an error naming the key: ``tokenizer_source``,
``tokenizer``, ``chat_template`` (fusionjax merges weights; copy the tokenizer
files yourself), ``modules``, and ``slices`` (mergekit's layer stacking).

Where fusionjax's methods differ from mergekit's (see the issue's list:
DARE/DELLA rescaling by :math:`1/q` rather than matching the L1 norm, kept counts
:math:`\lceil\rho n\rceil`, a zero elected sign, SLERP of a zero tensor,
computing in float32), the merge follows fusionjax's definitions.
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
      merger: The :class:`fusionjax.Step` for :func:`fusionjax.merge`.
      hparams: The method's hyperparameters as configured, ``{name: value}``
        (for the dry run's printout; per-leaf values are resolved there).
      seed: Seed of the PRNG key, for random methods (``None`` otherwise).
      output: The output's :class:`OutputSpec`.
    """

    method: str
    base: ModelSpec
    models: tuple[ModelSpec, ...]
    merger: Any
    hparams: dict
    seed: int | None
    output: OutputSpec


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


def _weights_all_equal(w: Any) -> float | None:
    if isinstance(w, np.ndarray) and np.all(w == w[0]):
        return float(w[0])
    return None


def _check_nonneg_weights(w: Any, what: str) -> None:
    for v in _choices(w):
        arr = np.asarray(v, dtype=np.float64)
        if np.any(arr < 0) or not np.any(arr > 0):
            raise ConfigError(
                "models[*].parameters.weight",
                f"{what} takes non-negative weights, not all zero, got {arr.tolist()}",
            )


def _weighted_mean(w: Any) -> Any:
    """``fusionjax.merging.mean`` with per-model (possibly per-leaf) weights."""
    _check_nonneg_weights(w, "a weighted mean")
    t = len(w.args) if isinstance(w, PerLeaf) else len(w)
    step = merging.mean(weights=np.ones(t))
    return step.replace(hparams={"weights": w})


def _weighted_sum(w: Any, lam: Any, normalize: bool) -> list:
    """Steps merging ``[T]`` task vectors into ``λ Σ w_t τ_t`` (``/ Σ w_t`` if normalize)."""
    eq = _weights_all_equal(w)
    if eq is not None:
        if normalize:
            return [merging.mean(), merging.scale(lam)]
        return [merging.sum(), merging.scale(_map(lambda x: x * eq, lam, f"{lam!r}*{eq:g}"))]
    mean = _weighted_mean(w)
    if normalize:
        return [mean, merging.scale(lam)]
    total = PerLeaf(lambda ws, la: float(np.sum(ws)) * la, (w, lam), f"{lam!r}*sum(weight)")
    return [mean, merging.scale(total)]


def _ties_merge(w: Any, lam: Any, normalize: bool, method: str) -> list:
    """Elect sign, then the disjoint mean (normalize) or sum, scaled by ``λ``."""
    eq = _weights_all_equal(w)
    if eq is None:
        raise ConfigError(
            "models[*].parameters.weight",
            f"{method}: fusionjax's sign election takes equal weights per model for now; "
            f"got {_choices(w)[0].tolist() if isinstance(w, np.ndarray) else w!r}",
        )
    if normalize:
        return [merging.elect_sign(), merging.disjoint_mean(), merging.scale(lam)]
    scaled = _map(lambda x: x * eq, lam, f"{lam!r}*{eq:g}")
    return [merging.elect_sign(), merging.sum(), merging.scale(scaled)]


def _drop_rate(density: Any) -> Any:
    return _map(lambda d: 1.0 - np.asarray(d, np.float64), density, f"1-{density!r}")


def _require_rescale(g: Mapping, method: str) -> None:
    if not g["rescale"]:
        raise ConfigError(
            "parameters.rescale",
            f"{method}: fusionjax's random drop always rescales the kept entries by 1/q; "
            "rescale: false is not supported",
        )


def _linear(g, m):
    if not g["normalize"]:
        raise ConfigError(
            "parameters.normalize",
            "linear with normalize: false (an unnormalised sum of weights) is not "
            "supported; use task_arithmetic with a base_model",
        )
    eq = _weights_all_equal(m["weight"])
    return merging.mean() if eq is not None else _weighted_mean(m["weight"])


def _task_arithmetic(g, m):
    return fj.chain(*_weighted_sum(m["weight"], g["lambda"], g["normalize"]))


def _ties(g, m):
    return fj.chain(
        merging.trim(density=m["density"]),
        *_ties_merge(m["weight"], g["lambda"], g["normalize"], "ties"),
    )


def _dare_ties(g, m):
    _require_rescale(g, "dare_ties")
    return fj.chain(
        merging.drop_and_rescale(drop_rate=_drop_rate(m["density"])),
        *_ties_merge(m["weight"], g["lambda"], g["normalize"], "dare_ties"),
    )


def _dare_linear(g, m):
    _require_rescale(g, "dare_linear")
    return fj.chain(
        merging.drop_and_rescale(drop_rate=_drop_rate(m["density"])),
        *_weighted_sum(m["weight"], g["lambda"], g["normalize"]),
    )


def _breadcrumbs(g, m):
    return fj.chain(
        merging.drop_extremes(density=m["density"], gamma=m["gamma"]),
        *_weighted_sum(m["weight"], g["lambda"], g["normalize"]),
    )


def _breadcrumbs_ties(g, m):
    return fj.chain(
        merging.drop_extremes(density=m["density"], gamma=m["gamma"]),
        *_ties_merge(m["weight"], g["lambda"], g["normalize"], "breadcrumbs_ties"),
    )


def _della(g, m):
    _require_rescale(g, "della")
    return fj.chain(
        merging.magnitude_drop(density=m["density"], epsilon=m["epsilon"]),
        *_ties_merge(m["weight"], g["lambda"], g["normalize"], "della"),
    )


def _della_linear(g, m):
    _require_rescale(g, "della_linear")
    return fj.chain(
        merging.magnitude_drop(density=m["density"], epsilon=m["epsilon"]),
        *_weighted_sum(m["weight"], g["lambda"], g["normalize"]),
    )


def _slerp(g, m):
    return merging.slerp(t=g["t"])


def _model_stock(g, m):
    if g["filter_wise"]:
        raise ConfigError("parameters.filter_wise", "filter_wise: true is not supported")
    return merging.model_stock()


_WEIGHT = _Param(1.0, doc="the model's weight")
_DENSITY = _Param(1.0, lower=0.0, upper=1.0, lower_open=True, doc="fraction of entries kept")
_GTA = {
    "lambda": _Param(1.0, doc="scaling of the merged task vector"),
    "normalize": _Param(False, kind="bool", doc="divide by the sum of the weights"),
    "int8_mask": _Param(False, kind="bool", doc="mergekit memory option (no effect)"),
}


def _gta(normalize: bool, rescale: bool | None = None) -> dict:
    out = dict(_GTA)
    out["normalize"] = dataclasses.replace(out["normalize"], default=normalize)
    if rescale is not None:
        out["rescale"] = _Param(rescale, kind="bool", doc="rescale kept entries (1/q)")
    return out


METHODS: dict[str, _Method] = {
    "linear": _Method(
        "weighted average of the models (mean)", _linear, base="optional", drop_base=False,
        global_params={"normalize": _Param(True, kind="bool")},
        model_params={"weight": _WEIGHT},
    ),
    "task_arithmetic": _Method(
        "base + lambda * sum_t weight_t * tau_t (sum, scale)", _task_arithmetic,
        global_params=_gta(False), model_params={"weight": _WEIGHT},
    ),
    "ties": _Method(
        "trim to density, elect sign, disjoint mean (trim, elect_sign, disjoint_mean)",
        _ties, global_params=_gta(True),
        model_params={"weight": _WEIGHT, "density": _DENSITY},
    ),
    "dare_ties": _Method(
        "random drop (1 - density), rescale, elect sign (drop_and_rescale, elect_sign)",
        _dare_ties, global_params=_gta(False, rescale=True),
        model_params={"weight": _WEIGHT, "density": _DENSITY},
    ),
    "dare_linear": _Method(
        "random drop (1 - density), rescale, weighted sum (drop_and_rescale, sum)",
        _dare_linear, global_params=_gta(False, rescale=True),
        model_params={"weight": _WEIGHT, "density": _DENSITY},
    ),
    "breadcrumbs": _Method(
        "drop the largest gamma and the smallest entries, weighted sum (drop_extremes)",
        _breadcrumbs, global_params=_gta(False),
        model_params={"weight": _WEIGHT, "density": _DENSITY,
                      "gamma": _Param(0.01, lower=0.0, upper=1.0, upper_open=True)},
    ),
    "breadcrumbs_ties": _Method(
        "breadcrumbs' mask, then TIES' sign election (drop_extremes, elect_sign)",
        _breadcrumbs_ties, global_params=_gta(False),
        model_params={"weight": _WEIGHT, "density": _DENSITY,
                      "gamma": _Param(0.01, lower=0.0, upper=1.0, upper_open=True)},
    ),
    "della": _Method(
        "magnitude-ranked random drop, elect sign, disjoint mean (magnitude_drop)",
        _della, global_params=_gta(True, rescale=True),
        model_params={"weight": _WEIGHT, "density": _DENSITY,
                      "epsilon": _Param(0.15, lower=0.0)},
    ),
    "della_linear": _Method(
        "magnitude-ranked random drop, weighted sum (magnitude_drop, sum)",
        _della_linear, global_params=_gta(False, rescale=True),
        model_params={"weight": _WEIGHT, "density": _DENSITY,
                      "epsilon": _Param(0.15, lower=0.0)},
    ),
    "slerp": _Method(
        "spherical interpolation from base_model (t=0) to the other model (t=1)",
        _slerp, min_models=1, max_models=1, base_first=True,
        global_params={"t": _Param(None, **_UNIT, doc="interpolation factor")},
    ),
    "model_stock": _Method(
        "Model Stock: interpolate base and the models' average by their angle",
        _model_stock, min_models=2,
        global_params={"filter_wise": _Param(False, kind="bool")},
    ),
}

# fusionjax factories that make a merger from hyperparameters alone.
NATIVE = (
    "breadcrumbs", "dare", "dare_ties", "della", "mean", "model_stock", "slerp",
    "task_arithmetic", "ties", "uniform_soup", "weighted_average",
)
NATIVE_PREFIX = "fusionjax."
_UNSUPPORTED = {
    "tokenizer_source": "fusionjax merges weights only; copy the tokenizer files yourself",
    "tokenizer": "fusionjax merges weights only; copy the tokenizer files yourself",
    "chat_template": "fusionjax merges weights only; copy the tokenizer files yourself",
    "modules": "mergekit's multi-module configs are not supported",
    "slices": "mergekit's layer stacking (slices, passthrough) is not supported yet; "
    "use models:",
}
_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
             "seed", "key", "output", "name", *_UNSUPPORTED}
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
    base = None
    if cfg.get("base_model") is not None:
        base = _model_ref(cfg["base_model"], "base_model")
    top = cfg.get("parameters") or {}
    if not isinstance(top, Mapping):
        raise ConfigError("parameters", f"must be a mapping, got {top!r}")
    output = _output(cfg)
    _dtype(cfg.get("dtype"), "dtype")
    seed = _seed(cfg)
    if method.startswith(NATIVE_PREFIX):
        return _native(method, base, entries, top, output, seed)
    if method not in METHODS:
        raise ConfigError(
            "merge_method",
            f"unknown method {method!r}{_suggest(method, method_names())}; known: "
            f"{', '.join(method_names())}",
        )
    return _mergekit(method, METHODS[method], base, entries, top, output, seed)


def _mergekit(name, spec, base, entries, top, output, seed) -> MergePlan:
    known = set(spec.global_params) | set(spec.model_params)
    _check_keys(top, known, "parameters")
    for i, _, params in entries:
        _check_keys(params, set(spec.model_params), f"models[{i}].parameters")
    if base is None and spec.base == "required":
        raise ConfigError("base_model", f"{name} needs a base_model")
    if spec.drop_base and base is not None:
        entries = [e for e in entries if e[1].path != base.path]
    n = len(entries)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        want = (
            f"exactly {spec.min_models}" if spec.max_models == spec.min_models
            else f"at least {spec.min_models}"
        )
        raise ConfigError("models", f"{name} merges {want} model(s) besides the base, got {n}")
    g = {}
    for k, p in spec.global_params.items():
        if k in top:
            g[k] = _value(top[k], p, f"parameters.{k}", p.default)
        elif p.default is None:
            raise ConfigError(f"parameters.{k}", f"{name} needs `{k}`")
        else:
            g[k] = p.default
    per_model = {}
    for k, p in spec.model_params.items():
        fallback = _value(top[k], p, f"parameters.{k}", p.default) if k in top else p.default
        vals = [
            _value(params[k], p, f"models[{i}].parameters.{k}", fallback) if k in params
            else fallback
            for i, _, params in entries
        ]
        per_model[k] = _stack(vals, k)
    try:
        merger = spec.build(g, per_model)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError("parameters", f"{name}: {e}") from None
    if base is None:  # linear without a base: the first model is the reference
        base = entries[0][1]
    hparams = {**g, **per_model}
    models = tuple(r for _, r, _ in entries)
    if spec.base_first:
        models = (base, *models)
    return MergePlan(name, base, models, merger, hparams, seed, output)


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
