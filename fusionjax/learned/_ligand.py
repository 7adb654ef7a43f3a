r"""Neural Ligand (NeuLig): a learned per-sample weighting of K models, and the merge it induces.

Li, Yu and Wang ask when merging parameters performs as well as ensembling predictions.
A light network, the *Portland*, reads the features :math:`f_k(x) = f(\theta_k, x)` of
the :math:`K` collaborating models on an input and gives a *CoopVec*, weights on the
simplex:

.. math::

  w(x) = \mathrm{softmax}\big(W\,[f_1(x); \dots; f_K(x)] + b\big) \in \Delta^{K-1}.

The same weights define both collaborations:

* **ensembling** (prediction level) mixes the models' features and applies the task's
  head, :math:`\hat y_{\mathrm{ens}}(x) = h_t\big(\sum_k w_k(x)\, f_k(x)\big)`;
* **merging** (parameter level) mixes the parameters,
  :math:`\theta(x) = \sum_k w_k(x)\,\theta_k = \theta_0 + \sum_k w_k(x)\,\tau_k`, and
  :math:`\hat y_{\mathrm{merge}}(x) = h_t(f(\theta(x), x))`.

With offsets :math:`\xi_k = \theta_k - \bar\theta` from the simple average
:math:`\bar\theta`, a second-order Taylor expansion of :math:`f` around :math:`\bar\theta`
gives

.. math::

  f(\theta(x), x) - \sum_k w_k f(\theta_k, x)
  = \tfrac12\Big[\big(\textstyle\sum_k w_k\xi_k\big)^{\!\top} H \big(\sum_k w_k\xi_k\big)
    - \sum_k w_k\, \xi_k^{\top} H \xi_k\Big] + O(\|\xi\|^3),

second order in the offsets: the first-order terms agree whatever the weights. The
Portland is trained (the models stay frozen) with a *boosting* term that makes the
ensemble good and an *alignment* term on the weighted offset :math:`\sum_k w_k \xi_k`:

.. math::

  \mathcal L = \frac1T \sum_t \mathbb E_{(x, y) \in B_t}\Big[
    \mathrm{CE}\big(h_t(\textstyle\sum_k w_k(x) f_k(x)),\, y\big)
    + \tfrac{1}{s}\, w(x)^{\top} A\, w(x)\Big],

with cross-entropy on labelled training data (the paper's "sup") or the prediction
entropy on unlabelled data ("semi"), :math:`s` the ``scaling`` (100 in the code) and
:math:`A` from :func:`offset_matrix`: the official code uses :math:`A = \sigma\sigma^\top`
with :math:`\sigma` the per-model sums of the entries of :math:`\xi_k`, standardised
over the models (``alignment="sum"``); ``alignment="norm"`` uses the Gram matrix of the
offsets instead, so that :math:`w^\top A w = \|\sum_k w_k\xi_k\|^2 / \mathrm{mean}_k
\|\xi_k\|^2` is the weighted offset's squared norm itself.

**The merge is per sample.** The paper's merge ("data-level" consistency) is
:math:`\theta(x)`, recomputed for every input; its evaluation code builds one merged model
per test batch from the weights of the batch's first sample (each batch holds one task).
Computing :math:`w(x)` needs all :math:`K` models' features of :math:`x`, so it costs
more than the ensemble it matches: NeuLig is a way to *validate* the consistency, not a
cheaper model. Near one-hot weights make the consistency easy (merging a one-hot
combination gives back that model). :func:`merged_logits` evaluates :math:`\theta(x)`
sample by sample; :func:`neural_ligand` also returns one static merge,
:math:`\theta_0 + \sum_k \bar w_k \tau_k` with :math:`\bar w` the weights averaged over
the training data (an addition of this library, not in the paper).

On the digits testbed (:mod:`fusionjax.testbed`, eight tasks, seeds 0/1/2, 1000 steps,
trained on the training splits) the per-sample merge reaches 89.4/91.5/82.3% mean test
accuracy against its ensemble's 89.8/92.3/89.1% (task arithmetic: 75.3/77.4/69.5%): close
where the weights are near one-hot, 7 points short on seed 2, where the Portland cannot
tell apart the four tasks that share their input images and spreads its weights. The
static merge (74.8/71.1/58.9%) is no better than task arithmetic.

Pieces for a hand-written optax loop: :func:`init_portland`, :func:`portland_weights`,
:func:`expert_features`, :func:`ensemble_logits`, :func:`offset_matrix`,
:func:`neural_ligand_loss`; the ready loop is :func:`neural_ligand`; the per-sample merge
is evaluated by :func:`merged_features` and :func:`merged_logits`.

.. code-block:: python

  feats = [fj.learned.expert_features(finetuned, x, features_fn) for x, _ in data]
  offsets = fj.learned.offset_matrix(fj.learned.stacked_task_vectors(base, finetuned))
  portland = fj.learned.init_portland(key, len(finetuned), feats[0].shape[-1])
  batches = [(f, y) for f, (_, y) in zip(feats, data)]
  grads = jax.grad(fj.learned.neural_ligand_loss)(
      portland, batches, head_fn=head_fn, offsets=offsets)

References:
  Li, Yu and Wang, `Multi-Level Collaboration in Model Merging
  <https://arxiv.org/abs/2503.01268>`_, 2025; code: https://github.com/LiQiiiii/Neural-Ligand
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from fusionjax._src import keys as keys_lib
from fusionjax._src import training
from fusionjax._src import validation
from fusionjax._src.base import Params
from fusionjax._src.base import PRNGKey
from fusionjax._src.base import Stacked
from fusionjax.learned import _coefficients
from fusionjax.learned import _loop
from fusionjax.learned import _objectives
from fusionjax.learned._ensemble import FeaturesFn
from fusionjax.learned._ensemble import HeadFn
from fusionjax.learned._ensemble import Level
from fusionjax.learned._ensemble import ensemble_logits
from fusionjax.learned._ensemble import expert_features
from fusionjax.learned._ensemble import features_of
from fusionjax.learned._portland import Portland
from fusionjax.learned._portland import _check_features
from fusionjax.learned._portland import init_portland
from fusionjax.learned._portland import portland_weights

Alignment = Literal["sum", "norm"]
_HIGHEST = jax.lax.Precision.HIGHEST


class NeuralLigandOutput(NamedTuple):
    r"""The result of :func:`neural_ligand`: a pytree of arrays (``jax.jit`` can return it).

    Attributes:
      portland: The trained Portland parameters (see :func:`init_portland`).
      coefficients: ``[K]`` weights averaged over the training data (per task, then
        over tasks): the coefficients of the static merge ``params``.
      task_coefficients: ``[T, K]``, the mean weights over each task's training data.
      params: The static merge :math:`\theta_0 + \sum_k \bar w_k \tau_k` with
        :math:`\bar w` = ``coefficients``.
      losses: The loss at every step (before that step's update), ``[steps]``.
    """

    portland: Portland
    coefficients: jax.Array
    task_coefficients: jax.Array
    params: Params
    losses: np.ndarray

    def weights(self, finetuned: Sequence[Params], x: Any, features_fn: FeaturesFn) -> jax.Array:
        """The per-sample weights (CoopVecs) ``[n, K]`` of inputs ``x``.

        ``portland_weights(self.portland, expert_features(finetuned, x, features_fn))``:
        runs the :math:`K` models' ``features_fn`` (compiled) on ``x``.

        Args:
          finetuned: The :math:`K` models the Portland was trained with.
          x: Inputs, ``[n, ...]``.
          features_fn: ``features_fn(params, x) -> [n, d]``, as given to the loop.

        Returns:
          ``[n, K]`` float32 weights on the simplex.
        """
        feats = jnp.stack([features_of(features_fn, p, x) for p in finetuned])
        return portland_weights(self.portland, feats)


def offset_matrix(task_vectors: Stacked, *, alignment: Alignment = "sum") -> jax.Array:
    r"""The ``[K, K]`` matrix :math:`A` of the alignment term :math:`w^\top A\, w`.

    With offsets :math:`\xi_k = \theta_k - \bar\theta = \tau_k - \bar\tau` from the simple
    average (the base cancels, so task vectors suffice):

    * ``"sum"`` (the official code): :math:`A = \sigma\sigma^\top`, where :math:`u_k` is
      the sum of all entries of :math:`\xi_k` and :math:`\sigma = (u - \bar u) /
      \mathrm{std}(u)` (standardised over the models, unbiased std). Then
      :math:`w^\top A w = (\sum_k w_k \sigma_k)^2`, a one-dimensional proxy of the
      weighted offset.
    * ``"norm"``: :math:`A_{kl} = \langle\xi_k, \xi_l\rangle / \bar n` with
      :math:`\bar n = \frac1K\sum_k\|\xi_k\|^2`, so :math:`w^\top A w = \|\sum_k w_k
      \xi_k\|^2 / \bar n` exactly: on the simplex it is the squared distance of the merge
      :math:`\sum_k w_k\theta_k` from the simple average (relative to the models' own),
      zero at uniform weights.

    :math:`A = 0` when the offsets are at the level of float32 rounding (identical models).

    Args:
      task_vectors: Stacked task vectors ``[K, ...]`` (see
        :func:`fusionjax.learned.stacked_task_vectors`); ``None`` leaves are skipped.
      alignment: ``"sum"`` or ``"norm"``.

    Returns:
      A ``[K, K]`` float32 positive semi-definite matrix.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> tvs = {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> fj.learned.offset_matrix(tvs, alignment="norm")
      Array([[ 1., -1.],
             [-1.,  1.]], dtype=float32)
    """
    if alignment not in ("sum", "norm"):
        raise ValueError(f"alignment must be 'sum' or 'norm', got {alignment!r}.")
    _coefficients.num_tasks(task_vectors)
    return _offset_matrix_jit(task_vectors, alignment)


@functools.partial(jax.jit, static_argnums=1)
def _offset_matrix_jit(task_vectors: Stacked, alignment: str) -> jax.Array:
    k = jax.tree.leaves(task_vectors)[0].shape[0]
    sums = jnp.zeros((k,), jnp.float32)
    gram = jnp.zeros((k, k), jnp.float32)
    magnitude = jnp.zeros((), jnp.float32)  # sum |tau| ("sum") or sum |tau|^2 ("norm")
    ones = jnp.full((k,), 1.0 / k, jnp.float32)
    for x in jax.tree.leaves(task_vectors):
        flat = jnp.asarray(x, jnp.float32).reshape(k, -1)
        # The mean over models as a [K] x [K, N] product (reductions over the stacking
        # axis are slow on XLA:CPU).
        xi = flat - jnp.tensordot(ones, flat, axes=1, precision=_HIGHEST)[None, :]
        if alignment == "sum":
            sums = sums + jnp.sum(xi, axis=1)
            magnitude = magnitude + jnp.sum(jnp.abs(flat))
        else:
            gram = gram + jnp.matmul(xi, xi.T, precision=_HIGHEST)
            magnitude = magnitude + jnp.sum(flat * flat)
    # Offsets at the level of float32 rounding of the task vectors (identical models)
    # count as zero, rather than being standardised up to unit size.
    if alignment == "norm":
        scale = jnp.trace(gram) / k
        ok = scale > 1e-10 * magnitude / k
        return jnp.where(ok, gram / jnp.where(ok, scale, 1.0), 0.0)
    centred = sums - jnp.mean(sums)
    std = jnp.sqrt(jnp.sum(centred**2) / max(k - 1, 1))
    ok = std > 1e-6 * magnitude / k
    sigma = jnp.where(ok, centred / jnp.where(ok, std, 1.0), 0.0)
    return jnp.outer(sigma, sigma)


def _split_batch(t: int, batch: Any) -> tuple[jax.Array, jax.Array | None]:
    """``(features [K, n, d], labels [n] or None)`` of task ``t``'s batch."""
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(
                f"task {t}'s batch must be features [K, n, d] or a pair (features, labels), "
                f"got a sequence of length {len(batch)}."
            )
        feats, labels = batch
    else:
        feats, labels = batch, None
    _check_features(feats, f"task {t}'s features")
    if jnp.ndim(feats) != 3:
        raise ValueError(f"task {t}'s features must be [K, n, d], got shape {jnp.shape(feats)}.")
    if labels is not None:
        if jnp.shape(labels) != jnp.shape(feats)[1:2]:
            raise ValueError(
                f"task {t}'s labels must have shape ({jnp.shape(feats)[1]},) to match its "
                f"features {jnp.shape(feats)}, got {jnp.shape(labels)}."
            )
        if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
            raise TypeError(f"task {t}'s labels must be integers, got {jnp.result_type(labels)}.")
    return feats, labels


def neural_ligand_loss(
    portland: Portland,
    batches: Sequence[Any] | Mapping[int, Any],
    *,
    head_fn: HeadFn,
    offsets: jax.Array | None,
    scaling: float = 100.0,
    level: Level = "features",
) -> jax.Array:
    r"""The NeuLig objective: boosting (ensemble) term plus the alignment term, averaged over tasks.

    For task :math:`t`'s batch :math:`B_t`,

    .. math::

      \mathcal L_t = \mathbb E_{x \in B_t}\big[\ell_t(x) + w(x)^\top A\, w(x) / s\big],
      \qquad
      \ell_t(x) = \mathrm{CE}\big(h_t(\textstyle\sum_k w_k(x) f_k(x)), y\big)
      \ \text{or}\ H\big(\mathrm{softmax}\, h_t(\textstyle\sum_k w_k(x) f_k(x))\big),

    cross-entropy where the batch has labels ("sup") and the prediction entropy where it
    has none ("semi"); the loss is :math:`\frac1T\sum_t \mathcal L_t`. Only the Portland
    is differentiated: the features are constants.

    Args:
      portland: Portland parameters.
      batches: One batch per task, a list (task ``t`` at position ``t``) or a dict
        ``{task_index: batch}``; a batch is ``(features [K, n, d], labels [n])`` or
        ``features`` alone.
      head_fn: ``head_fn(task_index, features) -> [n, C]``.
      offsets: :math:`A` from :func:`offset_matrix`, ``[K, K]``; ``None`` drops the
        alignment term.
      scaling: :math:`s`, the alignment term is divided by it (the code's ``--scaling``,
        default 100).
      level: Where the ensemble mixes, see :func:`ensemble_logits`.

    Returns:
      The scalar loss.
    """
    validation.check_hparam("scaling", scaling, lower=0.0, lower_open=True)
    items = _objectives.task_batches(batches)
    split = [_split_batch(t, batch) for t, batch in items]
    shapes = {(jnp.shape(f)[0], jnp.shape(f)[2]) for f, _ in split}
    if len(shapes) != 1:
        raise ValueError(
            "every task's features must stack the same K models with the same width d, got "
            f"(K, d) = {sorted(shapes)} across tasks."
        )
    feats = jnp.concatenate([jnp.asarray(f, jnp.float32) for f, _ in split], axis=1)
    labels = [y for _, y in split]
    sizes = [int(jnp.shape(f)[1]) for f, _ in split]
    return _loss_core(
        portland, feats, labels, [t for t, _ in items], sizes, head_fn, offsets, scaling, level
    )


def _loss_core(portland, feats, labels, tasks, sizes, head_fn, offsets, scaling, level):
    """The loss on all tasks' batches concatenated along the sample axis, ``[K, sum n_t, d]``.

    One Portland pass and one mixing for every task (fewer, larger ops than a pass per
    task); the heads, the boosting terms and the means stay per task.
    """
    k = jnp.shape(feats)[0]
    if offsets is not None and jnp.shape(offsets) != (k, k):
        raise ValueError(
            f"offsets must be [K, K] = ({k}, {k}) for features of {k} models, got "
            f"{jnp.shape(offsets)}."
        )
    w = portland_weights(portland, feats)  # [N, K]
    if level == "features":
        mixed = jnp.einsum("nk,knd->nd", w, feats, precision=_HIGHEST)
    elif level != "logits":
        raise ValueError(f"level must be 'features' or 'logits', got {level!r}.")
    if offsets is not None:
        a = jnp.asarray(offsets, jnp.float32)
        align = jnp.einsum("nk,kl,nl->n", w, a, w, precision=_HIGHEST)
        align = align / jnp.asarray(scaling, jnp.float32)
    total = jnp.zeros((), jnp.float32)
    start = 0
    for t, y, n in zip(tasks, labels, sizes, strict=True):
        rows = slice(start, start + n)
        if level == "features":
            logits = head_fn(t, mixed[rows])
        else:
            logits = ensemble_logits(w[rows], feats[:, rows], head_fn, t, level="logits")
        logits = logits.astype(jnp.float32)
        if y is None:
            total = total + jnp.mean(_objectives.entropy(logits))
        else:
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            total = total + jnp.mean(ce)
        if offsets is not None:
            total = total + jnp.mean(align[rows])
        start += n
    return total / len(sizes)


class _Pools(NamedTuple):
    """Every task's training features, concatenated: ``rows [sum n_t, K, d]``, ``labels``."""

    rows: jax.Array
    labels: jax.Array


def _task_pools(data, finetuned, features_fn):
    """Computes every model's features on every task's pool, once (the models are frozen)."""
    if not isinstance(data, (list, tuple)) or not data:
        raise ValueError(
            "data must be a non-empty list with one pool per task: (x, y) for labelled "
            "training (the paper's 'sup') or x alone for entropy minimisation ('semi')."
        )
    features_fn = functools.partial(features_of, features_fn)  # compiled once per shape
    rows, labels, sizes, supervised = [], [], [], []
    for t, d in enumerate(data):
        if isinstance(d, (tuple, list)):
            if len(d) != 2:
                raise ValueError(
                    f"data[{t}] must be x or a pair (x, y), got a sequence of length {len(d)}."
                )
            x, y = d
            y = jnp.asarray(y)
            if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
                raise ValueError(
                    f"data[{t}]'s labels must be a [n] integer array, got {y.dtype}{y.shape}."
                )
        else:
            x, y = d, None
        n = jnp.shape(x)[0] if jnp.ndim(x) else 0
        if n == 0:
            raise ValueError(f"data[{t}] has no examples.")
        if y is not None and y.shape[0] != n:
            raise ValueError(f"data[{t}] has {n} inputs but {y.shape[0]} labels.")
        feats = expert_features(finetuned, x, features_fn)
        if feats.shape[1] != n:
            raise ValueError(
                f"features_fn returned {feats.shape[1]} feature rows for data[{t}]'s {n} inputs."
            )
        if rows and feats.shape[2] != rows[0].shape[2]:
            raise ValueError(
                f"features_fn gives features of width {feats.shape[2]} on data[{t}] but "
                f"{rows[0].shape[2]} on data[0]."
            )
        rows.append(jnp.swapaxes(feats, 0, 1))  # [n, K, d]: a batch is a gather of rows
        labels.append(jnp.zeros((n,), jnp.int32) if y is None else y.astype(jnp.int32))
        sizes.append(int(n))
        supervised.append(y is not None)
    pools = _Pools(rows=jnp.concatenate(rows), labels=jnp.concatenate(labels))
    return pools, sizes, supervised


def _task_features(pools: _Pools, sizes: Sequence[int]) -> list[jax.Array]:
    """Each task's features as ``[K, n_t, d]``."""
    starts = np.cumsum([0, *sizes])
    return [
        jnp.swapaxes(pools.rows[a:b], 0, 1) for a, b in zip(starts[:-1], starts[1:], strict=True)
    ]


def _step(head_fn, optimizer, batch_size, scaling, level, sizes, supervised, *carry_and_args):
    s, portland, opt_state, key, offsets, pools = carry_and_args
    # One batch per task, uniformly with replacement, all drawn and gathered at once.
    sizes_arr = np.asarray(sizes, np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes_arr)[:-1]]).astype(np.int32)
    shape = (len(sizes), batch_size)
    idx = jax.random.randint(jax.random.fold_in(key, s), shape, 0, sizes_arr[:, None])
    idx = (idx + starts[:, None]).reshape(-1)
    feats = jnp.swapaxes(jnp.take(pools.rows, idx, axis=0), 0, 1)
    y = jnp.take(pools.labels, idx, axis=0).reshape(shape)
    labels = [y[t] if sup else None for t, sup in enumerate(supervised)]
    tasks = list(range(len(sizes)))

    def loss_fn(p):
        return _loss_core(
            p, feats, labels, tasks, [batch_size] * len(sizes), head_fn, offsets, scaling, level
        )

    loss, grads = jax.value_and_grad(loss_fn)(portland)
    updates, opt_state = optimizer.update(grads, opt_state, portland)
    return optax.apply_updates(portland, updates), opt_state, loss


def neural_ligand(
    base: Params,
    finetuned: Sequence[Params],
    data: Sequence[Any],
    features_fn: FeaturesFn,
    head_fn: HeadFn,
    *,
    steps: int = 1000,
    learning_rate: float = 1e-3,
    batch_size: int = 128,
    scaling: float = 100.0,
    alignment: Alignment | None = "sum",
    level: Level = "features",
    hidden_sizes: Sequence[int] = (),
    optimizer: optax.GradientTransformation | None = None,
    key: PRNGKey | None = None,
    progress: Any = None,
    jit: bool = True,
    chunk: int = 250,
) -> NeuralLigandOutput:
    r"""Neural Ligand: trains a Portland weighting of the models, and merges with its weights.

    The models are frozen: their features on the training pools are computed once, and
    only the Portland is trained, with Adam (learning rate 1e-3, batches of 128 per task
    as in the official code) on :func:`neural_ligand_loss`. Each step draws one batch per
    task and averages the tasks' losses (the code cycles through the tasks, one batch and
    one update each).

    Args:
      base: Base parameters :math:`\theta_0` (the merge is :math:`\theta_0 + \sum_k
        w_k\tau_k`, i.e. :math:`\sum_k w_k \theta_k`).
      finetuned: The :math:`K` collaborating models, with the structure of ``base``.
      data: One training pool per task (task ``t`` is position ``t``, the index given
        to ``head_fn``): ``(x, y)`` with integer labels for the supervised loss (the
        paper's default), or ``x`` alone for entropy minimisation. Use training data:
        the code trains on the same training split the models were fine-tuned on.
      features_fn: ``features_fn(params, x) -> [n, d]``, a model's features.
      head_fn: ``head_fn(task_index, features) -> [n, C]``, the task's fixed head; a
        model's logits are ``head_fn(t, features_fn(params, x))``.
      steps: Optimizer steps.
      learning_rate: Adam's learning rate (ignored if ``optimizer`` is given).
      batch_size: Examples per task per step.
      scaling: Divisor of the alignment term (100 in the code).
      alignment: ``"sum"`` (the code's proxy), ``"norm"`` (the weighted offset's squared
        norm) or ``None`` (no alignment term); see :func:`offset_matrix`.
      level: ``"features"`` (the paper) or ``"logits"``; see :func:`ensemble_logits`.
      hidden_sizes: Hidden widths of the Portland; ``()`` is the paper's linear layer.
      optimizer: Any optax optimizer, instead of Adam.
      key: PRNG key of the initialisation and of the batches (required).
      progress: ``None``, a callable (called with a message per chunk), or a tqdm-like
        bar or class.
      jit: Compile the loop (``False`` runs the same steps eagerly).
      chunk: Steps per compiled call (progress is reported between calls).

    Returns:
      A :class:`NeuralLigandOutput`: the Portland, the mean weights and the static
      merge they give, and the loss curve; ``.weights(finetuned, x, features_fn)``
      gives the per-sample weights. Evaluate the
      per-sample merge with :func:`merged_logits` and the ensemble with
      :func:`ensemble_logits`.

    Raises:
      ValueError: If a fine-tuned model differs from ``base`` (the message names the
        model and the parameter path), a data pool is empty or its labels are not
        ``[n]`` integers, ``features_fn`` gives inconsistent shapes, or a hyperparameter
        is out of range.

    Examples:
      On the digits testbed (``tb = fusionjax.testbed.load()``)::

        head_fn = lambda t, f: tb.config.logit_scale * (
            f / jnp.linalg.norm(f, axis=-1, keepdims=True)) @ tb.heads[t].T
        res = fj.learned.neural_ligand(tb.pretrained, list(tb.finetuned),
            [(t.x_train, t.y_train) for t in tb.tasks], tb.features, head_fn)
        w = res.weights(tb.finetuned, tb.tasks[0].x_test, tb.features)  # [n, K] CoopVecs

    References:
      Li, Yu and Wang, `Multi-Level Collaboration in Model Merging
      <https://arxiv.org/abs/2503.01268>`_, 2025
    """
    validation.check_hparam("steps", steps, lower=0)
    validation.check_hparam("batch_size", batch_size, lower=1)
    validation.check_hparam("chunk", chunk, lower=1)
    validation.check_hparam("learning_rate", learning_rate, lower=0.0, lower_open=True)
    validation.check_hparam("scaling", scaling, lower=0.0, lower_open=True)
    if alignment not in ("sum", "norm", None):
        raise ValueError(f"alignment must be 'sum', 'norm' or None, got {alignment!r}.")
    if level not in ("features", "logits"):
        raise ValueError(f"level must be 'features' or 'logits', got {level!r}.")
    key = keys_lib.require_key(key, "neural_ligand")
    key_init, key_batches = jax.random.split(key)
    finetuned = list(finetuned) if isinstance(finetuned, tuple) else finetuned
    tvs = _coefficients.stacked_task_vectors(base, finetuned)
    offsets = None if alignment is None else offset_matrix(tvs, alignment=alignment)
    pools, sizes, supervised = _task_pools(data, finetuned, features_fn)
    k, d = len(finetuned), int(pools.rows.shape[-1])
    portland = init_portland(key_init, k, d, hidden_sizes=hidden_sizes)
    opt = _loop.adam(float(learning_rate)) if optimizer is None else optimizer
    opt = training.standard_promotion(opt)
    opt_state = opt.init(portland)
    step = Partial(
        _step,
        head_fn,
        opt,
        int(batch_size),
        float(scaling),
        level,
        tuple(sizes),
        tuple(supervised),
    )
    portland, _, losses = training.run_steps(
        step,
        portland,
        opt_state,
        (key_batches, offsets, pools),
        steps=steps,
        jit=jit,
        chunk=chunk,
        progress=progress,
        desc="neural ligand",
    )
    per_task = jnp.stack(
        [jnp.mean(portland_weights(portland, f), axis=0) for f in _task_features(pools, sizes)]
    )
    coefficients = jnp.mean(per_task, axis=0)
    return NeuralLigandOutput(
        portland=portland,
        coefficients=coefficients,
        task_coefficients=per_task,
        params=_coefficients.combine(base, tvs, coefficients),
        losses=losses,
    )
