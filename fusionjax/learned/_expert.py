r"""Expert Merging: layer-wise coefficients learned by aligning the merge with each expert.

Expert Merging (Zhang et al., 2025) learns the coefficients of the merge

.. math::
  \theta^\ell = \theta_0^\ell + \sum_{k=1}^{K} \alpha_k^\ell\,\tau_k^\ell,
  \qquad \alpha_k^\ell = \sigma(w_k^\ell)\in(0, 1),

(one coefficient per task per parameter tensor :math:`\ell`, a sigmoid of a trained
logit :math:`w`, as the authors' code does) from *unlabeled* inputs of every task: on
task :math:`k`'s inputs the merged model is pulled towards expert :math:`k`'s own
hidden states and predictions,

.. math::
  \mathcal{L}(\alpha) = \sum_{k} \beta_k \Big(
     w_h\,\frac{1}{|S|}\sum_{h\in S} \mathrm{MSE}\big(h(x;\theta), h(x;\theta_k)\big)
   + w_z\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(z_k(x;\theta_k)/T)\,\big\|\,
        \mathrm{softmax}(z_k(x;\theta)/T)\big)\Big)
   + \gamma\,\frac{1}{KN}\sum_{k,\ell}\big|\alpha_k^\ell - \bar\alpha_k\big|,
  \qquad x\sim\mathcal{D}_k,

with the hidden states :math:`S` a model chooses (``hidden_fn``), task weights
:math:`\beta_k` for the trade-off between experts, and the paper's regulariser keeping
the :math:`N` coefficients per task near their task-arithmetic start
:math:`\bar\alpha_k` (``init``), which is also where the loop starts.

**Expert Merging++** then spends a budget of coefficients where they matter. From the
first run's coefficients it scores each tensor by

.. math::
  I_\ell = \frac{\sum_k |\alpha_k^\ell|\, s_k^\ell\, n_\ell}
                {\sum_j \sum_k |\alpha_k^j|\, s_k^j\, n_j},
  \qquad s_k^\ell = \mathrm{mean}\,|\tau_k^\ell|,\ n_\ell = \text{entries of } \ell,

(:func:`layer_importance`), gives tensor :math:`\ell`
:math:`m_\ell = \lfloor B L\, I_\ell^\kappa / \sum_j I_j^\kappa\rfloor` chunks
(:func:`importance_chunks`: :math:`L` tensors, ``budget`` :math:`B` coefficients per
tensor on average, ``steepness`` :math:`\kappa`), cuts the flattened tensor into
:math:`m_\ell` contiguous chunks with one coefficient each, keeps the tensors with
:math:`m_\ell = 0` fixed at :math:`\bar\alpha`, and trains again with the same objective.

Differences from the authors' code, all deliberate: the logit term is the KL divergence
of the paper (the code's soft-target cross-entropy differs from it by the experts'
entropy, a constant, so the gradients agree) and it is zero when the merge reproduces the
experts; the regulariser is the paper's mean over tasks and tensors (the code sums over
tasks, :math:`K` times larger); the loop is plain Adam on batches drawn with replacement
(the code: AdamW with cosine restarts over one pass of a few examples). The defaults
(:math:`T = 1`, :math:`w_h = w_z = 1`, :math:`\gamma = 0.1`) are the code's; steps and
learning rate are this library's (100 Adam steps at 0.1 on the logits).

The pieces compose with a user's optax loop: :func:`expert_targets` computes the
experts' outputs once (the teachers never run inside the loop), :func:`expert_merging_loss`
is the objective, a pure function of the trainable logits; :func:`expert_coefficients`
maps them to the coefficients :func:`fusionjax.learned.combine` merges with.
:func:`expert_merging` and :func:`expert_merging_plus_plus` run the step and compiled
loop of :func:`fusionjax.learned.fit_coefficients`.

What costs time, and what is done about it: every step runs the merged model forward and
backward on one batch per task; the experts' hidden states and logits are computed once,
before the loop, for the whole pool (one compiled program for all experts), and are
sampled with the inputs. The loop is the library's compiled one: the objective is a
:class:`jax.tree_util.Partial` of a module-level function, so its arrays (the anchor,
the task weights) are arguments and one compilation serves every call with the same
shapes and settings. That compilation is most of a first call's cost: the step unrolls
one forward and backward per task (on the digits testbed, 8 tasks: about 6 s of CPU to
compile, as AdaMerging's loop, then about 20 ms per step). The final merge is one
compiled program too. Expert Merging++ trains twice; its chunked coefficients use
:func:`fusionjax.learned.combine`'s block path (a gather of the per-entry coefficient),
only on the tensors that got two chunks or more.

References:
  Zhang et al, `Expert Merging: Model Merging with Unsupervised Expert Alignment and
  Importance-Guided Layer Chunking <https://arxiv.org/abs/2509.25712>`_, 2025
  (code: https://github.com/Littleor/ExpertMerging)
"""

