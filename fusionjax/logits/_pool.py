r"""Pooling :math:`M` models' predictions: stacked logits ``[M, ..., V]`` in, one prediction out.

Every function takes ``logits`` stacked on a leading model axis (or a list of
``[..., V]`` arrays with the same :math:`V`; see :func:`stack_logits` for differing
sizes), optional ``weights`` — ``[M]`` (one per model) or ``[M, ...]`` (one per
model and example; nothing else is broadcast) — and an optional vocabulary mask
``where`` (``[V]`` or ``[..., V]``, True = allowed), which restricts every model to
the allowed tokens before pooling. The distribution pools return normalised
log-probabilities ``[..., V]``; the votes return labels ``[...]``.

Everything is computed in log space. ``-inf`` logits (masked tokens) never meet a
zero weight in a product (``0 * -inf`` would be NaN): a model with weight 0 takes no
part, and a token that a model with a non-zero weight rules out is ruled out of the
pooled prediction (mixtures excepted: there another model's mass keeps it).

What costs time: one pass over ``[M, ..., V]`` per pool; the votes sort nothing —
:func:`runoff_vote` works on the :math:`M` first choices only (``[..., M, M]``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax.logits import _checks
from fusionjax.logits import _vocab


def _check_nonnegative(weights) -> None:
    """Concrete weights must be non-negative with a positive sum (traced ones are not read)."""
    validation.check_hparam("weights", weights, lower=0.0)
    if weights is not None and validation.is_concrete(weights) and not isinstance(
        weights, (list, tuple)
    ):
        if np.any(np.sum(np.asarray(weights, np.float64), axis=0) <= 0):
            raise ValueError("weights must have a positive sum over the model axis.")


def _prepare(logits, weights, where):
    x = _vocab.as_stacked(logits)
    mask = _checks.vocab_mask(where, x.shape[1:])
    x = _checks.apply_mask(x, mask)
    w = _checks.model_weights(weights, x)
    return x, w


def _jitted(kernel, *, nonnegative: bool):
    """The public entry: host checks of concrete weights, then one compiled kernel."""
    compiled = jax.jit(kernel)

    def run(logits, weights=None, *, where=None):
        if nonnegative:
            _check_nonnegative(weights)
        if isinstance(logits, (list, tuple)):
            logits = _vocab.stack_logits(logits)  # the size check happens here, with a message
        return compiled(logits, weights, where)

    return run


def _rows_sum(terms: jax.Array) -> jax.Array:
    # Adds the M rows (faster than a reduction over a leading axis on XLA:CPU; M is small).
    out = terms[0]
    for i in range(1, terms.shape[0]):
        out = out + terms[i]
    return out


def _weighted_sum(x: jax.Array, w: jax.Array) -> jax.Array:
    r""":math:`\sum_m w_m x_m` with ``-inf`` where a model with :math:`w_m \ne 0` has ``-inf``."""
    active = w != 0
    neg = jnp.isneginf(x)
    safe = jnp.where(neg, 0.0, x).astype(x.dtype)
    total = _rows_sum(jnp.where(active, w * safe, 0.0).astype(x.dtype))
    ruled_out = jnp.any(neg & active, axis=0)
    return jnp.where(ruled_out, -jnp.inf, total)


def mean_logits(
    logits: ArrayLike, weights: ArrayLike | None = None, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""Weighted mean of raw logits, normalised: :math:`\log\mathrm{softmax}(\sum_m \bar w_m z_m)`.

    :math:`\bar w_m = w_m / \sum_k w_k`. Unlike the other pools this depends on each
    model's logit offset only through the normalisation (a per-model constant shift
    changes nothing), and on the models' logit *scales* directly.

    Args:
      logits: ``[M, ..., V]`` logits (or a list of ``[..., V]`` arrays).
      weights: ``None`` (equal), ``[M]`` or ``[M, ...]`` non-negative weights with a
        positive sum; normalised to sum to one over the model axis.
      where: Optional ``[V]`` or ``[..., V]`` boolean mask of allowed tokens.

    Returns:
      ``[..., V]`` log-probabilities (``-inf`` on masked tokens).

    Raises:
      ValueError: If shapes disagree (the message names the argument) or concrete weights
        are negative or sum to zero.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> z = jnp.array([[0.0, 2.0], [2.0, 0.0]])
      >>> fj.logits.mean_logits(z)
      Array([-0.6931472, -0.6931472], dtype=float32)

    References:
      Hinton, `Training products of experts by minimizing contrastive divergence
      <https://doi.org/10.1162/089976602760128018>`_, Neural Computation 2002 (the
      logit average is the product of the models' tempered softmaxes).
    """
    return _mean_logits(logits, weights, where=where)


