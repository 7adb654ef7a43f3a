"""``fusionjax merge``: open the checkpoints' metadata, validate, print or run the plan.

Order of work, so a bad config fails in seconds and writes nothing:

1. the YAML is parsed into a :class:`~fusionjax.cli._config.MergePlan` (no file
   but the config is read);
2. every checkpoint is opened with :func:`fusionjax.io.open_checkpoint`, which
   reads headers and metadata only;
3. :func:`fusionjax.merge` runs over sources whose ``read`` stops the merge: all
   of its checks from metadata (structure, shapes, dtypes, hyperparameters per
   leaf, per-model values against ``T``, keys) run exactly as in the real merge,
   and the first attempt to read a tensor ends the check;
4. ``--dry-run`` prints the plan; otherwise
   :func:`fusionjax.io.merge_checkpoints` streams the merge to the output.
"""

from __future__ import annotations

import math
import os
import re
import sys
from typing import Any
from typing import TextIO

import jax
import numpy as np

import fusionjax as fj
from fusionjax._src import base as base_lib
from fusionjax._src import paths as paths_lib
from fusionjax._src import stream
from fusionjax.cli import _config


class CheckpointError(ValueError):
    """A checkpoint named in the config cannot be merged; ``key`` is its config key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


class _StopBeforeRead(Exception):  # noqa: N818 - a signal, not an error
    """Raised by :class:`_MetadataOnly` when the merge asks for a tensor."""


class _MetadataOnly:
    """A :class:`fusionjax.LeafSource` with a source's metadata whose reads stop the merge."""

    def __init__(self, src: Any):
        self.treedef = src.treedef
        self.paths = src.paths
        self.specs = src.specs
        self.kinds = src.kinds

    def read(self, index: int) -> Any:
        raise _StopBeforeRead()


class _ZeroBase:
    """A source with another's metadata whose parameters read as zeros (``linear``)."""

    def __init__(self, src: Any):
        self.inner = src
        self.treedef = src.treedef
        self.paths = src.paths
        self.specs = src.specs
        self.kinds = src.kinds
        if getattr(src, "layout", None) is not None:
            self.layout = src.layout  # the output is written back through it

    def read(self, index: int) -> Any:
        spec = self.specs[index]
        if self.kinds[index] == stream.PARAM and stream.is_array_like(spec):
            return np.zeros(spec.shape, spec.dtype)
        return self.inner.read(index)


def torch_layout(plan: _config.MergePlan, base_src: Any) -> bool:
    """Whether the merged leaves are in torch layout: safetensors opened without a layout."""
    from fusionjax import io

    return plan.layout is None and isinstance(base_src, io.SafetensorsSource)


def _open(spec: _config.ModelSpec, layout: Any, opened: dict) -> Any:
    from fusionjax import io  # orbax and safetensors load with the io subpackage

    cache_key = (os.path.abspath(spec.path), spec.format)
    if cache_key in opened:
        return opened[cache_key]
    if not os.path.exists(spec.path):
        raise CheckpointError(spec.key, f"{spec.path}: no such file or directory")
    try:
        src = io.open_checkpoint(spec.path, format=spec.format, layout=layout)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise CheckpointError(
            spec.key, f"{spec.path} does not open as a checkpoint: {e}"
        ) from None
    opened[cache_key] = src
    return src


def open_sources(plan: _config.MergePlan) -> tuple[Any, list]:
    """Opens the base and the models' checkpoints (metadata only).

    Checkpoints open through the config's ``layout`` (``None``: tensors as stored).

    Args:
      plan: The validated config.

    Returns:
      ``(base_source, [model_sources])``.

    Raises:
      CheckpointError: naming the config key of a checkpoint that is missing or
        does not open.
    """
    opened: dict = {}
    base = _open(plan.base, plan.layout, opened)
    return base, [_open(m, plan.layout, opened) for m in plan.models]


def _config_names(message: str, plan: _config.MergePlan) -> str:
    """``finetuned[j]`` in a message of :func:`fusionjax.merge` as the config key."""

    def sub(m):
        j = int(m.group(1))
        spec = plan.models[j]
        return f"{spec.key} ({spec.path})"

    msg = re.sub(r"finetuned\[(\d+)\]", sub, message)
    return re.sub(r"^base\b", f"{plan.base.key} ({plan.base.path})", msg)


def merge_key(plan: _config.MergePlan):
    """The PRNG key of a random method (from ``seed``, default 0), else ``None``."""
    if not plan.merger.needs_key:
        return None
    return jax.random.key(0 if plan.seed is None else plan.seed)