from __future__ import annotations

import functools
import math
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
from fusionjax._src import pytrees
from fusionjax._src import training
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax._src.base import PRNGKey
from fusionjax._src.base import Stacked
from fusionjax.learned import _coefficients
from fusionjax.learned import _loop
from fusionjax.learned import _objectives
from fusionjax.learned._coefficients import Coefficients
from fusionjax.learned._objectives import Batches
from fusionjax.learned._objectives import LogitsFn

HiddenFn = Callable[[Params, Any], Any]
keystr = jax.tree_util.keystr


def _is_none(x) -> bool:
    return x is None


class ExpertMergingOutput(NamedTuple):
    r"""The result of :func:`expert_merging` (a pytree of arrays).

    Attributes:
      coefficients: The coefficients :math:`\alpha\in(0,1)` the merge uses, a pytree like
        the parameters with ``[T]`` leaves (``[T, m]`` on chunked tensors; tensors frozen
        by Expert Merging++ hold :math:`\bar\alpha`): ``combine(base, tvs, coefficients,
        partition=partition)`` is ``params``.
      params: The merged model.
      losses: The objective at every step, ``[steps]``.
      partition: The chunk ids of chunked tensors (``None`` elsewhere, and ``None`` for
        layer-wise Expert Merging).
      importance: Expert Merging++: the importance :math:`I_\ell` of every tensor from
        the first run; ``None`` otherwise.
    """

    coefficients: Coefficients
    params: Params
    losses: np.ndarray
    partition: Params | None = None
    importance: Params | None = None


class Chunks(NamedTuple):
    r"""How Expert Merging++ cuts each tensor (from :func:`importance_chunks`).

    Attributes:
      num_chunks: A pytree like the parameters of Python ints: the coefficients per task
        of each tensor, i.e. its number of chunks (0: frozen at :math:`\bar\alpha`; 1: one,
        as layer-wise), ``None`` on leaves that are not merged.
      partition: ``int32`` chunk ids for the tensors with two chunks or more (contiguous
        runs of the flattened tensor), ``None`` elsewhere; the ``partition`` of
        :func:`fusionjax.learned.combine`.
    """

    num_chunks: Params
    partition: Params


def _aligned(tree: Any, task_vectors: Stacked, name: str) -> tuple[list, Any, list]:
    """``(paths_and_leaves, treedef, tree's leaves)`` aligned with the task vectors' leaves.

    ``None`` leaves of the task vectors (nothing merged there) count as leaves, so
    ``tree`` must have the task vectors' structure, ``None`` or any value where they
    have ``None``.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(task_vectors, is_leaf=_is_none)
    try:
        return leaves, treedef, treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} must have the structure of the task vectors: {e}") from None


def _logit(p: ArrayLike) -> np.ndarray:
    r""":math:`\log p - \log(1 - p)` in NumPy (no XLA compilation for these few numbers)."""
    p = np.asarray(p, np.float64)
    return (np.log(p) - np.log1p(-p)).astype(np.float32)


def _anchor(init: ArrayLike, t: int) -> np.ndarray:
    """``init`` as a ``[T]`` float32 vector strictly inside (0, 1)."""
    start = np.asarray(init, np.float32)
    if start.ndim not in (0, 1) or (start.ndim == 1 and start.shape[0] != t):
        raise ValueError(f"init must be a scalar or have shape ({t},), got shape {start.shape}.")
    validation.check_hparam("init", start, lower=0.0, upper=1.0, lower_open=True,
                            upper_open=True)
    return np.broadcast_to(start, (t,)).copy()


def expert_coefficients(
    coefficients: Coefficients, task_vectors: Stacked, *, anchor: ArrayLike = 0.3
) -> Coefficients:
    r"""The merging coefficients :math:`\alpha = \sigma(w)` of trained logits :math:`w`.

    Args:
      coefficients: Trainable logits: an array ``[T]`` (task-wise) or a pytree like the
        parameters with ``[T]`` / ``[T, m]`` leaves; ``None`` on a merged tensor freezes
        it at ``anchor``.
      task_vectors: Stacked task vectors ``[T, ...]`` (``None`` on leaves not merged).
      anchor: :math:`\bar\alpha`, a scalar or ``[T]``: the coefficients of frozen tensors.

    Returns:
      Coefficients for :func:`fusionjax.learned.combine`: :math:`\sigma(w)` on trained
      leaves, ``anchor`` on frozen ones, ``None`` where nothing is merged.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> tvs = {"w": jnp.ones((2, 3)), "b": jnp.ones((2,))}
      >>> a = fj.learned.expert_coefficients({"w": jnp.zeros(2), "b": None}, tvs)
      >>> a["w"].tolist(), [round(float(v), 2) for v in a["b"]]
      ([0.5, 0.5], [0.3, 0.3])
    """
    t = _coefficients.num_tasks(task_vectors)
    anchor = jnp.broadcast_to(jnp.asarray(anchor, jnp.float32), (t,))
    if isinstance(coefficients, (jax.Array, np.ndarray)):
        return jax.nn.sigmoid(jnp.asarray(coefficients, jnp.float32))
    leaves, treedef, coef_leaves = _aligned(coefficients, task_vectors, "coefficients")
    out = []
    for (_, x), w in zip(leaves, coef_leaves, strict=True):
        if x is None:
            out.append(None)
        elif w is None:
            out.append(anchor)
        else:
            out.append(jax.nn.sigmoid(jnp.asarray(w, jnp.float32)))
    return treedef.unflatten(out)


def _regulariser(coefficients: Coefficients, anchor: jax.Array) -> jax.Array:
    r""":math:`\frac{1}{KN}\sum|\sigma(w) - \bar\alpha|` over the trained logits only."""
    total = jnp.zeros((), jnp.float32)
    count = 0
    for w in jax.tree.leaves(coefficients):
        a = jax.nn.sigmoid(jnp.asarray(w, jnp.float32))
        ref = anchor.reshape(anchor.shape + (1,) * (a.ndim - 1))
        total = total + jnp.sum(jnp.abs(a - ref))
        count += a.size
    return total / max(count, 1)


def _kl(target_logits: jax.Array, logits: jax.Array, temperature: float) -> jax.Array:
    r""":math:`T^2\,\mathrm{KL}(\mathrm{softmax}(z_e/T)\|\mathrm{softmax}(z/T))`, batch mean."""
    log_p = jax.nn.log_softmax(target_logits / temperature, axis=-1)
    log_q = jax.nn.log_softmax(logits / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return temperature**2 * jnp.mean(kl)


def _hidden_mse(hidden: Any, target: Any) -> jax.Array:
    """Mean over the hidden-state leaves of each leaf's mean squared error."""
    pairs = list(zip(jax.tree.leaves(hidden), jax.tree.leaves(target), strict=True))
    total = jnp.zeros((), jnp.float32)
    for h, g in pairs:
        diff = h.astype(jnp.float32) - jax.lax.stop_gradient(g).astype(jnp.float32)
        total = total + jnp.mean(diff * diff)
    return total / max(len(pairs), 1)


