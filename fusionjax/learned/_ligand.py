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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusionjax._src import validation
from fusionjax._src.base import Params, PRNGKey, Stacked
from fusionjax.learned import _coefficients, _objectives, _train

Portland = Any
"""Portland parameters: ``{"dense_0": {"kernel": [K*d, h], "bias": [h]}, ...}``."""
FeaturesFn = Callable[[Params, Any], jax.Array]
HeadFn = Callable[[int, jax.Array], jax.Array]
Alignment = Literal["sum", "norm"]
Level = Literal["features", "logits"]
_HIGHEST = jax.lax.Precision.HIGHEST


class NeuralLigand(NamedTuple):
    r"""The result of :func:`neural_ligand`.

    Attributes:
      portland: The trained Portland parameters (see :func:`init_portland`).
      weights_fn: ``weights_fn(x) -> [n, K]``, the per-sample weights (CoopVecs) of
        inputs ``x``; it runs the :math:`K` models' ``features_fn`` on ``x``.
      coefficients: ``[K]`` weights averaged over the training data (per task, then
        over tasks): the coefficients of the static merge ``params``.
      task_coefficients: ``[T, K]``, the mean weights over each task's training data.
      params: The static merge :math:`\theta_0 + \sum_k \bar w_k \tau_k` with
        :math:`\bar w` = ``coefficients``.
      losses: The loss at every step (before that step's update), ``[steps]``.
    """

    portland: Portland
    weights_fn: Callable[[Any], jax.Array]
    coefficients: jax.Array
    task_coefficients: jax.Array
    params: Params
    losses: np.ndarray