def validate(plan: _config.MergePlan, base_src: Any, model_srcs: list) -> None:
    """Runs every check of the merge that needs no tensor data.

    Args:
      plan: The validated config.
      base_src: The base's source.
      model_srcs: The models' sources.

    Raises:
      CheckpointError: if the checkpoints disagree (structure, shape, dtype) or a
        hyperparameter does not fit them; the message names the config key.
    """
    n_layers = base_lib.num_layers(base_src.paths)
    for g in _config.gradients_in(plan.merger):
        if n_layers is not None and g.length > n_layers:
            raise CheckpointError(
                g.key,
                f"a gradient of {g.length} values for a model of {n_layers} layers: "
                f"give at most {n_layers} values",
            )
    try:
        fj.merge(
            _MetadataOnly(base_src),
            [_MetadataOnly(s) for s in model_srcs],
            plan.merger,
            key=merge_key(plan),
        )
    except _StopBeforeRead:
        return
    except (ValueError, TypeError) as e:
        raise CheckpointError("", _config_names(str(e), plan)) from None


def output_format(plan: _config.MergePlan, out: str) -> str:
    """The output's format: ``output.format``, else from ``OUT``'s name or the base's format."""
    if plan.output.format is not None:
        return plan.output.format
    if str(out).endswith(".safetensors"):
        return "safetensors"
    if plan.base.format is not None:
        return plan.base.format
    from fusionjax import io

    return io.detect_format(plan.base.path)


def check_output(out: str, *, overwrite: bool) -> None:
    """Raises :class:`CheckpointError` (key ``OUT``) if ``out`` cannot be written.

    Args:
      out: The output path.
      overwrite: Whether an existing output may be replaced.
    """
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CheckpointError("OUT", f"{out}: the directory {parent} does not exist")
    if os.path.exists(out) and not overwrite:
        raise CheckpointError("OUT", f"{out} exists; pass --overwrite to replace it")


def _fmt_value(v: Any) -> str:
    arr = np.asarray(v)
    if arr.ndim == 0:
        return f"{float(arr):.6g}" if arr.dtype.kind == "f" else str(arr.item())
    return "[" + ", ".join(_fmt_value(x) for x in arr) + "]"


def describe_step(step: Any) -> str:
    """A resolved step as ``name(k=v) -> name(...)``."""
    parts = step.parts or (step,)
    out = []
    for p in parts:
        hp = ", ".join(f"{k}={_fmt_value(v)}" for k, v in sorted(p.hparams.items()))
        out.append(f"{p.name}({hp})")
    return " -> ".join(out)


def _nbytes(spec: Any, dtype: Any = None) -> int:
    if not stream.is_array_like(spec):
        return 0
    return math.prod(spec.shape) * np.dtype(dtype or spec.dtype).itemsize


def _out_dtype(spec: Any, kind: str, plan: _config.MergePlan) -> Any:
    if plan.output.dtype is None or kind == stream.OTHER:
        return spec.dtype
    return jax.numpy.dtype(plan.output.dtype)


def print_plan(plan: _config.MergePlan, base_src: Any, model_srcs: list, out: str,
               file: TextIO) -> None:
    """Prints the dry run: every leaf, the method per leaf, bytes read and written.

    Args:
      plan: The validated config.
      base_src: The base's source.
      model_srcs: The models' sources.
      out: The output path.
      file: Where to print.
    """
    t = len(model_srcs)
    n_layers = base_lib.num_layers(base_src.paths)
    size = sum(
        math.prod(s.shape) for s, k in zip(base_src.specs, base_src.kinds, strict=True)
        if k == stream.PARAM
    )
    merger = plan.merger
    passes = 1 + (0 if merger.leafwise else sum(
        p.statistic.num_passes for p in (merger.parts or (merger,)) if p.statistic is not None
    ))
    p = print
    p(f"method: {plan.method} ({merger.name})", file=file)
    p(f"base: {plan.base.path}" + (" (zeros: the models' weighted sum)" if plan.zero_base
                                    else ""), file=file)
    p(f"convention: {plan.convention}; layout: {plan.layout or 'none'}", file=file)
    for m in plan.models:
        p(f"model: {m.path}", file=file)
    if merger.needs_key:
        p(f"seed: {0 if plan.seed is None else plan.seed}", file=file)
    fmt = output_format(plan, out)
    p(f"output: {out} format={fmt} dtype={plan.output.dtype or '(kept)'}", file=file)
    p("leaves:", file=file)
    read = written = 0
    for path, spec, kind in zip(base_src.paths, base_src.specs, base_src.kinds, strict=True):
        name = paths_lib.path_name(path)
        nb = _nbytes(spec)
        dt = _out_dtype(spec, kind, plan) if stream.is_array_like(spec) else None
        wb = _nbytes(spec, dt)
        if kind == stream.PARAM:
            info = fj.LeafInfo(path, tuple(spec.shape), spec.dtype, t, n_layers, size)
            how = describe_step(merger.resolve(info))
            read += (t + 1) * nb * passes
        elif kind == stream.RUNNING_STAT:
            how = "average of the models (running statistic)"
            read += t * nb
        else:
            how = "passed through (must be equal in every model)"
            read += (t + 1) * nb
        written += wb
        shape = tuple(spec.shape) if stream.is_array_like(spec) else ()
        dtype = np.dtype(spec.dtype).name if stream.is_array_like(spec) else type(spec).__name__
        p(f"  {name}  {shape}  {dtype}  {nb} bytes  {how}", file=file)
    p(f"total: {len(base_src.paths)} leaves, {read} bytes read, {written} bytes written",
      file=file)