def _check_weights(hidden_weight, logit_weight, temperature, reg_weight) -> None:
    validation.check_hparam("hidden_weight", hidden_weight, lower=0.0)
    validation.check_hparam("logit_weight", logit_weight, lower=0.0)
    validation.check_hparam("temperature", temperature, lower=0.0, lower_open=True)
    validation.check_hparam("reg_weight", reg_weight, lower=0.0)


def expert_merging_loss(
    coefficients: Coefficients,
    batches: Batches,
    *,
    base: Params,
    task_vectors: Stacked,
    logits_fn: LogitsFn,
    hidden_fn: HiddenFn | None = None,
    anchor: ArrayLike = 0.3,
    task_weights: ArrayLike | None = None,
    hidden_weight: float = 1.0,
    logit_weight: float = 1.0,
    temperature: float = 1.0,
    reg_weight: float = 0.1,
    partition: Params | None = None,
    clamp: Any = None,
) -> jax.Array:
    r"""Expert Merging's objective: align the merge with each expert on that expert's inputs.

    .. math::
      \mathcal{L} = \sum_k \beta_k\big(w_h\,\overline{\mathrm{MSE}}(h, h^{(k)})
        + w_z\,T^2\,\mathrm{KL}(p^{(k)}_T\,\|\,p_T)\big)
        + \gamma\,\tfrac{1}{KN}\textstyle\sum|\sigma(w) - \bar\alpha|

    (see the module docstring). Zero when the merged model reproduces every expert on its
    batch and the coefficients sit at the anchor. The experts' outputs are constants
    (``stop_gradient``): gradients reach the coefficient logits only.

    Args:
      coefficients: Trainable logits :math:`w` (``α = sigmoid(w)``): ``[T]``, or a pytree
        like the parameters with ``[T]`` / ``[T, m]`` leaves (``None`` freezes a tensor
        at ``anchor``), e.g. from :func:`fusionjax.learned.init_coefficients` with
        ``init=logit(0.3)``.
      batches: One batch per task (list, or dict ``{task: batch}``), each a tuple
        ``(x, expert_hidden, expert_logits)`` of task :math:`k`'s inputs and expert
        :math:`k`'s outputs on them (see :func:`expert_targets`); ``expert_hidden`` is
        ``None`` without ``hidden_fn``.
      base: Base parameters :math:`\theta_0`.
      task_vectors: Stacked task vectors ``[T, ...]`` (held fixed).
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]``.
      hidden_fn: ``hidden_fn(params, x)`` -> the hidden states to align (an array or a
        pytree of arrays, e.g. a few layers' outputs), or ``None`` for logits only.
      anchor: :math:`\bar\alpha`, scalar or ``[T]``: the regulariser's centre (and the
        coefficients of frozen tensors).
      task_weights: :math:`\beta`, ``[T]`` non-negative (default: all ones).
      hidden_weight: :math:`w_h`, the weight of the hidden-state alignment.
      logit_weight: :math:`w_z`, the weight of the logit alignment.
      temperature: :math:`T` of the logit alignment.
      reg_weight: :math:`\gamma`, the weight of the regulariser.
      partition: Chunk ids of chunked tensors (:class:`Chunks`).
      clamp: ``(low, high)`` clip of :math:`\alpha` after the sigmoid, or ``None``.

    Returns:
      The scalar objective.

    Raises:
      ValueError: on a negative weight, a non-positive temperature, or a batch that is
        not ``(x, expert_hidden, expert_logits)``.

    References:
      Zhang et al, `Expert Merging <https://arxiv.org/abs/2509.25712>`_, 2025
    """
    _check_weights(hidden_weight, logit_weight, temperature, reg_weight)
    t = _coefficients.num_tasks(task_vectors)
    anchor = jnp.broadcast_to(jnp.asarray(anchor, jnp.float32), (t,))
    beta = jnp.ones((t,), jnp.float32) if task_weights is None else jnp.asarray(
        task_weights, jnp.float32
    )
    if beta.shape != (t,):
        raise ValueError(f"task_weights must have shape ({t},), got {beta.shape}.")
    alphas = expert_coefficients(coefficients, task_vectors, anchor=anchor)
    params = _coefficients.combine(base, task_vectors, alphas, partition=partition, clamp=clamp)
    total = jnp.zeros((), jnp.float32)
    for k, batch in _objectives.task_batches(batches):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
            raise ValueError(
                f"expert_merging_loss needs (x, expert_hidden, expert_logits) batches; task "
                f"{k} has {type(batch).__name__} (see fusionjax.learned.expert_targets)."
            )
        x, target_hidden, target_logits = batch
        term = jnp.zeros((), jnp.float32)
        if logit_weight:
            logits = logits_fn(params, k, x).astype(jnp.float32)
            target = jax.lax.stop_gradient(jnp.asarray(target_logits, jnp.float32))
            term = term + logit_weight * _kl(target, logits, temperature)
        if hidden_fn is not None and hidden_weight:
            if target_hidden is None:
                raise ValueError(f"hidden_fn is given but task {k}'s batch has no expert_hidden.")
            term = term + hidden_weight * _hidden_mse(hidden_fn(params, x), target_hidden)
        total = total + beta[k] * term
    if reg_weight and not isinstance(coefficients, (jax.Array, np.ndarray)):
        total = total + reg_weight * _regulariser(coefficients, anchor)
    elif reg_weight:
        total = total + reg_weight * jnp.mean(jnp.abs(jax.nn.sigmoid(coefficients) - anchor))
    return total


