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


def open_sources(plan: _config.MergePlan) -> tuple[Any, list]:
    """Opens the base and the models' checkpoints (metadata only).

    Args:
      plan: The validated config.

    Returns:
      ``(base_source, [model_sources])``.

    Raises:
      CheckpointError: naming the config key of a checkpoint that is missing or
        does not open.
    """
    from fusionjax import io  # orbax and safetensors load with the io subpackage

    opened: dict = {}

    def one(spec: _config.ModelSpec):
        cache_key = (os.path.abspath(spec.path), spec.format)
        if cache_key in opened:
            return opened[cache_key]
        if not os.path.exists(spec.path):
            raise CheckpointError(spec.key, f"{spec.path}: no such file or directory")
        try:
            src = io.open_checkpoint(spec.path, format=spec.format)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise CheckpointError(
                spec.key, f"{spec.path} does not open as a checkpoint: {e}"
            ) from None
        opened[cache_key] = src
        return src

    return one(plan.base), [one(m) for m in plan.models]


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
    p(f"base: {plan.base.path}", file=file)
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
    base_src, model_srcs = open_sources(plan)
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