def run(config_path: str, out: str, *, dry_run: bool = False, progress: bool = True,
        overwrite: bool = False, file: TextIO | None = None) -> int:
    """``fusionjax merge CONFIG OUT``: validate, then print the plan or merge.

    Args:
      config_path: The YAML config.
      out: The output checkpoint path.
      dry_run: Print the plan and stop (no tensor is read, nothing is written).
      progress: Show a progress bar while merging.
      overwrite: Replace an existing output.
      file: Where to print (default stdout).

    Returns:
      The exit status (0).

    Raises:
      ConfigError: for a bad config (exit status 2).
      CheckpointError: for checkpoints that cannot be merged (exit status 1).
    """
    file = file or sys.stdout
    plan = _config.load_config(config_path)
    if plan.slices is not None:
        return run_slices(plan, out, dry_run=dry_run, progress=progress,
                          overwrite=overwrite, file=file)
    base_src, model_srcs = open_sources(plan)
    plan = plan.for_leaves(torch_layout(plan, base_src))
    if plan.zero_base:
        base_src = _ZeroBase(base_src)
    validate(plan, base_src, model_srcs)
    check_output(out, overwrite=overwrite)
    fmt = output_format(plan, out)
    if dry_run:
        print_plan(plan, base_src, model_srcs, out, file)
        return 0
    from fusionjax import io

    kwargs = {}
    if plan.output.max_shard_bytes is not None:
        kwargs["max_shard_bytes"] = plan.output.max_shard_bytes
    try:
        io.merge_checkpoints(
            base_src,
            model_srcs,
            plan.merger,
            out,
            format=fmt,
            dtype=plan.output.dtype,
            key=merge_key(plan),
            progress=progress,
            overwrite=overwrite,
            **kwargs,
        )
    except (ValueError, TypeError, OSError) as e:
        raise CheckpointError("", _config_names(str(e), plan)) from None
    print(f"merged {len(model_srcs)} model(s) with {plan.method} into {out} ({fmt})",
          file=file)
    return 0


# -- slices: mergekit's layer stacking -----------------------------------------

_LAYER_PARENTS = ("layers", "layer", "h", "blocks", "block")


def _names(path: tuple) -> tuple[str, ...]:
    return tuple(paths_lib.path_name((k,)) for k in path)


def _layer_pos(names: tuple[str, ...]) -> int | None:
    """Where the layer number sits in a leaf's names (``model/layers/N/...``), or ``None``."""
    for i in range(1, len(names)):
        if names[i].isdigit() and names[i - 1] in _LAYER_PARENTS:
            return i
    return None


class StackedSource:
    """A :class:`fusionjax.LeafSource` whose leaves are other sources' leaves, renamed.

    Args:
      leaves: ``{output names: (source, leaf index)}``; the output tree nests the
        names as dict keys.
    """

    def __init__(self, leaves: dict):
        tree: dict = {}
        order = list(leaves)
        for j, names in enumerate(order):
            node = tree
            for k in names[:-1]:
                node = node.setdefault(k, {})
            node[names[-1]] = j
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
        self.paths = [p for p, _ in flat]
        self.origin = [leaves[order[j]] for _, j in flat]
        self.specs = [src.specs[i] for src, i in self.origin]
        self.kinds = [src.kinds[i] for src, i in self.origin]

    def read(self, index: int) -> Any:
        src, i = self.origin[index]
        return src.read(i)


def _spec_str(spec: Any) -> str:
    if not stream.is_array_like(spec):
        return type(spec).__name__
    return f"{tuple(spec.shape)} {np.dtype(spec.dtype).name}"