def _outputs(logits_fn, hidden_fn, finetuned, inputs):
    """Expert ``k``'s hidden states and logits on ``inputs[k]``, for every ``k``."""
    out = []
    for k, (params, x) in enumerate(zip(finetuned, inputs, strict=True)):
        hidden = None if hidden_fn is None else hidden_fn(params, x)
        out.append((hidden, logits_fn(params, k, x)))
    return out


@functools.partial(jax.jit, static_argnums=0)
def _outputs_shared(static, dynamic, finetuned, inputs):
    logits_fn, hidden_fn = pytrees.jit_combine(dynamic, static)
    return _outputs(logits_fn, hidden_fn, finetuned, inputs)


def _targets(logits_fn, hidden_fn, finetuned, inputs):
    """All experts' outputs in one compiled program (shared by calls with equal Partials)."""
    dynamic, static = pytrees.jit_partition((logits_fn, hidden_fn))
    try:
        hash(static)
    except TypeError:
        fn = functools.partial(_outputs, logits_fn, hidden_fn)
        return jax.jit(fn)(finetuned, inputs)
    return _outputs_shared(static, dynamic, finetuned, inputs)


def expert_targets(
    finetuned: Sequence[Params],
    inputs: Sequence[Any],
    logits_fn: LogitsFn,
    hidden_fn: HiddenFn | None = None,
) -> list[tuple[Any, Any, jax.Array]]:
    r"""Each expert's hidden states and logits on its own task's inputs, computed once.

    Args:
      finetuned: The experts :math:`\theta_k`, one per task.
      inputs: One pool of unlabeled inputs per task, ``[n_k, ...]``.
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]``.
      hidden_fn: ``hidden_fn(params, x)`` -> hidden states, or ``None``.

    Returns:
      One ``(x, hidden, logits)`` per task (``hidden`` is ``None`` without ``hidden_fn``):
      the data pools of :func:`fusionjax.learned.fit_coefficients` (batches are sampled
      from all three together) and the batches of :func:`expert_merging_loss`.

    Raises:
      ValueError: if ``finetuned`` is empty or its length differs from ``inputs``'.
    """
    validation.check_nonempty(finetuned)
    if not isinstance(inputs, (list, tuple)) or len(inputs) != len(finetuned):
        raise ValueError(
            f"inputs must be a list with one pool per expert ({len(finetuned)}), got "
            f"{len(inputs) if isinstance(inputs, (list, tuple)) else type(inputs).__name__}."
        )
    xs = []
    for k, x in enumerate(inputs):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"inputs[{k}] has no examples (shape {x.shape}).")
        xs.append(x)
    outputs = _targets(logits_fn, hidden_fn, list(finetuned), xs)
    return [(x, h, z) for x, (h, z) in zip(xs, outputs, strict=True)]


