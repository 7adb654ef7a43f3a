r"""Choosing sources per input: a learned selection network, and ProFuser's advantages.

**Selection network** (Kong et al. 2025). With :math:`M` source models, a small network
:math:`g` reads features :math:`h` of the input (e.g. the target's mean-pooled hidden state)
and scores the sources, :math:`s = g(h)\in\mathbb R^M`. Only the top :math:`k` sources are
used for that input, with weights

.. math::
   w_m = \frac{[m\in\mathrm{top}_k(s)]\;e^{s_m}\,q_m}
             {\sum_{m'\in\mathrm{top}_k(s)} e^{s_{m'}}\,q_{m'}},

where :math:`q_m>0` are optional per-input *strengths* of the sources (e.g.
:math:`\exp(-\mathrm{CE}_m)` of source :math:`m` on the gold response, FuseLLM's quality
signal) -- the dynamic weighted fusion; the fused teacher distribution is the mixture
:math:`p = \sum_m w_m p_m` (:func:`fuse_selected`). A selector trained only by the
distillation loss tends to collapse onto the same few sources; the feedback loss penalises
unbalanced use, the squared coefficient of variation of the sources' importance over a batch,

.. math::
   I_m = \sum_n w_{n,m},\qquad
   \mathcal L_{\mathrm{feedback}} = \mathrm{CV}(I)^2 = \frac{\mathrm{Var}_m(I_m)}
   {(\mathrm{mean}_m I_m)^2},

which is 0 when every source carries the same total weight and :math:`M-1` when one source
takes everything. This is the importance loss of sparsely gated mixtures of experts (Shazeer
et al. 2017), the form the paper's feedback loss builds on; optional Gaussian noise on the
scores during training (:func:`selector_scores` with ``key``) is that paper's noisy top-k
gating.

**ProFuser** (Shi et al. 2024) measures each source's advantage in two modes: *training
mode*, the source with the smallest cross-entropy on the gold response under teacher forcing
(FuseLLM's MinCE), and *inference mode*, the source whose own generated response a reward
model scores best. Training runs progressively from inference mode (the sources' shorter,
easier responses) to training mode (the detailed gold responses): :func:`profuser_weights`.

What costs time, and what is done about it: the selector is a one- or two-layer MLP over
``[N, D]`` features, negligible next to the forward passes that produce the features and the
teacher distributions; top-k uses :func:`jax.lax.top_k` over the ``M`` sources (small), and
the fused distribution is one ``logsumexp`` over ``M`` in log space (``-inf`` safe, so a
zero weight removes a source exactly).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike


def _floats(x, name: str, *, min_ndim: int = 1) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got dtype {x.dtype}.")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} axes, got shape {x.shape}.")
    return x.astype(jnp.float32)


# -- the selection network --------------------------------------------------------


def init_selector(
    key: jax.Array,
    feature_dim: int,
    num_sources: int,
    *,
    hidden_dim: int | None = None,
    noise: bool = False,
) -> dict:
    r"""Parameters of a selection network: a plain dict pytree of arrays.

    Without ``hidden_dim`` the network is linear, :math:`s = hW + b`; with it, one hidden
    layer, :math:`s = \mathrm{gelu}(hW_1 + b_1)W_2 + b_2`. Weights are drawn with variance
    :math:`1/\mathrm{fan\_in}`, the last layer scaled by 0.1 so that all sources start with
    nearly equal scores. With ``noise=True`` a ``"noise"`` matrix (zeros) is added for noisy
    top-k gating (:func:`selector_scores`).

    Args:
      key: A PRNG key.
      feature_dim: :math:`D`, the size of the input features.
      num_sources: :math:`M\ge1`, the number of sources to score.
      hidden_dim: Width of the hidden layer, or ``None`` for a linear scorer.
      noise: Whether to add a learnable noise-scale matrix ``[D, M]``.

    Returns:
      ``{"w1", "b1"[, "w2", "b2"][, "noise"]}``, float32 arrays.

    Raises:
      ValueError: if a size is not a positive integer.

    Examples:
      >>> import jax
      >>> from fusionjax import distill
      >>> p = distill.init_selector(jax.random.key(0), 8, 3, hidden_dim=16)
      >>> sorted(p), p["w2"].shape
      (['b1', 'b2', 'w1', 'w2'], (16, 3))
    """
    d = validation.check_int("feature_dim", feature_dim, lower=1)
    m = validation.check_int("num_sources", num_sources, lower=1)
    if hidden_dim is not None:
        hidden_dim = validation.check_int("hidden_dim", hidden_dim, lower=1)
    k1, k2 = jax.random.split(key)
    if hidden_dim is None:
        params = {
            "w1": 0.1 * jax.random.normal(k1, (d, m), jnp.float32) / np.float32(np.sqrt(d)),
            "b1": jnp.zeros((m,), jnp.float32),
        }
    else:
        params = {
            "w1": jax.random.normal(k1, (d, hidden_dim), jnp.float32) / np.float32(np.sqrt(d)),
            "b1": jnp.zeros((hidden_dim,), jnp.float32),
            "w2": 0.1
            * jax.random.normal(k2, (hidden_dim, m), jnp.float32)
            / np.float32(np.sqrt(hidden_dim)),
            "b2": jnp.zeros((m,), jnp.float32),
        }
    if noise:
        params["noise"] = jnp.zeros((d, m), jnp.float32)
    return params


def selector_scores(
    params: dict, features: ArrayLike, *, key: jax.Array | None = None
) -> jax.Array:
    r"""Scores of the sources for each input: ``[..., D] -> [..., M]``.

    With ``key`` (training) and a ``"noise"`` matrix in ``params``, Gaussian noise of
    learned scale is added, :math:`s + \epsilon\cdot\mathrm{softplus}(hW_{\mathrm{noise}})`,
    :math:`\epsilon\sim\mathcal N(0,1)` -- noisy top-k gating, which lets sources outside the
    current top-k be tried and receive gradient.

    Args:
      params: From :func:`init_selector` (or trained from it).
      features: ``[..., D]`` input features, e.g. the target's mean-pooled hidden states.
      key: Optional PRNG key for the noise (ignored if ``params`` has no ``"noise"``).

    Returns:
      ``[..., M]`` float32 scores.

    Raises:
      ValueError: if the feature size differs from the network's ``D``, or ``params`` lacks
        ``"w1"``/``"b1"``.
      TypeError: if ``features`` is not floating point.
    """
    if not isinstance(params, dict) or "w1" not in params or "b1" not in params:
        raise ValueError("params must be a dict from init_selector with 'w1' and 'b1'.")
    h = _floats(features, "features")
    d = params["w1"].shape[0]
    if h.shape[-1] != d:
        raise ValueError(f"features must have last axis {d} (the selector's feature_dim), "
                         f"got shape {h.shape}.")
    if key is not None and "noise" not in params:
        key = None
    return _scores(params, h, key)


def _bias(b, ndim):
    return b.reshape((1,) * (ndim - 1) + b.shape)


@jax.jit
def _scores(params, h, key):
    hp = jax.lax.Precision.HIGHEST
    s = jnp.matmul(h, params["w1"], precision=hp)
    s = s + _bias(params["b1"], s.ndim)
    if "w2" in params:
        s = jnp.matmul(jax.nn.gelu(s), params["w2"], precision=hp)
        s = s + _bias(params["b2"], s.ndim)
    if key is not None:
        scale = jax.nn.softplus(jnp.matmul(h, params["noise"], precision=hp))
        s = s + jax.random.normal(key, s.shape, s.dtype) * scale
    return s


def top_k_mask(scores: ArrayLike, *, k: int) -> jax.Array:
    r"""Boolean ``[..., M]`` mask of the ``k`` largest scores per row (ties by lower index).

    Args:
      scores: ``[..., M]`` scores.
      k: How many sources to keep, ``1 <= k <= M`` (static).

    Returns:
      ``[..., M]`` bool, exactly ``k`` True per row.

    Raises:
      ValueError: if ``k`` is out of range.
    """
    s = _floats(scores, "scores")
    m = s.shape[-1]
    k = validation.check_int("k", k, lower=1, upper=m)
    return _top_k_mask(s, k)


def _top_k_mask(s, k):
    m = s.shape[-1]
    _, idx = jax.lax.top_k(s, k)
    ids = jnp.arange(m, dtype=idx.dtype).reshape((1,) * idx.ndim + (m,))
    return jnp.any(idx[..., None] == ids, axis=-2)


def select_sources(
    scores: ArrayLike, *, k: int, strengths: ArrayLike | None = None
) -> jax.Array:
    r"""Weights over the sources: a softmax over the top ``k`` scores, zero elsewhere.

    .. math::
       w_m \propto [m\in\mathrm{top}_k(s)]\;e^{s_m}\,q_m .

    Gradients reach the scores of the selected sources (the selection itself is discrete).

    Args:
      scores: ``[..., M]`` selector scores (:func:`selector_scores`).
      k: Sources kept per input, ``1 <= k <= M`` (static).
      strengths: Optional ``[..., M]`` positive per-input strengths :math:`q_m` of the sources
        (e.g. ``exp(-ce)``), multiplying the softmax before renormalising -- the dynamic
        weighted fusion. ``None``: :math:`q_m = 1`.

    Returns:
      ``[..., M]`` float32 weights, each row summing to 1 with exactly ``M - k`` zeros (more
      only where a strength is 0).

    Raises:
      ValueError: if ``k`` is out of range or ``strengths`` has another shape.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusionjax import distill
      >>> w = distill.select_sources(jnp.array([0.0, 2.0, 1.0]), k=2)
      >>> [round(v, 3) for v in w.tolist()]
      [0.0, 0.731, 0.269]
    """
    s = _floats(scores, "scores")
    k = validation.check_int("k", k, lower=1, upper=s.shape[-1])
    q = None
    if strengths is not None:
        q = _floats(strengths, "strengths")
        if q.shape != s.shape:
            raise ValueError(f"strengths must have the shape of scores {s.shape}, got {q.shape}.")
        if validation.is_concrete(q) and np.any(np.asarray(q) < 0):
            raise ValueError("strengths must be non-negative.")
    return _select(s, q, k)


@functools.partial(jax.jit, static_argnums=2)
def _select(s, q, k):
    z = jnp.where(_top_k_mask(s, k), s, -jnp.inf)
    if q is not None:
        logq = jnp.where(q > 0, jnp.log(jnp.where(q > 0, q, 1.0)), -jnp.inf)
        z = z + logq
    zmax = jnp.max(z, axis=-1, keepdims=True)
    zmax = jax.lax.stop_gradient(jnp.where(jnp.isfinite(zmax), zmax, 0.0))
    e = jnp.exp(z - zmax)
    return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def fuse_selected(log_probs: ArrayLike, weights: ArrayLike) -> jax.Array:
    r"""The selected sources' mixture distribution, in log space: :math:`\log\sum_m w_m p_m`.

    Args:
      log_probs: ``[M, *batch, ..., V]`` the sources' log-probabilities (already in the
        target's vocabulary and positions).
      weights: ``[*batch, M]`` per-input weights from :func:`select_sources`; ``*batch`` is a
        prefix of the log-probs' axes after ``M`` (per-sequence weights broadcast over
        positions).

    Returns:
      ``[*batch, ..., V]`` float32 log-probabilities; sources of weight 0 contribute nothing
      (not even NaN from their ``-inf`` entries).

    Raises:
      ValueError: if the weights' batch axes or ``M`` do not match ``log_probs``.
    """
    lp = _floats(log_probs, "log_probs", min_ndim=2)
    w = _floats(weights, "weights")
    m = lp.shape[0]
    batch = w.shape[:-1]
    if w.shape[-1] != m or lp.shape[1 : 1 + len(batch)] != batch:
        raise ValueError(
            f"weights must be [*batch, M] with M = {m} and *batch a prefix of "
            f"log_probs.shape[1:] = {lp.shape[1:]}, got {w.shape}."
        )
    return _fuse(lp, w)


@jax.jit
def _fuse(lp, w):
    m, batch = w.shape[-1], w.shape[:-1]
    wm = jnp.moveaxis(w, -1, 0).reshape((m, *batch) + (1,) * (lp.ndim - 1 - len(batch)))
    logw = jnp.where(wm > 0, jnp.log(jnp.where(wm > 0, wm, 1.0)), -jnp.inf)
    terms = jnp.where(wm > 0, logw + lp, -jnp.inf)
    return jax.nn.logsumexp(terms, axis=0)


def selection_feedback_loss(weights: ArrayLike, *, where: ArrayLike | None = None) -> jax.Array:
    r"""The feedback loss against selector collapse: :math:`\mathrm{CV}(I)^2` of source importance.

    .. math::
       I_m = \sum_n w_{n,m},\qquad
       \mathcal L = \frac{\frac1M\sum_m (I_m - \bar I)^2}{\bar I^2 + 10^{-10}}.

    0 when every source receives the same total weight over the batch, :math:`M-1` when a
    single source receives it all. Add it, scaled, to the distillation loss.

    Args:
      weights: ``[..., M]`` selection weights (:func:`select_sources`), any batch axes.
      where: Optional ``[...]`` bool mask of the inputs that count.

    Returns:
      The scalar loss.

    Raises:
      ValueError: if ``where`` does not match the weights' batch axes.

    References:
      Kong et al, `Enabling Flexible Multi-LLM Integration for Scalable Knowledge Aggregation
      <https://arxiv.org/abs/2505.23844>`_, 2025; Shazeer et al, `Outrageously Large Neural
      Networks: The Sparsely-Gated Mixture-of-Experts Layer
      <https://arxiv.org/abs/1701.06538>`_, ICLR 2017
    """
    w = _floats(weights, "weights")
    if where is not None:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_ or where.shape != w.shape[:-1]:
            raise ValueError(f"where must be a bool mask of shape {w.shape[:-1]}, got "
                             f"{where.dtype}{where.shape}.")
    return _feedback(w, where)


@jax.jit
def _feedback(w, where):
    m = w.shape[-1]
    if where is not None:
        w = jnp.where(where[..., None], w, 0.0)
    imp = jnp.sum(w.reshape(-1, m), axis=0)
    mean = jnp.mean(imp)
    var = jnp.mean((imp - mean) ** 2)
    return var / (mean * mean + 1e-10)


# -- ProFuser ---------------------------------------------------------------------------


def training_mode_advantage(ce: ArrayLike) -> jax.Array:
    r"""ProFuser's training-mode advantage: one-hot on the source of least cross-entropy.

    Args:
      ce: ``[..., M]`` each source's cross-entropy on the gold response (teacher forcing).

    Returns:
      ``[..., M]`` float32 one-hot (ties: lowest index).
    """
    c = _floats(ce, "ce")
    return jax.nn.one_hot(jnp.argmin(c, axis=-1), c.shape[-1], dtype=jnp.float32)


def inference_mode_advantage(rewards: ArrayLike) -> jax.Array:
    r"""ProFuser's inference-mode advantage: one-hot on the source whose response scores best.

    Args:
      rewards: ``[..., M]`` reward-model scores of each source's generated response.

    Returns:
      ``[..., M]`` float32 one-hot (ties: lowest index).
    """
    r = _floats(rewards, "rewards")
    return jax.nn.one_hot(jnp.argmax(r, axis=-1), r.shape[-1], dtype=jnp.float32)


def profuser_weights(
    ce: ArrayLike,
    rewards: ArrayLike,
    *,
    progress: ArrayLike,
    schedule: str = "stages",
    switch: float = 0.5,
) -> jax.Array:
    r"""ProFuser's progressive choice of the advantaged source, from inference to training mode.

    With :math:`a^{\mathrm{inf}}` = :func:`inference_mode_advantage` and
    :math:`a^{\mathrm{train}}` = :func:`training_mode_advantage` and :math:`p\in[0,1]` the
    fraction of training done:

    - ``"stages"`` (the paper's easy-to-hard curriculum, two stages):
      :math:`a^{\mathrm{inf}}` while :math:`p<` ``switch``, then :math:`a^{\mathrm{train}}`;
    - ``"linear"`` (a smooth variant): :math:`(1-p)\,a^{\mathrm{inf}} + p\,a^{\mathrm{train}}`.

    Args:
      ce: ``[..., M]`` cross-entropy of each source on the gold response.
      rewards: ``[..., M]`` reward of each source's generated response.
      progress: :math:`p\in[0,1]` (scalar, may be traced).
      schedule: ``"stages"`` or ``"linear"``.
      switch: The fraction of training spent in inference mode for ``"stages"``, in ``[0, 1]``.

    Returns:
      ``[..., M]`` float32 weights summing to 1 per input.

    Raises:
      ValueError: if shapes differ, ``schedule`` is unknown or ``progress``/``switch`` lie
        outside ``[0, 1]``.

    References:
      Shi et al, `ProFuser: Progressive Fusion of Large Language Models
      <https://arxiv.org/abs/2408.04998>`_, 2024
    """
    if schedule not in ("stages", "linear"):
        raise ValueError(f"schedule must be 'stages' or 'linear', got {schedule!r}.")
    validation.check_hparam("progress", progress, lower=0.0, upper=1.0)
    validation.check_hparam("switch", switch, lower=0.0, upper=1.0)
    if np.ndim(progress) != 0:
        raise ValueError(f"progress must be a scalar, got shape {np.shape(progress)}.")
    c = _floats(ce, "ce")
    r = _floats(rewards, "rewards")
    if c.shape != r.shape:
        raise ValueError(f"rewards must have the shape of ce {c.shape}, got {r.shape}.")
    return _profuser(c, r, progress, switch, schedule)


@functools.partial(jax.jit, static_argnums=4)
def _profuser(c, r, progress, switch, schedule):
    m = c.shape[-1]
    a_inf = jax.nn.one_hot(jnp.argmax(r, axis=-1), m, dtype=jnp.float32)
    a_train = jax.nn.one_hot(jnp.argmin(c, axis=-1), m, dtype=jnp.float32)
    p = jnp.asarray(progress, jnp.float32)
    if schedule == "linear":
        return (1.0 - p) * a_inf + p * a_train
    return jnp.where(p < jnp.asarray(switch, jnp.float32), a_inf, a_train)
