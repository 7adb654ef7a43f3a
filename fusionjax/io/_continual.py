r"""Continual merging (OPCM) of checkpoints streamed from disk, one leaf at a time.

:func:`fusionjax.merging.opcm` absorbs models one at a time with constant memory in their
number, but each ``update`` takes a whole model. Here the fine-tuned models are
checkpoints read one *leaf* at a time: the state is the base and the running sum
:math:`S_t` (two models' worth), and a model's leaf is projected, added to :math:`S_t`
and dropped before the next is read. OPCM's scaling needs whole-model norms,
:math:`\lVert\tau\rVert` and :math:`\lVert S_{t+1}\rVert`, but both are sums of
per-leaf squared norms, so they accumulate over the leaves and the scalars are updated
once a model is through:

.. math::
   \lVert\tau\rVert^2 = \sum_i \lVert\tau^{(i)}\rVert^2,\qquad
   \lVert S_{t+1}\rVert^2 = \sum_i \lVert S_t^{(i)} + P(\tau^{(i)})\rVert^2 .

The result equals :func:`fusionjax.merging.opcm` on the loaded models up to the order of
floating-point summation (the same per-leaf kernels).

What costs time, and what is done about it: one SVD of :math:`S_t^{(i)}` per projected
matrix per model, as in memory; one compiled kernel per leaf shape serves every model.
Peak memory: base + :math:`S_t` + one leaf, whatever the number of models.
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax._src.validation import compute_dtype
from fusionjax.io import _checkpoint
from fusionjax.io._stream_merge import _as_source
from fusionjax.io._stream_merge import output_path
from fusionjax.merging import _opcm

keystr = jax.tree_util.keystr


class OPCMCheckpointsOutput(NamedTuple):
    r"""The result of :func:`opcm_checkpoints`.

    Attributes:
      path: Where the merged checkpoint was written.
      format: ``"safetensors"`` or ``"orbax"``.
      scaling: :math:`\lambda_t` after each model, ``[T]`` (the first is 1).
      leaf_reads: Leaves read from the fine-tuned checkpoints (each once).
      seconds: Wall time of the whole call.
    """

    path: pathlib.Path
    format: str
    scaling: np.ndarray
    leaf_reads: int
    seconds: float


def opcm_checkpoints(
    base: Any,
    finetuned: Sequence[Any],
    out: str | os.PathLike,
    *,
    alpha: float = 0.5,
    drop_diagonal: bool = True,
    mask: Any = None,
    format: str | None = None,
    progress: Any = False,
    overwrite: bool = False,
    layout: Any = None,
) -> OPCMCheckpointsOutput:
    r"""OPCM continual merging of checkpoints on disk, each read one leaf at a time.

    Equivalent to absorbing ``load(f)`` for every ``f`` in order with
    :func:`fusionjax.merging.opcm` (``alpha``, ``drop_diagonal``, ``mask``) and saving
    ``state.merged`` to ``out``, with memory for the base, the running sum
    :math:`S_t` and one leaf, whatever the number of models (see the module docstring).

    Args:
      base: The base checkpoint: a path (safetensors file or directory, Orbax directory)
        or a :class:`fusionjax.LeafSource`. Read whole (it is part of the state).
      finetuned: The fine-tuned checkpoints in the order they arrive; formats may mix.
      out: The output path (``.safetensors`` file or directory, or Orbax directory).
      alpha: OPCM's :math:`\alpha\in[0, 1]` (:func:`fusionjax.merging.opcm`).
      drop_diagonal: Drop the diagonal components as FusionBench does.
      mask: Which leaves are projected: ``None`` (every floating-point 2-D leaf), a
        pytree of booleans with the base's structure, or a callable ``mask(base)``.
      format: ``"safetensors"`` or ``"orbax"``; ``None`` follows ``out`` and the base.
      progress: A tqdm bar for the writing (``True``), or none (``False``, the default).
      overwrite: Replace an existing ``out`` (else ``FileExistsError`` before any read).
      layout: How checkpoints given as paths are opened (as for
        :func:`fusionjax.io.merge_checkpoints`).

    Returns:
      An :class:`OPCMCheckpointsOutput`.

    Raises:
      FileNotFoundError: a checkpoint is missing (named).
      FileExistsError: ``out`` exists and ``overwrite`` is false.
      ValueError: ``finetuned`` is empty, ``alpha`` is outside ``[0, 1]``, a checkpoint
        differs from the base in structure, shape or dtype (before any tensor is read),
        a non-float leaf differs from the base's, or a leaf has NaN/Inf (naming the
        checkpoint and the path); nothing is written at ``out``.

    Examples:
      >>> import numpy as np, tempfile
      >>> from fusionjax import io
      >>> d = tempfile.mkdtemp()
      >>> for name, v in [("base", 0.0), ("a", 1.0), ("b", 3.0)]:
      ...     _ = io.save_safetensors({"b": np.full(2, v, np.float32)}, f"{d}/{name}.safetensors")
      >>> r = io.opcm_checkpoints(f"{d}/base.safetensors",
      ...                         [f"{d}/a.safetensors", f"{d}/b.safetensors"],
      ...                         f"{d}/out.safetensors")
      >>> io.load_safetensors(r.path)["b"].tolist()  # the sum rescaled to the mean norm
      [2.0, 2.0]

    References:
      Tang et al, `Merging Models on the Fly Without Retraining: A Sequential Approach
      to Scalable Continual Model Merging <https://arxiv.org/abs/2501.09522>`_, NeurIPS
      2025.
    """
    t0 = time.perf_counter()
    validation.check_nonempty(finetuned)
    merger = _opcm.opcm(alpha=alpha, drop_diagonal=drop_diagonal, mask=mask)  # checks them
    base_src = _as_source(base, "base", layout)
    ft_srcs = [_as_source(f, f"finetuned[{j}]", layout) for j, f in enumerate(finetuned)]
    validation.check_sources(base_src, ft_srcs)
    fmt = _checkpoint.output_format(out, format, like=base_src)
    out_path = output_path(out, [base_src, *ft_srcs])
    write_layout = getattr(base_src, "layout", None)
    sink = _checkpoint.open_sink(
        out_path, format=fmt, like=base_src, progress=progress, overwrite=overwrite,
        layout=write_layout,
    )  # fmt: skip
    try:
        base_leaves = [base_src.read(i) for i in range(len(base_src.paths))]
        tree = base_src.treedef.unflatten(base_leaves)
        state = merger.init(tree)  # checks the mask and the base (finite, not complex)
        flags = _opcm._resolve_mask(mask, tree)
        totals = jax.tree.structure(tree).flatten_up_to(state.total)
        scaling, norm_sum, count = state.scaling, state.norm_sum, state.count
        dt = scaling.dtype
        alpha_arr = jnp.asarray(alpha, dt)
        history, reads = [], 0
        for j, src in enumerate(ft_srcs):
            first = count == 0
            sq_tv = sq_total = jnp.zeros((), dt)
            for i, (path, b) in enumerate(zip(base_src.paths, base_leaves, strict=True)):
                f = src.read(i)
                reads += 1
                if totals[i] is None:
                    if not validation.values_equal(np.asarray(b), np.asarray(f)):
                        raise ValueError(
                            f"finetuned[{j}] differs from base at {keystr(path)}: this "
                            f"{validation.describe(b)} leaf is not merged and must be equal."
                        )
                    continue
                if not np.isfinite(np.asarray(f)).all():  # on the host: no compile per shape
                    raise ValueError(f"finetuned[{j}] has NaN or Inf values at {keystr(path)}.")
                totals[i], a, c = _opcm.absorb_leaf(
                    b, f, totals[i], alpha_arr, first, flags[i], bool(drop_diagonal), dt
                )
                sq_tv, sq_total = sq_tv + a, sq_total + c
            scaling, norm_sum, count = _opcm.next_scaling(sq_tv, sq_total, norm_sum, count)
            history.append(float(scaling))
        for i, (b, s) in enumerate(zip(base_leaves, totals, strict=True)):
            if s is None:  # not merged (the state holds no sum for it)
                sink.write(i, b)
                continue
            cd = compute_dtype(b.dtype)
            sink.write(i, np.asarray((jnp.asarray(b, cd) + s / scaling.astype(cd)).astype(b.dtype)))
        path = sink.finish()
    except BaseException:
        sink.abort()
        raise
    return OPCMCheckpointsOutput(
        path=pathlib.Path(path),
        format=fmt,
        scaling=np.asarray(history),
        leaf_reads=reads,
        seconds=time.perf_counter() - t0,
    )