def layer_importance(coefficients: Coefficients, task_vectors: Stacked) -> Params:
    r"""Expert Merging++'s importance of every tensor, normalised to sum to one.

    .. math::
      I_\ell \propto \sum_k |\alpha_k^\ell|\; \mathrm{mean}|\tau_k^\ell|\; n_\ell
             = \sum_k |\alpha_k^\ell|\, \|\tau_k^\ell\|_1

    (block-wise coefficients ``[T, m]`` enter by their mean over the blocks).

    Args:
      coefficients: The coefficients :math:`\alpha` of a first run (not the logits), a
        pytree like the parameters with ``[T]`` or ``[T, m]`` leaves, e.g.
        ``expert_merging(...).coefficients``.
      task_vectors: Stacked task vectors ``[T, ...]``.

    Returns:
      A pytree like the parameters of float32 scalars in ``[0, 1]`` summing to one
      (``None`` where nothing is merged).

    Raises:
      ValueError: if a merged tensor has no coefficients, or all importances are zero.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> tvs = {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 1))}
      >>> imp = fj.learned.layer_importance({"a": jnp.full(2, 0.5), "b": jnp.full(2, 0.5)}, tvs)
      >>> round(float(imp["a"]), 2), round(float(imp["b"]), 2)
      (0.75, 0.25)
    """
    t = _coefficients.num_tasks(task_vectors)
    leaves, treedef, coef_leaves = _aligned(coefficients, task_vectors, "coefficients")
    raw = []
    for (path, x), a in zip(leaves, coef_leaves, strict=True):
        if x is None:
            raw.append(None)
            continue
        if a is None:
            raise ValueError(f"coefficients have no value for the merged leaf at {keystr(path)}.")
        a = jnp.asarray(a, jnp.float32)
        if a.ndim == 0 or a.shape[0] != t:
            raise ValueError(
                f"coefficients at {keystr(path)} must have shape ({t},) or ({t}, m), "
                f"got {a.shape}."
            )
        per_task = jnp.abs(a).reshape(t, -1).mean(axis=1)
        l1 = jnp.sum(jnp.abs(x.astype(jnp.float32)).reshape(t, -1), axis=1)
        raw.append(jnp.sum(per_task * l1))
    total = sum(r for r in raw if r is not None)
    if validation.is_concrete(total) and not float(total) > 0:
        raise ValueError("layer_importance: every tensor has zero importance (all τ or α zero).")
    return treedef.unflatten([None if r is None else r / total for r in raw])


