r"""Ready-made training loops for merging coefficients: AdaMerging, AdaMerging++, aTLAS.

Every loop is the plain optax loop below, compiled: step :math:`s` draws its batches with
:func:`sample_batches` from ``jax.random.fold_in(key, s)``, takes the gradient of the
objective with respect to the coefficients, and applies the optimizer's update. A
hand-written loop with the same objective, optimizer, key and batch size (its step under
``jax.jit``) reproduces the ready loop's coefficients bit for bit (tested):

.. code-block:: python

  opt = optax.adam(1e-3)
  coef = fj.learned.init_coefficients(tvs, granularity="layer")
  state = opt.init(coef)
  for s in range(500):
      batches = fj.learned.sample_batches(jax.random.fold_in(key, s), unlabeled, 16)
      grads = jax.grad(fj.learned.adamerging_loss)(
          coef, batches, base=base, task_vectors=tvs, logits_fn=logits_fn, clamp=(0, 1))
      updates, state = opt.update(grads, state, coef)
      coef = optax.apply_updates(coef, updates)

The compiled loop runs ``chunk`` steps per call with a ``lax.fori_loop`` (the task vectors
and data are arguments, never constants baked into the program), reporting progress
between calls. Its step is a :class:`jax.tree_util.Partial` of a module-level function,
so a ``logits_fn`` that is itself a ``Partial`` (as :attr:`fusionjax.testbed.Testbed.logits`
is) passes its arrays as arguments too, and one compilation serves every call with the
same shapes, optimizer and hyperparameters (the default Adam is built once per learning
rate).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from fusionjax._src import keys as keys_lib
from fusionjax._src import training
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax._src.base import PRNGKey
from fusionjax._src.base import Stacked
from fusionjax._src.merge import chain
from fusionjax.learned import _coefficients
from fusionjax.learned import _objectives
from fusionjax.learned._coefficients import Clamp
from fusionjax.learned._coefficients import Coefficients
from fusionjax.learned._coefficients import Granularity
from fusionjax.learned._objectives import LogitsFn
from fusionjax.merging import _ties

Objective = Callable[..., jax.Array]


class LearnedMergeOutput(NamedTuple):
    r"""The result of a learned merge (a pytree of arrays: it can be returned from ``jax.jit``).

    Attributes:
      coefficients: The trained coefficients as the optimizer left them (before any
        clamp; :func:`fusionjax.learned.effective` gives the clamped values).
      params: The merged model :math:`\theta_0 + \sum_t \lambda_t \odot \tau_t`.
      losses: The objective at every step (before that step's update), ``[steps]``.
    """

    coefficients: Coefficients
    params: Params
    losses: np.ndarray


def _leading_size(data: Any, t: int) -> int:
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(data)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"task {t}'s data must be an array (or a tuple of arrays) with one leading "
            f"example axis; got leaves of shapes {[np.shape(x) for x in jax.tree.leaves(data)]}."
        )
    n = sizes.pop()
    if n == 0:
        raise ValueError(f"task {t}'s data has no examples.")
    return n


def sample_batches(key: PRNGKey, data: Sequence[Any], batch_size: int) -> list[Any]:
    """Draws one batch per task, uniformly with replacement.

    Task ``t`` draws ``batch_size`` indices with ``jax.random.randint(fold_in(key, t),
    ...)`` and takes them from every leaf of ``data[t]`` (an array, or an ``(x, y)``
    tuple).

    Args:
      key: PRNG key of this step.
      data: One pool of examples per task.
      batch_size: Examples per task (16 in AdaMerging).

    Returns:
      A list of batches, one per task.
    """
    out = []
    for t, d in enumerate(data):
        n = _leading_size(d, t)
        idx = jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, n)
        out.append(jax.tree.map(lambda a, i=idx: jnp.take(a, i, axis=0), d))
    return out


@functools.lru_cache(maxsize=16)
def adam(learning_rate: float) -> optax.GradientTransformation:
    """``optax.adam(learning_rate)`` under standard promotion, one object per learning rate.

    The learned loops' default optimizer: being the same object on every call, it keys
    one compiled loop for all of them.
    """
    return training.standard_promotion(optax.adam(learning_rate))


def _step(objective, logits_fn, optimizer, batch_size, clamp, s, coef, opt_state, *args):
    key, base, tvs, partition, data = args
    batches = sample_batches(jax.random.fold_in(key, s), data, batch_size)
    loss, grads = jax.value_and_grad(objective)(
        coef,
        batches,
        base=base,
        task_vectors=tvs,
        logits_fn=logits_fn,
        partition=partition,
        clamp=clamp,
    )
    updates, opt_state = optimizer.update(grads, opt_state, coef)
    return optax.apply_updates(coef, updates), opt_state, loss


def fit_coefficients(
    objective: Objective,
    base: Params,
    task_vectors: Stacked,
    data: Sequence[Any],
    logits_fn: LogitsFn,
    coefficients: Coefficients,
    *,
    optimizer: optax.GradientTransformation,
    steps: int,
    batch_size: int,
    key: PRNGKey,
    partition: Params | None = None,
    clamp: Clamp = None,
    progress: Any = None,
    jit: bool = True,
    chunk: int = 50,
) -> LearnedMergeOutput:
    """Trains merging coefficients with an optax optimizer: the loop every method here uses.

    Args:
      objective: ``objective(coefficients, batches, *, base, task_vectors, logits_fn,
        partition, clamp) -> scalar``, e.g. :func:`fusionjax.learned.adamerging_loss`.
      base: Base parameters.
      task_vectors: Stacked task vectors ``[T, ...]``.
      data: One pool of examples per task (see :func:`sample_batches`).
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]``.
      coefficients: Initial coefficients.
      optimizer: An optax optimizer.
      steps: Number of optimizer steps.
      batch_size: Examples per task per step.
      key: PRNG key of the batch sampling.
      partition: Block ids for block-wise coefficients.
      clamp: Clip of the coefficients in the forward pass.
      progress: ``None``, a callable (called with a message per chunk), a tqdm-like bar or
        class (updated by steps).
      jit: Compile the loop (``False`` runs the same steps eagerly, op by op: the
        reference the compiled loop is tested and benchmarked against).
      chunk: Steps per compiled call (progress is reported between calls).

    Returns:
      A :class:`LearnedMergeOutput`.
    """
    validation.check_hparam("steps", steps, lower=0)
    validation.check_hparam("batch_size", batch_size, lower=1)
    if not isinstance(data, (list, tuple)) or not data:
        raise ValueError("data must be a non-empty list with one pool of examples per task.")
    for t, d in enumerate(data):
        _leading_size(d, t)
    if key is None:
        raise ValueError("key is required: it draws the batches, e.g. key=jax.random.key(0).")
    optimizer = training.standard_promotion(optimizer)
    step = Partial(_step, objective, logits_fn, optimizer, int(batch_size), clamp)
    coef, _, losses = training.run_steps(
        step,
        coefficients,
        optimizer.init(coefficients),
        (key, base, task_vectors, partition, data),
        steps=steps,
        jit=jit,
        chunk=chunk,
        progress=progress,
        desc="learned merge",
    )
    params = _coefficients.combine(base, task_vectors, coef, partition=partition, clamp=clamp)
    return LearnedMergeOutput(coefficients=coef, params=params, losses=losses)


def adamerging(
    base: Params,
    finetuned: Sequence[Params],
    unlabeled: Sequence[Any],
    logits_fn: LogitsFn,
    *,
    granularity: Granularity = "layer",
    init: ArrayLike = 0.3,
    clamp: Clamp = (0.0, 1.0),
    steps: int = 500,
    learning_rate: float = 1e-3,
    batch_size: int = 16,
    optimizer: optax.GradientTransformation | None = None,
    task_vector_fn: Any = None,
    partition: Params | None = None,
    key: PRNGKey | None = None,
    progress: Any = None,
    jit: bool = True,
) -> LearnedMergeOutput:
    r"""AdaMerging: merging coefficients learned by entropy minimisation on unlabeled test data.

    Learns :math:`\lambda` in :math:`\theta = \theta_0 + \sum_t \lambda_t\odot\tau_t` by
    minimising :func:`fusionjax.learned.adamerging_loss`, the summed prediction entropy of
    each task's unlabeled batch under the merged model with that task's head. Defaults are
    the paper code's: coefficients start at 0.3 and are clipped to :math:`[0, 1]`, Adam
    with learning rate 1e-3, 500 steps of 16 unlabeled examples per task.

    Args:
      base: Base parameters :math:`\theta_0`.
      finetuned: Fine-tuned models, one per task, with the structure of ``base``.
      unlabeled: One pool of unlabeled inputs per task, ``[n_t, ...]`` (task ``t`` is
        position ``t``, the ``task_index`` given to ``logits_fn``).
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]``.
      granularity: ``"task"`` (task-wise AdaMerging), ``"layer"`` (layer-wise: one
        coefficient per task per parameter tensor) or ``"block"`` (with ``partition``).
      init: Initial coefficient value.
      clamp: Clip of the coefficients in the forward pass, or ``None``.
      steps: Optimizer steps.
      learning_rate: Adam's learning rate (ignored if ``optimizer`` is given).
      batch_size: Unlabeled examples per task per step.
      optimizer: Any optax optimizer, instead of Adam.
      task_vector_fn: A task-vector step applied to the task vectors first
        (:func:`adamerging_plus_plus` passes TIES' trim and sign election).
      partition: Block ids for ``granularity="block"``.
      key: PRNG key of the batch sampling (required).
      progress: Progress reporting, see :func:`fit_coefficients`.
      jit: Compile the loop.

    Returns:
      A :class:`LearnedMergeOutput` with the coefficients, the merged params and the entropy curve.

    Examples:
      On the digits testbed (``tb = fusionjax.testbed.load()``)::

        res = fj.learned.adamerging(tb.pretrained, tb.finetuned,
            [t.x_test for t in tb.tasks], tb.logits)
        tb.evaluate(res.params).mean()

    References:
      Yang et al, `AdaMerging: Adaptive Model Merging for Multi-Task Learning
      <https://arxiv.org/abs/2310.02575>`_, ICLR 2024
    """
    key = keys_lib.require_key(key, "adamerging")
    tvs = _coefficients.stacked_task_vectors(base, finetuned, task_vector_fn)
    coef = _coefficients.init_coefficients(
        tvs, granularity=granularity, init=init, partition=partition
    )
    opt = adam(float(learning_rate)) if optimizer is None else optimizer
    return fit_coefficients(
        _objectives.adamerging_loss,
        base,
        tvs,
        list(unlabeled),
        logits_fn,
        coef,
        optimizer=opt,
        steps=steps,
        batch_size=batch_size,
        key=key,
        partition=partition,
        clamp=clamp,
        progress=progress,
        jit=jit,
    )


def adamerging_plus_plus(
    base: Params,
    finetuned: Sequence[Params],
    unlabeled: Sequence[Any],
    logits_fn: LogitsFn,
    *,
    density: ArrayLike = 0.2,
    **kwargs,
) -> LearnedMergeOutput:
    r"""AdaMerging++: AdaMerging on TIES-processed task vectors.

    Each task vector is trimmed to its top ``density`` magnitudes and its entries that
    disagree with the elected sign are zeroed (TIES' trim and elect steps, per tensor),
    then the coefficients are learned as in :func:`adamerging`.

    Args:
      base: Base parameters.
      finetuned: Fine-tuned models.
      unlabeled: One pool of unlabeled inputs per task.
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]``.
      density: Fraction of entries TIES keeps (20%).
      **kwargs: Everything else :func:`adamerging` takes.

    Returns:
      A :class:`LearnedMergeOutput`.

    References:
      Yang et al, `AdaMerging <https://arxiv.org/abs/2310.02575>`_, ICLR 2024;
      Yadav et al, `TIES-Merging <https://arxiv.org/abs/2306.01708>`_, NeurIPS 2023
    """
    if "task_vector_fn" in kwargs:
        raise TypeError("adamerging_plus_plus sets task_vector_fn itself (TIES trim and elect).")
    fn = chain(_ties.trim(density=density), _ties.elect_sign())
    return adamerging(base, finetuned, unlabeled, logits_fn, task_vector_fn=fn, **kwargs)


def atlas(
    base: Params,
    finetuned: Sequence[Params],
    labeled: Sequence[tuple[Any, Any]],
    logits_fn: LogitsFn,
    *,
    num_blocks: int = 1,
    init: ArrayLike = 0.3,
    clamp: Clamp = None,
    steps: int = 200,
    learning_rate: float = 1e-2,
    batch_size: int = 16,
    optimizer: optax.GradientTransformation | None = None,
    key: PRNGKey | None = None,
    progress: Any = None,
    jit: bool = True,
) -> LearnedMergeOutput:
    r"""aTLAS: anisotropic (per-block) coefficients learned on a few labeled examples.

    :math:`\theta = \theta_0 + \sum_t \Lambda_t \odot \tau_t` where :math:`\Lambda_t`
    holds one coefficient per parameter block (tensor) of task vector :math:`t`, or
    ``num_blocks`` per tensor on a random partition of its entries (aTLAS's way to add
    capacity), trained by cross-entropy (:func:`fusionjax.learned.atlas_loss`).

    Args:
      base: Base parameters.
      finetuned: Fine-tuned models.
      labeled: One ``(x, y)`` pool of labeled examples per task (a few shots).
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]``.
      num_blocks: Coefficients per tensor; 1 is one per parameter block.
      init: Initial coefficient value.
      clamp: Optional clip of the coefficients.
      steps: Optimizer steps.
      learning_rate: Adam's learning rate (ignored if ``optimizer`` is given).
      batch_size: Labeled examples per task per step.
      optimizer: Any optax optimizer, instead of Adam.
      key: PRNG key of the partition and the batch sampling (required).
      progress: Progress reporting.
      jit: Compile the loop.

    Returns:
      A :class:`LearnedMergeOutput`.

    References:
      Zhang et al, `Knowledge Composition using Task Vectors with Learned Anisotropic
      Scaling <https://arxiv.org/abs/2407.02880>`_, NeurIPS 2024
    """
    key = keys_lib.require_key(key, "atlas")
    key_blocks, key_batches = jax.random.split(key)
    tvs = _coefficients.stacked_task_vectors(base, finetuned)
    if num_blocks == 1:
        partition, granularity = None, "layer"
    else:
        partition, granularity = _coefficients.random_blocks(base, num_blocks, key_blocks), "block"
    coef = _coefficients.init_coefficients(
        tvs, granularity=granularity, init=init, partition=partition
    )
    opt = adam(float(learning_rate)) if optimizer is None else optimizer
    return fit_coefficients(
        _objectives.atlas_loss,
        base,
        tvs,
        [tuple(d) for d in labeled],
        logits_fn,
        coef,
        optimizer=opt,
        steps=steps,
        batch_size=batch_size,
        key=key_batches,
        partition=partition,
        clamp=clamp,
        progress=progress,
        jit=jit,
    )