def _mean_logits_kernel(logits, weights, where):
    x, w = _prepare(logits, weights, where)
    w = w / jnp.sum(w, axis=0, keepdims=True)
    return _checks.log_softmax(_weighted_sum(x, w))


def linear_pool(
    logits: ArrayLike, weights: ArrayLike | None = None, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""The mixture of the models' distributions: :math:`\log \sum_m \bar w_m\, p_m`.

    Computed as :math:`\mathrm{logsumexp}_m(\log \bar w_m + \log\mathrm{softmax}(z_m))`
    with :math:`\bar w_m = w_m/\sum_k w_k`; a model with weight 0 contributes
    :math:`\log 0 = -\infty` and drops out. A token is ``-inf`` only if every model with
    a positive weight rules it out.

    Args:
      logits: ``[M, ..., V]`` logits (or a list of ``[..., V]`` arrays).
      weights: ``None`` (equal), ``[M]`` or ``[M, ...]`` non-negative mixture weights with
        a positive sum (normalised).
      where: Optional ``[V]`` or ``[..., V]`` boolean mask of allowed tokens; each model is
        restricted to them (and renormalised) before mixing.

    Returns:
      ``[..., V]`` log-probabilities.

    Raises:
      ValueError: If shapes disagree or concrete weights are negative or sum to zero.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> z = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
      >>> jnp.exp(fj.logits.linear_pool(z, jnp.array([0.5, 0.5])))
      Array([0.7, 0.3], dtype=float32)

    References:
      Stone, `The opinion pool <https://doi.org/10.1214/aoms/1177704873>`_, Annals of
      Mathematical Statistics 1961.
    """
    return _linear_pool(logits, weights, where=where)


def _linear_pool_kernel(logits, weights, where):
    x, w = _prepare(logits, weights, where)
    w = w / jnp.sum(w, axis=0, keepdims=True)
    logw = jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf).astype(x.dtype)
    return jax.nn.logsumexp(logw + _checks.log_softmax(x), axis=0)


def log_linear_pool(
    logits: ArrayLike, weights: ArrayLike | None = None, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""The product of experts: :math:`\log\mathrm{softmax}\big(\sum_m w_m \log p_m\big)`.

    The weights are *not* normalised: :math:`\sum_m w_m` acts as an inverse
    temperature (a model pooled with itself at weights ``(1, 1)`` is that model at
    temperature 1/2). Negative weights are allowed (a contrast); a token that any model
    with a non-zero weight rules out is ruled out.

    Args:
      logits: ``[M, ..., V]`` logits (or a list of ``[..., V]`` arrays).
      weights: ``None`` (all 1), ``[M]`` or ``[M, ...]`` real exponents :math:`w_m`.
      where: Optional ``[V]`` or ``[..., V]`` boolean mask of allowed tokens.

    Returns:
      ``[..., V]`` log-probabilities.

    Raises:
      ValueError: If shapes disagree.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> z = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
      >>> [round(float(p), 4) for p in jnp.exp(fj.logits.log_linear_pool(z))]
      [0.9, 0.1]

    References:
      Hinton, `Training products of experts by minimizing contrastive divergence
      <https://doi.org/10.1162/089976602760128018>`_, Neural Computation 2002.
    """
    return _log_linear_pool(logits, weights, where=where)


def _log_linear_pool_kernel(logits, weights, where):
    x, w = _prepare(logits, weights, where)
    return _checks.log_softmax(_weighted_sum(_checks.log_softmax(x), w))


def max_logits(logits: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    r"""The elementwise maximum of raw logits, normalised: :math:`\log\mathrm{softmax}(\max_m z_m)`.

    Raw logits are compared, so a model's logit offset matters here (unlike the
    other pools); normalise them first (``log_softmax``) to compare probabilities.

    Args:
      logits: ``[M, ..., V]`` logits (or a list of ``[..., V]`` arrays).
      where: Optional ``[V]`` or ``[..., V]`` boolean mask of allowed tokens.

    Returns:
      ``[..., V]`` log-probabilities; a token is ``-inf`` only if every model rules it out.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> z = jnp.array([[0.0, 1.0], [1.0, 0.0]])
      >>> fj.logits.max_logits(z)
      Array([-0.6931472, -0.6931472], dtype=float32)
    """
    return _max_logits(logits, None, where=where)


def _max_logits_kernel(logits, weights, where):
    x, _ = _prepare(logits, weights, where)
    return _checks.log_softmax(jnp.max(x, axis=0))


def _pooled_probs(x: jax.Array, w: jax.Array) -> jax.Array:
    r""":math:`\sum_m w_m p_m` (the tie-breaker of the votes), ``[..., V]``."""
    return _rows_sum(jnp.where(w != 0, w * jax.nn.softmax(x, axis=-1), 0.0).astype(x.dtype))


def majority_vote(
    logits: ArrayLike, weights: ArrayLike | None = None, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""Weighted plurality vote of the models' top tokens.

    Each model votes for its argmax (among allowed tokens) with weight :math:`w_m`;
    the token with the largest total wins. Ties (totals within ``1e-6`` of the total
    weight, i.e. float32 rounding of equal sums) are broken by the weighted summed
    probability :math:`\sum_m w_m p_m(v)`, then by the lowest token index.

    Args:
      logits: ``[M, ..., V]`` logits (or a list of ``[..., V]`` arrays).
      weights: ``None`` (one vote each), ``[M]`` or ``[M, ...]`` non-negative vote weights.
      where: Optional ``[V]`` or ``[..., V]`` boolean mask of allowed tokens.

    Returns:
      ``[...]`` int32 labels.

    Raises:
      ValueError: If shapes disagree or concrete weights are negative or sum to zero.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> z = jnp.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
      >>> fj.logits.majority_vote(z)
      Array(1, dtype=int32)

    References:
      Kittler et al., `On combining classifiers <https://doi.org/10.1109/34.667881>`_,
      IEEE TPAMI 1998.
    """
    return _majority_vote(logits, weights, where=where)


def _majority_vote_kernel(logits, weights, where):
    x, w = _prepare(logits, weights, where)
    v = x.shape[-1]
    top = jnp.argmax(x, axis=-1)  # [M, ...]
    votes = _rows_sum(jax.nn.one_hot(top, v, dtype=x.dtype) * w)  # [..., V]
    best = jnp.max(votes, axis=-1, keepdims=True)
    tol = 1e-6 * _rows_sum(w)
    key = jnp.where(votes >= best - tol, _pooled_probs(x, w), -jnp.inf)
    return jnp.argmax(key, axis=-1).astype(jnp.int32)


def runoff_vote(
    logits: ArrayLike, weights: ArrayLike | None = None, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""Instant-runoff vote over the models' rankings of the tokens.

    Each model ranks the tokens by its logits. In every round each model's vote (weight
    :math:`w_m`) goes to its highest-ranked token still in the race; the token with the
    fewest votes is eliminated, until one is left — which is the token that first holds
    a majority. Tokens that are no model's first choice have no votes and are
    eliminated first, so the race is between the :math:`\le M` first choices and takes
    at most :math:`M - 1` rounds. Ties for the fewest votes eliminate the token with the
    lower weighted summed probability :math:`\sum_m w_m p_m(v)`, then the higher index.

    Args:
      logits: ``[M, ..., V]`` logits (or a list of ``[..., V]`` arrays).
      weights: ``None`` (one vote each), ``[M]`` or ``[M, ...]`` non-negative vote weights.
      where: Optional ``[V]`` or ``[..., V]`` boolean mask of allowed tokens.

    Returns:
      ``[...]`` int32 labels.

    Raises:
      ValueError: If shapes disagree or concrete weights are negative or sum to zero.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> # first choices 0, 0, 1, 1, 2; the voter for 2 prefers 1 next: 1 wins the runoff
      >>> z = jnp.array([[3., 2., 1.], [3., 2., 1.], [2., 3., 1.], [2., 3., 1.], [1., 2., 3.]])
      >>> fj.logits.runoff_vote(z, jnp.array([1.0, 1.0, 1.0, 1.0, 1.0]))
      Array(1, dtype=int32)

    References:
      Hare, *Treatise on the Election of Representatives*, 1859 (the single transferable
      vote); instant-runoff is its single-winner case.
    """
    return _runoff_vote(logits, weights, where=where)


def _runoff_vote_kernel(logits, weights, where):
    x, w = _prepare(logits, weights, where)
    m = x.shape[0]
    top = jnp.argmax(x, axis=-1)  # [M, ...] each model's first choice
    cand = jnp.moveaxis(top, 0, -1)  # [..., M] candidate j = model j's first choice
    xb = jnp.moveaxis(x, 0, -2)  # [..., M, V]
    # score[..., i, j] = model i's logit for candidate j.
    score = jnp.take_along_axis(xb, jnp.broadcast_to(cand[..., None, :], xb.shape[:-1] + (m,)),
                                axis=-1)
    pooled = jnp.take_along_axis(_pooled_probs(x, w), cand, axis=-1)  # [..., M]
    wb = jnp.broadcast_to(jnp.moveaxis(w[..., 0], 0, -1), cand.shape)  # [..., M]
    j = jnp.arange(m)
    earlier = (j[None, :] < j[:, None]).reshape((1,) * (cand.ndim - 1) + (m, m))
    # One representative per distinct token: candidate j is alive iff no k < j has its token.
    dup = jnp.any((cand[..., :, None] == cand[..., None, :]) & earlier, axis=-1)
    alive0 = ~dup

    def round_(_, alive):
        s = jnp.where(alive[..., None, :], score, -jnp.inf)
        choice = jnp.argmax(s, axis=-1)  # [..., M] each voter's top live candidate
        tally = jnp.sum(jax.nn.one_hot(choice, m, dtype=x.dtype) * wb[..., None], axis=-2)
        n_alive = jnp.sum(alive, axis=-1, keepdims=True)
        fewest = jnp.min(jnp.where(alive, tally, jnp.inf), axis=-1, keepdims=True)
        # Among the live candidates with the fewest votes, drop the lowest pooled
        # probability; ties there drop the higher token index.
        tied = alive & (tally <= fewest)
        key = jnp.where(tied, -pooled, -jnp.inf)
        worst = jnp.max(key, axis=-1, keepdims=True)
        last = jnp.where(tied & (key >= worst), cand, -1)
        drop = jnp.argmax(last, axis=-1)
        eliminate = jax.nn.one_hot(drop, m, dtype=jnp.bool_) & (n_alive > 1)
        return alive & ~eliminate

    alive = jax.lax.fori_loop(0, m - 1, round_, alive0)
    winner = jnp.argmax(alive, axis=-1)
    return jnp.take_along_axis(cand, winner[..., None], axis=-1)[..., 0].astype(jnp.int32)


_mean_logits = _jitted(_mean_logits_kernel, nonnegative=True)
_linear_pool = _jitted(_linear_pool_kernel, nonnegative=True)
_log_linear_pool = _jitted(_log_linear_pool_kernel, nonnegative=False)
_max_logits = _jitted(_max_logits_kernel, nonnegative=False)
_majority_vote = _jitted(_majority_vote_kernel, nonnegative=True)
_runoff_vote = _jitted(_runoff_vote_kernel, nonnegative=True)