def stack_slices(plan: _config.MergePlan) -> tuple[StackedSource, list]:
    """Opens the slices' checkpoints (metadata only) and maps the output's leaves.

    Output layer ``n`` (counted over the slices in order) is layer
    ``start + m`` of its slice's model; every leaf outside the numbered layers
    comes from ``plan.slices.rest`` (the ``base_model``, else the first slice's).

    Args:
      plan: A plan with ``slices``.

    Returns:
      ``(source, [(output name, source config key, source leaf name)])``.

    Raises:
      CheckpointError: naming the config key: a missing checkpoint, a model without
        numbered layers, a ``layer_range`` past the model's last layer, or layers
        whose tensors differ (names, shapes, dtypes) from the first output layer.
    """
    opened: dict = {}
    rest = _open(plan.slices.rest, None, opened)
    leaves: dict = {}
    origin: list = []
    for p, _ in enumerate(rest.paths):
        names = _names(rest.paths[p])
        if _layer_pos(names) is None:
            leaves[names] = (rest, p)
            origin.append((names, plan.slices.rest.key, "/".join(names)))
    first_layer = None
    n_out = 0
    for s in plan.slices.slices:
        src = _open(s.model, None, opened)
        by_layer: dict = {}
        for p, path in enumerate(src.paths):
            names = _names(path)
            pos = _layer_pos(names)
            if pos is not None:
                by_layer.setdefault(int(names[pos]), []).append((names, pos, p))
        if not by_layer:
            raise CheckpointError(
                s.key + ".model", f"{s.model.path} has no numbered layers "
                f"({'/'.join(_LAYER_PARENTS[:1])}/N/...) to take a layer_range of"
            )
        n = max(by_layer) + 1
        if s.end > n:
            raise CheckpointError(
                s.key + ".layer_range", f"[{s.start}, {s.end}] of {s.model.path}, a model of "
                f"{n} layers: END must be at most {n}"
            )
        for layer in range(s.start, s.end):
            items = by_layer.get(layer, [])
            shape = {
                n_[pos + 1:]: _spec_str(src.specs[p]) for n_, pos, p in items
            }
            if first_layer is None:
                first_layer = (shape, s, layer)
            elif shape != first_layer[0]:
                want, s0, l0 = first_layer
                diff = sorted(set(want.items()) ^ set(shape.items()))
                what = "/".join(diff[0][0]) if diff else "?"
                raise CheckpointError(
                    s.key, f"layer {layer} of {s.model.path} does not match layer {l0} of "
                    f"{s0.model.path} (the first layer stacked): {what}: "
                    f"{shape.get(diff[0][0], 'missing')} vs {want.get(diff[0][0], 'missing')}"
                )
            for names, pos, p in items:
                new = (*names[:pos], str(n_out), *names[pos + 1:])
                leaves[new] = (src, p)
                origin.append((new, s.key, "/".join(names)))
            n_out += 1
    return StackedSource(leaves), origin


def run_slices(plan: _config.MergePlan, out: str, *, dry_run: bool, progress: bool,
               overwrite: bool, file: TextIO | None) -> int:
    """``slices`` with ``passthrough``: stack the layers, leaf by leaf into the output.

    Args:
      plan: A plan with ``slices``.
      out: The output checkpoint path.
      dry_run: Print the map from output leaves to source leaves and stop.
      progress: Show a progress bar while writing.
      overwrite: Replace an existing output.
      file: Where to print (default stdout).

    Returns:
      The exit status (0).

    Raises:
      CheckpointError: for checkpoints that cannot be stacked (before any read).
    """
    file = file or sys.stdout
    src, origin = stack_slices(plan)
    check_output(out, overwrite=overwrite)
    fmt = output_format(plan, out)
    if dry_run:
        print(f"method: passthrough (slices: {len(plan.slices.slices)})", file=file)
        print(f"output: {out} format={fmt} dtype={plan.output.dtype or '(kept)'}", file=file)
        print("leaves:", file=file)
        names = {tuple(n): (k, s) for n, k, s in origin}
        total = 0
        for path, spec in zip(src.paths, src.specs, strict=True):
            n = _names(path)
            key, sname = names[n]
            total += _nbytes(spec)
            print(f"  {'/'.join(n)}  {_spec_str(spec)}  <- {key}: {sname}", file=file)
        print(f"total: {len(src.paths)} leaves, {total} bytes read", file=file)
        return 0
    from fusionjax import io

    kwargs = {}
    if plan.output.max_shard_bytes is not None:
        kwargs["max_shard_bytes"] = plan.output.max_shard_bytes
    try:
        sink = io.open_sink(out, format=fmt, like=src, dtype=plan.output.dtype,
                            progress=progress, overwrite=overwrite, **kwargs)
    except (ValueError, TypeError, OSError) as e:
        raise CheckpointError("OUT", str(e)) from None
    try:
        for i in range(len(src.paths)):
            sink.write(i, src.read(i))
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    print(f"stacked {len(src.paths)} leaves from {len(plan.models)} model(s) into {out} "
          f"({fmt})", file=file)
    return 0