def importance_chunks(
    importance: Params,
    task_vectors: Stacked,
    *,
    budget: float = 1.0,
    steepness: float = 1.0,
) -> Chunks:
    r"""Expert Merging++'s chunking: more coefficients for the more important tensors.

    Tensor :math:`\ell` gets :math:`m_\ell = \lfloor B L\, I_\ell^\kappa/\sum_j
    I_j^\kappa\rfloor` chunks (at most its number of entries), :math:`L` the number of
    merged tensors: ``budget`` :math:`B` is the average number of coefficients per tensor
    and task, so :math:`B \approx 1` keeps the layer-wise count. A tensor with
    :math:`m_\ell \ge 2` is flattened and cut into contiguous chunks of
    :math:`\lceil n_\ell/m_\ell\rceil` entries (the last may be shorter, and there may be
    fewer chunks than :math:`m_\ell`, as ``torch.chunk`` cuts); with :math:`m_\ell = 0` it
    keeps a fixed coefficient.

    Args:
      importance: :func:`layer_importance`'s scores (non-negative scalars per tensor).
      task_vectors: Stacked task vectors ``[T, ...]`` (the shapes to cut).
      budget: :math:`B > 0`.
      steepness: :math:`\kappa \ge 0`; 0 spreads the budget evenly, larger values
        concentrate it on the most important tensors.

    Returns:
      :class:`Chunks`.

    Raises:
      ValueError: if ``budget`` or ``steepness`` is out of range, or a score is negative or
        missing for a merged tensor.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> tvs = {"a": jnp.ones((1, 8)), "b": jnp.ones((1, 8))}
      >>> ch = fj.learned.importance_chunks({"a": 0.8, "b": 0.2}, tvs, budget=2.0)
      >>> ch.num_chunks, ch.partition["a"].tolist()
      ({'a': 3, 'b': 0}, [0, 0, 0, 1, 1, 1, 2, 2])
    """
    validation.check_hparam("budget", budget, lower=0.0, lower_open=True)
    validation.check_hparam("steepness", steepness, lower=0.0)
    leaves, treedef, scores = _aligned(importance, task_vectors, "importance")
    merged = []
    for (path, x), s in zip(leaves, scores, strict=True):
        if x is None:
            continue
        if s is None:
            raise ValueError(f"importance has no value for the merged leaf at {keystr(path)}.")
        s = float(np.asarray(s))
        if not s >= 0:
            raise ValueError(f"importance at {keystr(path)} must be >= 0, got {s}.")
        merged.append(s)
    if not merged:
        raise ValueError("task_vectors has no merged leaves to chunk.")
    powered = np.asarray(merged, np.float64) ** float(steepness)
    if steepness == 0:
        powered = np.ones_like(powered)
    if not powered.sum() > 0:
        raise ValueError("importance is zero on every merged tensor.")
    share = float(budget) * len(merged) * powered / powered.sum()
    counts, partition, i = [], [], 0
    for _, x in leaves:
        if x is None:
            counts.append(None)
            partition.append(None)
            continue
        size = int(np.prod(x.shape[1:]))
        # A hair of slack so that shares that are whole numbers in exact arithmetic
        # (e.g. 3.0 computed as 2.9999999999999996) are not floored one short.
        m = min(int(math.floor(share[i] + 1e-9)), max(size, 1))
        i += 1
        if m >= 2:
            width = -(-size // m)
            m = -(-size // width)  # the chunks there are (torch.chunk may make fewer)
        counts.append(m)
        if m >= 2:
            ids = (np.arange(size) // width).astype(np.int32).reshape(x.shape[1:])
            partition.append(jnp.asarray(ids))
        else:
            partition.append(None)
    return Chunks(treedef.unflatten(counts), treedef.unflatten(partition))


def chunk_logits(task_vectors: Stacked, chunks: Chunks, *, init: ArrayLike = 0.3) -> Coefficients:
    r"""Initial trainable logits for chunked coefficients: :math:`w = \mathrm{logit}(\bar\alpha)`.

    Args:
      task_vectors: Stacked task vectors ``[T, ...]``.
      chunks: From :func:`importance_chunks`.
      init: :math:`\bar\alpha`, a scalar or ``[T]`` in (0, 1).

    Returns:
      A pytree like the parameters: ``None`` on frozen tensors (:math:`m_\ell = 0`) and
      leaves not merged, ``[T]`` on one-chunk tensors, ``[T, m]`` on chunked ones.
    """
    t = _coefficients.num_tasks(task_vectors)
    w0 = _logit(_anchor(init, t))
    leaves, treedef, counts = _aligned(chunks.num_chunks, task_vectors, "chunks.num_chunks")
    ids = _aligned(chunks.partition, task_vectors, "chunks.partition")[2]
    out = []
    for (_, x), m, p in zip(leaves, counts, ids, strict=True):
        if x is None or not m:
            out.append(None)
        elif p is None:
            out.append(jnp.asarray(w0))
        else:
            b = int(np.max(np.asarray(p))) + 1
            out.append(jnp.asarray(np.broadcast_to(w0[:, None], (t, b))))
    return treedef.unflatten(out)


def _loop_objective(
    hidden_fn, task_weights, anchor, hidden_weight, logit_weight, temperature, reg_weight,
    coefficients, batches, *, base, task_vectors, logits_fn, partition, clamp,
):
    """:func:`expert_merging_loss` with the keyword interface of ``fit_coefficients``."""
    return expert_merging_loss(
        coefficients,
        batches,
        base=base,
        task_vectors=task_vectors,
        logits_fn=logits_fn,
        hidden_fn=hidden_fn,
        anchor=anchor,
        task_weights=task_weights,
        hidden_weight=hidden_weight,
        logit_weight=logit_weight,
        temperature=temperature,
        reg_weight=reg_weight,
        partition=partition,
        clamp=clamp,
    )


def _fit(
    base, tvs, data, logits_fn, hidden_fn, logits0, anchor, partition, *, task_weights,
    hidden_weight, logit_weight, temperature, reg_weight, steps, learning_rate, batch_size,
    optimizer, key, progress, jit,
):
    objective = Partial(
        _loop_objective, hidden_fn, task_weights, anchor, float(hidden_weight), float(logit_weight),
        float(temperature), float(reg_weight),
    )
    opt = _loop.adam(float(learning_rate)) if optimizer is None else optimizer
    opt = training.standard_promotion(opt)
    # fit_coefficients' step and compiled loop; the merge at the end is ours (the loop's
    # own would read the logits as coefficients).
    step = Partial(_loop._step, objective, logits_fn, opt, int(batch_size), None)
    logits, _, losses = training.run_steps(
        step, logits0, opt.init(logits0), (key, base, tvs, partition, data), steps=steps,
        jit=jit, progress=progress, desc="expert merging",
    )
    alphas, params = _merge(base, tvs, logits, anchor, partition)
    return alphas, params, losses


@jax.jit
def _merge(base, tvs, logits, anchor, partition):
    """The coefficients of trained logits and their merge, compiled as one program."""
    alphas = expert_coefficients(logits, tvs, anchor=anchor)
    return alphas, _coefficients.combine(base, tvs, alphas, partition=partition)


def _prepare(base, finetuned, unlabeled, logits_fn, hidden_fn, init, key, who, *, task_weights,
             steps,
             batch_size, learning_rate, hidden_weight, logit_weight, temperature, reg_weight):
    """Checks everything cheap, then builds the task vectors and the experts' targets."""
    key = keys_lib.require_key(key, who)
    validation.check_nonempty(finetuned)
    validation.check_hparam("steps", steps, lower=0)
    validation.check_hparam("batch_size", batch_size, lower=1)
    validation.check_hparam("learning_rate", learning_rate, lower=0.0, lower_open=True)
    _check_weights(hidden_weight, logit_weight, temperature, reg_weight)
    if not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}.")
    if hidden_fn is not None and not callable(hidden_fn):
        raise TypeError(f"hidden_fn must be callable or None, got {type(hidden_fn).__name__}.")
    if not isinstance(unlabeled, (list, tuple)) or len(unlabeled) != len(finetuned):
        raise ValueError(
            f"unlabeled must be a list with one pool of inputs per model ({len(finetuned)})."
        )
    anchor = _anchor(init, len(finetuned))
    t = len(finetuned)
    beta = np.ones((t,), np.float32) if task_weights is None else np.asarray(
        task_weights, np.float32
    )
    if beta.shape != (t,):
        raise ValueError(f"task_weights must have shape ({t},), got {beta.shape}.")
    validation.check_hparam("task_weights", beta, lower=0.0)
    tvs = _coefficients.stacked_task_vectors(base, finetuned)
    data = expert_targets(finetuned, list(unlabeled), logits_fn, hidden_fn)
    return key, anchor, beta, tvs, data


def expert_merging(
    base: Params,
    finetuned: Sequence[Params],
    unlabeled: Sequence[Any],
    logits_fn: LogitsFn,
    *,
    hidden_fn: HiddenFn | None = None,
    init: ArrayLike = 0.3,
    task_weights: ArrayLike | None = None,
    hidden_weight: float = 1.0,
    logit_weight: float = 1.0,
    temperature: float = 1.0,
    reg_weight: float = 0.1,
    chunks: Chunks | None = None,
    steps: int = 100,
    learning_rate: float = 0.1,
    batch_size: int = 16,
    optimizer: optax.GradientTransformation | None = None,
    key: PRNGKey | None = None,
    progress: Any = None,
    jit: bool = True,
) -> ExpertMergingOutput:
    r"""Expert Merging: layer-wise coefficients that align the merge with every expert.

    Trains :math:`\alpha = \sigma(w)` (one per task per tensor, or per chunk with
    ``chunks``) by minimising :func:`expert_merging_loss` on unlabeled inputs, starting
    at :math:`\alpha = \bar\alpha` (``init``, task arithmetic's coefficient). Expert
    :math:`k`'s hidden states and logits on task :math:`k`'s pool are computed once; each
    step samples ``batch_size`` inputs per task with their targets.

    Args:
      base: Base parameters :math:`\theta_0`.
      finetuned: The experts, one per task, with the structure of ``base``.
      unlabeled: One pool of unlabeled inputs per task, ``[n_k, ...]`` (calibration data:
        the paper uses 5 to 10 per task).
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]``.
      hidden_fn: ``hidden_fn(params, x)`` -> hidden states to align (array or pytree), or
        ``None`` to align the logits only.
      init: :math:`\bar\alpha` in (0, 1), scalar or ``[T]``: the start and the
        regulariser's centre.
      task_weights: :math:`\beta_k`, ``[T]`` (default ones).
      hidden_weight: :math:`w_h`.
      logit_weight: :math:`w_z`.
      temperature: :math:`T` of the logit alignment (1 in the authors' runs).
      reg_weight: :math:`\gamma` (0.1, the default of the authors' code).
      chunks: :class:`Chunks` for chunk-wise coefficients (Expert Merging++'s second run),
        or ``None`` for layer-wise.
      steps: Optimizer steps.
      learning_rate: Adam's learning rate on the logits (ignored with ``optimizer``).
      batch_size: Inputs per task per step.
      optimizer: Any optax optimizer, instead of Adam.
      key: PRNG key of the batch sampling (required).
      progress: Progress reporting, see :func:`fusionjax.learned.fit_coefficients`.
      jit: Compile the loop.

    Returns:
      An :class:`ExpertMergingOutput`.

    Raises:
      ValueError: on an empty ``finetuned``, a pool per task missing, ``init`` outside
        (0, 1), or a hyperparameter out of range (before any training).

    Examples:
      On the digits testbed (``tb = fusionjax.testbed.load()``)::

        res = fj.learned.expert_merging(tb.pretrained, list(tb.finetuned),
            [t.x_train[200:] for t in tb.tasks], tb.logits, hidden_fn=tb.features,
            key=jax.random.key(0))
        tb.evaluate(res.params).mean()

    References:
      Zhang et al, `Expert Merging: Model Merging with Unsupervised Expert Alignment and
      Importance-Guided Layer Chunking <https://arxiv.org/abs/2509.25712>`_, 2025
    """
    key, anchor, beta, tvs, data = _prepare(
        base, finetuned, unlabeled, logits_fn, hidden_fn, init, key, "expert_merging",
        task_weights=task_weights, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
        hidden_weight=hidden_weight, logit_weight=logit_weight, temperature=temperature,
        reg_weight=reg_weight,
    )
    if chunks is None:
        logits0 = _coefficients.init_coefficients(tvs, granularity="layer", init=_logit(anchor))
        partition = None
    else:
        logits0 = chunk_logits(tvs, chunks, init=anchor)
        partition = chunks.partition
    alphas, params, losses = _fit(
        base, tvs, data, logits_fn, hidden_fn, logits0, anchor, partition,
        task_weights=beta, hidden_weight=hidden_weight, logit_weight=logit_weight,
        temperature=temperature, reg_weight=reg_weight, steps=steps,
        learning_rate=learning_rate, batch_size=batch_size, optimizer=optimizer, key=key,
        progress=progress, jit=jit,
    )
    return ExpertMergingOutput(alphas, params, losses, partition, None)


def expert_merging_plus_plus(
    base: Params,
    finetuned: Sequence[Params],
    unlabeled: Sequence[Any],
    logits_fn: LogitsFn,
    *,
    budget: float = 1.0,
    steepness: float = 1.0,
    key: PRNGKey | None = None,
    **kwargs,
) -> ExpertMergingOutput:
    r"""Expert Merging++: a layer-wise run, then chunk-wise coefficients where they matter.

    Runs :func:`expert_merging`, scores every tensor with :func:`layer_importance`, cuts
    the tensors with :func:`importance_chunks` (``budget``, ``steepness``) and runs
    :func:`expert_merging` again from :math:`\bar\alpha` with the chunked coefficients
    (tensors with no chunk stay at :math:`\bar\alpha`), as the authors' second stage.

    Args:
      base: Base parameters.
      finetuned: The experts.
      unlabeled: One pool of unlabeled inputs per task.
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]``.
      budget: :math:`B`, coefficients per tensor and task on average.
      steepness: :math:`\kappa` of the allocation.
      key: PRNG key (required); split between the two runs.
      **kwargs: Everything else :func:`expert_merging` takes (both runs use them).

    Returns:
      The second run's :class:`ExpertMergingOutput`, with ``importance`` and the
      ``partition`` of its chunks.

    Raises:
      TypeError: if ``chunks`` is given (this function computes it).
    """
    if "chunks" in kwargs:
        raise TypeError("expert_merging_plus_plus computes chunks itself; do not pass chunks.")
    validation.check_hparam("budget", budget, lower=0.0, lower_open=True)
    validation.check_hparam("steepness", steepness, lower=0.0)
    key = keys_lib.require_key(key, "expert_merging_plus_plus")
    k1, k2 = jax.random.split(key)
    first = expert_merging(base, finetuned, unlabeled, logits_fn, key=k1, **kwargs)
    tvs = _coefficients.stacked_task_vectors(base, finetuned)
    importance = layer_importance(first.coefficients, tvs)
    chunks = importance_chunks(importance, tvs, budget=budget, steepness=steepness)
    second = expert_merging(base, finetuned, unlabeled, logits_fn, key=k2, chunks=chunks, **kwargs)
    return second._replace(importance=importance)
