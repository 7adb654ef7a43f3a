r"""The ready distillation loop: a student trained on any of the library's losses, compiled.

Step :math:`s` draws ``batch_size`` examples uniformly with replacement from ``data`` (a
pytree of arrays with a leading example axis: windows, labels, precomputed teacher
:class:`fusionjax.distill.TopK` targets, masks) with ``jax.random.fold_in(key, s)``, runs
the student, and takes an optimizer step on

.. math::
  \nabla_\theta\ \ell\big(f_\theta(x_B),\ B\big),

where ``loss(student_logits, batch) -> (scalar, aux)`` is any distillation loss closed over
its hyperparameters (the FuseLLM objective
:math:`\lambda\,\mathcal L_{\mathrm{CLM}} + (1-\lambda)\,\mathcal L_{\mathrm{fusion}}`,
plain cross-entropy, ULD, ...). A hand-written loop with the same step under
:func:`jax.jit` gives the same parameters (tested).

What costs time, and what is done about it: compiling (seconds per architecture) next to
running (milliseconds per step for the testbed's students). The step is a
:class:`jax.tree_util.Partial` of a module-level function, so
:func:`fusionjax._src.training.run_steps` passes the data, the key and the array leaves
of ``loss`` and ``student_apply`` (when they are ``Partial`` s: e.g. the weight
:math:`\lambda` of a ``Partial(fused_loss, lam=0.9)``) as *arguments* of one compiled
``lax.fori_loop``; every run with the same student function, loss function, optimizer
object, batch size and shapes (another seed, another teacher's targets, another
:math:`\lambda`) reuses that compilation. Build the optimizer once and pass the same
object to every run: a new ``optax.adam(...)`` per call is a new cache key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from fusionjax._src import training
from fusionjax._src import validation

Params = Any
Loss = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


class DistillOutput(NamedTuple):
    """The result of :func:`distill`.

    Attributes:
      params: The trained student parameters.
      losses: ``[steps]`` float32, the loss of every step (before its update).
      opt_state: The optimizer state after the last step (to continue training).
    """

    params: Params
    losses: np.ndarray
    opt_state: Any


def sample_batch(key: jax.Array, data: Any, batch_size: int) -> Any:
    """``batch_size`` examples of ``data`` drawn uniformly with replacement.

    Args:
      key: PRNG key of this step.
      data: Pytree of arrays with a shared leading example axis.
      batch_size: Examples drawn.

    Returns:
      ``data`` with every leaf indexed by the same ``batch_size`` random indices.
    """
    n = jax.tree.leaves(data)[0].shape[0]
    idx = jax.random.randint(key, (batch_size,), 0, n)
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), data)


def _step(student_apply, loss, optimizer, batch_size, s, params, opt_state, key, data):
    batch = sample_batch(jax.random.fold_in(key, s), data, batch_size)

    def objective(p):
        value, _ = loss(student_apply(p, batch), batch)
        return value

    value, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value.astype(jnp.float32)


def distill(
    student_apply: Callable[[Params, Any], jax.Array],
    params: Params,
    data: Any,
    loss: Loss,
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    batch_size: int,
    key: jax.Array,
    chunk: int = 100,
    progress: Any = None,
    jit: bool = True,
) -> DistillOutput:
    r"""Trains a student on a distillation loss with an optax optimizer, compiled.

    Args:
      student_apply: ``student_apply(params, batch) -> logits`` (e.g. ``lambda p, b:
        module.apply({"params": p}, b["inputs"])``, defined once; a
        :class:`jax.tree_util.Partial` of a module-level function shares the compiled loop
        across objects).
      params: The student's initial parameters (the target's base model).
      data: Pytree of arrays with a shared leading example axis ``N`` (inputs, labels,
        teacher targets, masks); lives on the device for the whole run.
      loss: ``loss(student_logits, batch) -> (scalar, aux)``; ``aux`` is computed but not
        kept (return ``None`` if there is none).
      optimizer: Any optax optimizer (schedules included); pass the same object to runs
        that should share a compilation.
      steps: Optimizer steps.
      batch_size: Examples per step.
      key: PRNG key of the batch sampling.
      chunk: Steps per compiled call (progress is reported between calls).
      progress: ``None``, a callable (called with a message per chunk), or a tqdm-like bar
        or class.
      jit: Compile the loop; ``False`` runs the same steps eagerly.

    Returns:
      A :class:`DistillOutput`.

    Raises:
      ValueError: if ``data`` has no leaves, leaves disagree on ``N`` or ``N = 0``, or
        ``steps``, ``batch_size`` or ``chunk`` is out of range.
      TypeError: if ``loss`` or ``student_apply`` is not callable, or ``key`` is not a key.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from fusionjax import distill as fd
      >>> data = {"x": jnp.eye(4), "y": jnp.arange(4)}
      >>> apply = lambda w, b: b["x"] @ w
      >>> def ce(logits, b):
      ...     return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean(), None
      >>> out = fd.distill(apply, jnp.zeros((4, 4)), data, ce, optimizer=optax.adam(0.1),
      ...                  steps=50, batch_size=4, key=jax.random.key(0))
      >>> bool(out.losses[-1] < out.losses[0])
      True
    """
    if not callable(student_apply):
        raise TypeError(f"student_apply must be callable, got {type(student_apply).__name__}")
    if not callable(loss):
        raise TypeError(f"loss must be callable, got {type(loss).__name__}")
    validation.check_examples(data, batch_size, name="data")
    validation.check_int("steps", steps, lower=0)
    validation.check_int("batch_size", batch_size, lower=1)
    validation.check_int("chunk", chunk, lower=1)
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        if not (isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,)):
            raise TypeError(f"key must be a PRNG key (jax.random.key(0)), got {key!r}")
    optimizer = training.standard_promotion(optimizer)
    step = Partial(_step, student_apply, loss, optimizer, int(batch_size))
    data = jax.tree.map(jnp.asarray, data)
    params, opt_state, losses = training.run_steps(
        step,
        params,
        optimizer.init(params),
        (key, data),
        steps=steps,
        jit=jit,
        chunk=chunk,
        progress=progress,
        desc="distillation",
    )
    return DistillOutput(params, losses, opt_state)