def init_portland(
    key: PRNGKey, num_models: int, feature_dim: int, *, hidden_sizes: Sequence[int] = ()
) -> Portland:
    r"""Initial Portland parameters: an MLP from the :math:`K` models' features to :math:`K` logits.

    The paper's Portland is one linear layer on the concatenated features,
    ``[K * d] -> [K]``, followed by a softmax (``hidden_sizes=()``). Hidden layers (ReLU)
    make it a small MLP. Every layer is initialised like PyTorch's ``nn.Linear`` (as in
    the official code): kernel and bias uniform in :math:`\pm 1/\sqrt{\text{fan-in}}`.

    Args:
      key: PRNG key.
      num_models: :math:`K`, the number of collaborating models.
      feature_dim: :math:`d`, the width of each model's features.
      hidden_sizes: Widths of hidden layers; empty for the paper's linear Portland.

    Returns:
      ``{"dense_0": {"kernel": [K*d, h_0], "bias": [h_0]}, ..., "dense_L": {..., [K]}}``,
      float32.

    Examples:
      >>> import jax
      >>> import fusionjax as fj
      >>> p = fj.learned.init_portland(jax.random.key(0), 3, 4)
      >>> p["dense_0"]["kernel"].shape, p["dense_0"]["bias"].shape
      ((12, 3), (3,))
    """
    for name, value in (("num_models", num_models), ("feature_dim", feature_dim)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    sizes = [int(num_models) * int(feature_dim)]
    for i, h in enumerate(hidden_sizes):
        if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1:
            raise ValueError(f"hidden_sizes[{i}] must be a positive integer, got {h!r}.")
        sizes.append(int(h))
    sizes.append(int(num_models))
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        k_w, k_b = jax.random.split(jax.random.fold_in(key, i))
        bound = 1.0 / np.sqrt(fan_in)
        params[f"dense_{i}"] = {
            "kernel": jax.random.uniform(k_w, (fan_in, fan_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k_b, (fan_out,), jnp.float32, -bound, bound),
        }
    return params


def _layers(portland: Portland) -> list[tuple[str, jax.Array, jax.Array]]:
    if not isinstance(portland, Mapping) or not portland:
        raise TypeError(
            "portland must be a dict of layers {'dense_0': {'kernel', 'bias'}, ...} as "
            f"init_portland returns, got {type(portland).__name__}."
        )
    out = []
    for i in range(len(portland)):
        name = f"dense_{i}"
        layer = portland.get(name)
        if not isinstance(layer, Mapping) or "kernel" not in layer or "bias" not in layer:
            raise ValueError(
                f"portland[{name!r}] must be a dict with 'kernel' and 'bias' (layers are named "
                f"dense_0 ... dense_{len(portland) - 1}); got keys {sorted(portland)}."
            )
        kernel, bias = jnp.asarray(layer["kernel"]), jnp.asarray(layer["bias"])
        if kernel.ndim != 2 or bias.shape != kernel.shape[1:]:
            raise ValueError(
                f"portland[{name!r}] has kernel {kernel.shape} and bias {bias.shape}; expected "
                "kernel [in, out] and bias [out]."
            )
        if out and out[-1][1].shape[1] != kernel.shape[0]:
            raise ValueError(
                f"portland[{name!r}]['kernel'] has {kernel.shape[0]} inputs but the previous "
                f"layer has {out[-1][1].shape[1]} outputs."
            )
        out.append((name, kernel, bias))
    return out


def _check_features(features: jax.Array, name: str = "features") -> None:
    if jnp.ndim(features) < 2:
        raise ValueError(
            f"{name} must be stacked [K, ..., d] (one row of features per model), got shape "
            f"{jnp.shape(features)}."
        )
    if not jnp.issubdtype(jnp.result_type(features), jnp.floating):
        raise TypeError(f"{name} must be floating point, got {jnp.result_type(features)}.")


def portland_weights(portland: Portland, features: jax.Array) -> jax.Array:
    r"""The per-sample weights (CoopVecs) :math:`w(x)` the Portland gives.

    :math:`w(x) = \mathrm{softmax}\big(\mathrm{MLP}([f_1(x); \dots; f_K(x)])\big)`.

    Args:
      portland: Portland parameters from :func:`init_portland`.
      features: The :math:`K` models' features of the same inputs, stacked
        ``[K, ..., d]`` (see :func:`expert_features`); they are concatenated in model
        order, ``[..., K * d]``.

    Returns:
      ``[..., K]`` float32 weights, non-negative and summing to one over the last axis.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fusionjax as fj
      >>> p = fj.learned.init_portland(jax.random.key(0), 3, 4)
      >>> w = fj.learned.portland_weights(p, jnp.ones((3, 5, 4)))  # 5 inputs
      >>> w.shape, bool(jnp.allclose(w.sum(-1), 1.0))
      ((5, 3), True)
    """
    _check_features(features)
    layers = _layers(portland)
    k, d = jnp.shape(features)[0], jnp.shape(features)[-1]
    batch = jnp.shape(features)[1:-1]
    if layers[0][1].shape[0] != k * d:
        raise ValueError(
            f"portland['dense_0']['kernel'] expects {layers[0][1].shape[0]} inputs, but "
            f"features give K * d = {k} * {d} = {k * d}."
        )
    if layers[-1][1].shape[1] != k:
        raise ValueError(
            f"portland['dense_{len(layers) - 1}'] gives {layers[-1][1].shape[1]} weights, but "
            f"features stack K = {k} models."
        )
    h = jnp.moveaxis(jnp.asarray(features, jnp.float32), 0, -2).reshape(-1, k * d)
    for i, (_, kernel, bias) in enumerate(layers):
        h = jnp.matmul(h, kernel.astype(jnp.float32), precision=_HIGHEST)
        h = h + bias.astype(jnp.float32)[None, :]
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    return jax.nn.softmax(h, axis=-1).reshape(*batch, k)


def expert_features(finetuned: Sequence[Params], x: Any, features_fn: FeaturesFn) -> jax.Array:
    """The features of every model on the same inputs, stacked ``[K, n, d]``.

    Args:
      finetuned: The :math:`K` collaborating models.
      x: Inputs, ``[n, ...]`` (anything ``features_fn`` takes).
      features_fn: ``features_fn(params, x) -> [n, d]``.

    Returns:
      ``[K, n, d]`` features (the models stay frozen: compute these once and reuse them).
    """
    validation.check_nonempty(finetuned)
    feats = [jnp.asarray(features_fn(p, x)) for p in finetuned]
    for i, f in enumerate(feats):
        if f.ndim != 2 or f.shape != feats[0].shape:
            raise ValueError(
                f"features_fn(finetuned[{i}], x) must return [n, d] features like "
                f"finetuned[0]'s {feats[0].shape}, got shape {f.shape}."
            )
    return jnp.stack(feats)


def ensemble_logits(
    weights: jax.Array,
    features: jax.Array,
    head_fn: HeadFn,
    task_index: int,
    *,
    level: Level = "features",
) -> jax.Array:
    r"""The weighted ensemble of :math:`K` models, through task ``task_index``'s head.

    Args:
      weights: ``[n, K]`` per-sample weights (from :func:`portland_weights`).
      features: ``[K, n, d]`` the models' features of the same inputs.
      head_fn: ``head_fn(task_index, features) -> [n, C]``, the task's (fixed) head.
      task_index: Which task's head; a Python int.
      level: ``"features"`` (the paper): :math:`h_t(\sum_k w_k f_k)`; ``"logits"``:
        :math:`\sum_k w_k h_t(f_k)`. They agree when the head is affine.

    Returns:
      ``[n, C]`` logits.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> head = lambda t, f: f @ jnp.eye(2)
      >>> feats = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])  # K = 2 models, n = 1
      >>> fj.learned.ensemble_logits(jnp.array([[0.25, 0.75]]), feats, head, 0)
      Array([[0.25, 0.75]], dtype=float32)
    """
    _check_features(features)
    k = jnp.shape(features)[0]
    if jnp.shape(weights) != jnp.shape(features)[1:-1] + (k,):
        raise ValueError(
            f"weights must have shape {jnp.shape(features)[1:-1] + (k,)} for features of shape "
            f"{jnp.shape(features)} ([K, ..., d]), got {jnp.shape(weights)}."
        )
    w = jnp.asarray(weights, jnp.float32)
    if level == "features":
        mixed = jnp.einsum("...k,k...d->...d", w, features.astype(jnp.float32), precision=_HIGHEST)
        return head_fn(task_index, mixed)
    if level == "logits":
        logits = jnp.stack([head_fn(task_index, features[i]) for i in range(k)])
        return jnp.einsum("...k,k...c->...c", w, logits.astype(jnp.float32), precision=_HIGHEST)
    raise ValueError(f"level must be 'features' or 'logits', got {level!r}.")


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


def merged_features(
    base: Params,
    task_vectors: Stacked,
    weights: jax.Array,
    x: jax.Array,
    *,
    features_fn: FeaturesFn,
    batch_size: int = 32,
) -> jax.Array:
    r"""Features of the per-sample merge :math:`\theta(x_i) = \theta_0 + \sum_k w_{ik}\tau_k`.

    Each input gets its own merged model (the paper's parameter-level collaboration);
    with weights on the simplex this is :math:`\sum_k w_{ik}\theta_k`. Samples are
    processed ``batch_size`` at a time (``batch_size`` merged copies of the model in
    memory at once). The result does not depend on the task, so one compiled program
    serves every task's head (see :func:`merged_logits`).

    Args:
      base: Base parameters :math:`\theta_0`.
      task_vectors: Stacked task vectors ``[K, ...]``.
      weights: ``[n, K]`` per-sample weights; one shared ``[K]`` vector is also accepted.
      x: ``[n, ...]`` inputs.
      features_fn: ``features_fn(params, x) -> [n, d]`` (jit-compatible).
      batch_size: Samples merged and evaluated together.

    Returns:
      ``[n, d]`` features, row :math:`i` computed with :math:`\theta(x_i)`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> base, tvs = {"w": jnp.zeros(2)}, {"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}
      >>> features_fn = lambda p, x: x * p["w"][None]
      >>> weights = jnp.array([[1.0, 0.0], [0.5, 0.5]])  # one merge per input
      >>> fj.learned.merged_features(base, tvs, weights, jnp.ones((2, 2)), features_fn=features_fn)
      Array([[1. , 0. ],
             [0.5, 0.5]], dtype=float32)
    """
    validation.check_hparam("batch_size", batch_size, lower=1)
    k = _coefficients.num_tasks(task_vectors)
    n = jnp.shape(x)[0] if jnp.ndim(x) else None
    w = jnp.asarray(weights, jnp.float32)
    if w.shape == (k,) and n is not None:
        w = jnp.broadcast_to(w, (n, k))
    if n is None or w.shape != (n, k):
        raise ValueError(
            f"weights must be [n, K] = ({n}, {k}) for {n} inputs and {k} task vectors (or "
            f"[K]), got shape {jnp.shape(weights)}."
        )
    return _merged_features_jit(base, task_vectors, w, x, features_fn, int(batch_size))


@functools.partial(jax.jit, static_argnums=(4, 5))
def _merged_features_jit(base, task_vectors, w, x, features_fn, batch_size):
    def one(args):
        wi, xi = args
        params = _coefficients.combine(base, task_vectors, wi)
        return features_fn(params, xi[None])[0]

    return jax.lax.map(one, (w, x), batch_size=min(batch_size, int(w.shape[0])))


def merged_logits(
    base: Params,
    task_vectors: Stacked,
    weights: jax.Array,
    x: jax.Array,
    *,
    features_fn: FeaturesFn,
    head_fn: HeadFn,
    task_index: int,
    batch_size: int = 32,
) -> jax.Array:
    r"""Logits of the per-sample merge: :math:`h_t(f(\theta(x_i), x_i))`, one merge per input.

    :math:`\theta(x_i) = \theta_0 + \sum_k w_{ik}\tau_k`; see :func:`merged_features`.

    Args:
      base: Base parameters :math:`\theta_0`.
      task_vectors: Stacked task vectors ``[K, ...]``.
      weights: ``[n, K]`` per-sample weights; one shared ``[K]`` vector is also accepted.
      x: ``[n, ...]`` inputs.
      features_fn: ``features_fn(params, x) -> [n, d]`` (jit-compatible).
      head_fn: ``head_fn(task_index, features) -> [n, C]``.
      task_index: Which task's head; a Python int.
      batch_size: Samples merged and evaluated together.

    Returns:
      ``[n, C]`` logits; see :func:`merged_features`.
    """
    feats = merged_features(
        base, task_vectors, weights, x, features_fn=features_fn, batch_size=batch_size
    )
    return head_fn(task_index, feats)


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
    features_fn = jax.jit(features_fn)  # the models' forward passes, compiled once
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


def _make_step(head_fn, optimizer, batch_size, scaling, level, sizes, supervised):
    sizes_arr = np.asarray(sizes, np.int32)
    starts = np.concatenate([[0], np.cumsum(sizes_arr)[:-1]]).astype(np.int32)
    tasks = list(range(len(sizes)))

    def step(s, portland, opt_state, key, offsets, pools):
        # One batch per task, uniformly with replacement, all drawn and gathered at once.
        shape = (len(sizes), batch_size)
        idx = jax.random.randint(jax.random.fold_in(key, s), shape, 0, sizes_arr[:, None])
        idx = (idx + starts[:, None]).reshape(-1)
        feats = jnp.swapaxes(jnp.take(pools.rows, idx, axis=0), 0, 1)
        y = jnp.take(pools.labels, idx, axis=0).reshape(shape)
        labels = [y[t] if sup else None for t, sup in enumerate(supervised)]

        def loss_fn(p):
            return _loss_core(
                p,
                feats,
                labels,
                tasks,
                [batch_size] * len(sizes),
                head_fn,
                offsets,
                scaling,
                level,
            )

        loss, grads = jax.value_and_grad(loss_fn)(portland)
        portland, opt_state = _train.apply_optimizer(optimizer, grads, opt_state, portland)
        return portland, opt_state, loss

    return step


def _weights_of_inputs(portland, finetuned, features_fn, x):
    return portland_weights(portland, expert_features(finetuned, x, features_fn))


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
) -> NeuralLigand:
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
      key: PRNG key of the initialisation and of the batches (default ``key(0)``).
      progress: ``None``, a callable (called with a message per chunk), or a tqdm-like
        bar or class.
      jit: Compile the loop (``False`` runs the same steps eagerly).
      chunk: Steps per compiled call (progress is reported between calls).

    Returns:
      A :class:`NeuralLigand`: the Portland, the per-sample weights function, the mean
      weights and the static merge they give, and the loss curve. Evaluate the
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
        w = res.weights_fn(tb.tasks[0].x_test)  # [n, K] CoopVecs

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
    key = jax.random.key(0) if key is None else key
    key_init, key_batches = jax.random.split(key)
    finetuned = list(finetuned) if isinstance(finetuned, tuple) else finetuned
    tvs = _coefficients.stacked_task_vectors(base, finetuned)
    offsets = None if alignment is None else offset_matrix(tvs, alignment=alignment)
    pools, sizes, supervised = _task_pools(data, finetuned, features_fn)
    k, d = len(finetuned), int(pools.rows.shape[-1])
    portland = init_portland(key_init, k, d, hidden_sizes=hidden_sizes)
    opt = optax.adam(learning_rate) if optimizer is None else optimizer
    opt_state = _train.init_optimizer(opt, portland)
    step = _make_step(head_fn, opt, int(batch_size), float(scaling), level, sizes, supervised)
    portland, _, losses = _train.run_steps(
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
    return NeuralLigand(
        portland=portland,
        weights_fn=functools.partial(_weights_of_inputs, portland, finetuned, jax.jit(features_fn)),
        coefficients=coefficients,
        task_coefficients=per_task,
        params=_coefficients.combine(base, tvs, coefficients),
        losses=losses,
    )
