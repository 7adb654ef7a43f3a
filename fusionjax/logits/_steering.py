r"""Steering one model's next-token distribution with the difference of two others.

All four methods add a scaled *log-ratio* of two distributions to a log-distribution
and renormalise; they differ in which models play which part and in what is masked:

* :func:`proxy_tuning`: :math:`\log p_S + \alpha(\log p_E - \log p_B)`;
* :func:`dexperts`: :math:`\log p_B + \alpha(\log p_E - \log p_A)` on the base's top-p
  nucleus;
* :func:`contrastive_decoding`: :math:`\log p_E - \log p_A` (or
  :math:`(1+\beta)\log p_E - \beta\log p_A`) on the expert's plausible set;
* :func:`contrastive_guidance`: :math:`\log p_M + \gamma(\log p_E - \log p_B)` on the
  sampled model's plausible set;

each followed by ``log_softmax``.

Inputs are ``[..., V]`` logits, normalised here with ``log_softmax`` (a per-position
constant never changes the result). Coefficients may be scalars or one value per
example (``[...]``, the batch shape). The output is ``[..., V]`` log-probabilities
with ``-inf`` on masked tokens.

``-inf`` inputs (masked tokens) follow one rule: a token ruled out by *both* models of
a contrasted pair carries no evidence (the difference is 0); a token ruled out by
exactly one of them is ruled out of the output (so no ``inf - inf`` or ``0 * inf``
ever happens), and a token the steered model rules out stays ruled out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax.logits import _checks


def _inputs(where, names_and_logits):
    first_name, first = names_and_logits[0]
    ref = _checks.as_logits(first, first_name)
    mask = _checks.vocab_mask(where, ref.shape)
    out = []
    for name, x in names_and_logits:
        x = _checks.as_logits(x, name)
        _checks.same_shape(x, name, ref, first_name)
        out.append(_checks.log_softmax(_checks.apply_mask(x, mask)))
    return out


def _shifted(lp: jax.Array, coef: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """``lp + coef * (a - b)`` with the module's ``-inf`` rule."""
    diff, ruled_out = _checks.masked_difference(a, b)
    return jnp.where(ruled_out, -jnp.inf, lp + coef * diff)


def nucleus_mask(log_probs: ArrayLike, top_p: float) -> jax.Array:
    r"""The top-p (nucleus) set: the most probable tokens whose mass first reaches ``top_p``.

    A token is kept if the mass of the tokens strictly more probable than it, in sorted
    order, is below ``top_p``; so the top token is always kept, and tokens tied with the
    last kept one are kept too.

    Args:
      log_probs: ``[..., V]`` normalised log-probabilities.
      top_p: Mass of the nucleus, in ``(0, 1]``; a Python number.

    Returns:
      ``[..., V]`` boolean mask, True inside the nucleus.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> fj.logits.nucleus_mask(jnp.log(jnp.array([0.5, 0.3, 0.2])), 0.7)
      Array([ True,  True, False], dtype=bool)

    References:
      Holtzman et al., `The Curious Case of Neural Text Degeneration
      <https://arxiv.org/abs/1904.09751>`_, ICLR 2020.
    """
    validation.check_hparam("top_p", top_p, lower=0.0, upper=1.0, lower_open=True)
    return _nucleus(_checks.as_logits(log_probs, "log_probs"), top_p)


@jax.jit
def _nucleus(lp, top_p):
    p_sorted = jnp.exp(-jnp.sort(-lp, axis=-1))  # descending
    before = jnp.cumsum(p_sorted, axis=-1) - p_sorted
    kept = before < top_p
    threshold = jnp.min(jnp.where(kept, p_sorted, jnp.inf), axis=-1, keepdims=True)
    return (jnp.exp(lp) >= threshold) & jnp.isfinite(lp)


def proxy_tuning(
    strong_logits: ArrayLike,
    expert_logits: ArrayLike,
    base_logits: ArrayLike,
    *,
    alpha: ArrayLike = 1.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Proxy-tuning: steer a strong model by a small tuned expert's change over its base.

    .. math::
      \log \tilde p \propto \log p_S + \alpha\,(\log p_E - \log p_B)

    where :math:`p_S` is the large (untuned) model, :math:`p_E` the small tuned expert
    and :math:`p_B` the small base it was tuned from (Liu et al.'s
    :math:`s_{\mathcal M} + s_{\mathcal M^+} - s_{\mathcal M^-}` at ``alpha=1``; the
    weighted form is Mitchell et al.'s emulated fine-tuning).

    Args:
      strong_logits: ``[..., V]`` logits of the strong model.
      expert_logits: ``[..., V]`` logits of the small tuned expert.
      base_logits: ``[..., V]`` logits of the small untuned base.
      alpha: Strength of the steer; a scalar or one per example ``[...]``. 0 gives the
        strong model back.
      where: Optional ``[V]`` or ``[..., V]`` boolean mask of allowed tokens.

    Returns:
      ``[..., V]`` log-probabilities.

    Raises:
      ValueError: If the shapes differ (see :func:`match_vocab` for vocabulary sizes) or
        ``alpha`` is neither a scalar nor ``[...]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> strong, expert, base = jnp.zeros(2), jnp.array([1.0, 0.0]), jnp.zeros(2)
      >>> jnp.exp(fj.logits.proxy_tuning(strong, expert, base))
      Array([0.7310586 , 0.26894143], dtype=float32)

    References:
      Liu et al., `Tuning Language Models by Proxy <https://arxiv.org/abs/2401.08565>`_,
      COLM 2024. Mitchell et al., `An Emulator for Fine-Tuning Large Language Models
      using Small Language Models <https://arxiv.org/abs/2310.12962>`_, ICLR 2024.
    """
    return _proxy_tuning(strong_logits, expert_logits, base_logits, alpha, where)


@jax.jit
def _proxy_tuning(strong_logits, expert_logits, base_logits, alpha, where):
    s, e, b = _inputs(
        where,
        [("strong_logits", strong_logits), ("expert_logits", expert_logits),
         ("base_logits", base_logits)],
    )
    a = _checks.per_example(alpha, s.shape[:-1], "alpha", s.dtype)
    return _checks.log_softmax(_shifted(s, a, e, b))


def dexperts(
    base_logits: ArrayLike,
    expert_logits: ArrayLike,
    anti_expert_logits: ArrayLike | None = None,
    *,
    alpha: ArrayLike = 1.0,
    top_p: float | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""DExperts: a base model steered towards an expert and away from an anti-expert.

    .. math::
      \log \tilde p \propto \log p_B + \alpha\,(\log p_E - \log p_A)
      \quad\text{on } \mathcal V_p(p_B),

    the paper's :math:`z_t + \alpha(z_t^+ - z_t^-)` in log-probabilities. With
    ``top_p``, tokens outside the base's nucleus :math:`\mathcal V_p(p_B)` (see
    :func:`nucleus_mask`) get ``-inf``, as the paper filters the base before steering.
    Without an anti-expert the base plays its part: :math:`\log p_B + \alpha(\log p_E -
    \log p_B)`, a geometric interpolation (extrapolation for :math:`\alpha > 1`).

    Args:
      base_logits: ``[..., V]`` logits of the base (steered) model.
      expert_logits: ``[..., V]`` logits of the expert (desired attribute).
      anti_expert_logits: ``[..., V]`` logits of the anti-expert (undesired attribute),
        or ``None`` for the base.
      alpha: Strength of the steer; a scalar or one per example ``[...]``.
      top_p: Mass of the base's nucleus in ``(0, 1]``, or ``None`` for no filter.
      where: Optional ``[V]`` or ``[..., V]`` boolean mask of allowed tokens.

    Returns:
      ``[..., V]`` log-probabilities, ``-inf`` outside the nucleus.

    Raises:
      ValueError: If the shapes differ, ``alpha`` has a wrong shape or ``top_p`` is out
        of range.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> base = jnp.log(jnp.array([0.6, 0.3, 0.1]))
      >>> expert, anti = jnp.zeros(3), jnp.array([0.0, 1.0, 0.0])
      >>> out = fj.logits.dexperts(base, expert, anti, alpha=1.0, top_p=0.8)
      >>> bool(jnp.isneginf(out[2]))
      True

    References:
      Liu et al., `DExperts: Decoding-Time Controlled Text Generation with Experts and
      Anti-Experts <https://arxiv.org/abs/2105.03023>`_, ACL 2021.
    """
    if top_p is not None:
        validation.check_hparam("top_p", top_p, lower=0.0, upper=1.0, lower_open=True)
    return _dexperts(base_logits, expert_logits, anti_expert_logits, alpha, top_p, where)


@jax.jit
def _dexperts(base_logits, expert_logits, anti_expert_logits, alpha, top_p, where):
    pairs = [("base_logits", base_logits), ("expert_logits", expert_logits)]
    if anti_expert_logits is not None:
        pairs.append(("anti_expert_logits", anti_expert_logits))
    lps = _inputs(where, pairs)
    b, e = lps[0], lps[1]
    anti = lps[2] if anti_expert_logits is not None else b
    a = _checks.per_example(alpha, b.shape[:-1], "alpha", b.dtype)
    out = _shifted(b, a, e, anti)
    if top_p is not None:
        out = jnp.where(_nucleus(b, top_p), out, -jnp.inf)
    return _checks.log_softmax(out)


def _plausible(lp: jax.Array, alpha: jax.Array) -> jax.Array:
    r"""Li et al.'s head, :math:`\log p \ge \log\alpha + \max \log p` (always the top)."""
    safe = jnp.where(alpha > 0, alpha, 1.0)
    log_alpha = jnp.where(alpha > 0, jnp.log(safe), -jnp.inf)
    top = jnp.max(lp, axis=-1, keepdims=True)
    return (lp >= log_alpha + top) | (lp >= top)


def contrastive_decoding(
    expert_logits: ArrayLike,
    amateur_logits: ArrayLike,
    *,
    alpha: ArrayLike = 0.1,
    beta: ArrayLike | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Contrastive decoding: the expert's log-probability minus an amateur's, on plausible tokens.

    The plausible set (adaptive plausibility constraint) is
    :math:`\mathcal V_{\mathrm{head}} = \{v : \log p_E(v) \ge \log\alpha + \max_w \log p_E(w)\}`;
    outside it the score is ``-inf``. Inside it the score is

    * ``beta=None`` (Li et al. 2023): :math:`\log p_E(v) - \log p_A(v)`;
    * ``beta`` given (O'Brien & Lewis 2023): :math:`(1+\beta)\,\log p_E(v) - \beta\,\log p_A(v)`,
      their :math:`(1+\beta)s_E - \beta s_A` (logits and log-probabilities differ by a
      per-position constant, which the normalisation removes). ``beta=1`` gives Li et al.'s
      ranking plus the expert's own log-probability.

    The scores are returned normalised (``log_softmax``); their argmax is the paper's
    greedy choice.

    Args:
      expert_logits: ``[..., V]`` logits of the expert (large) model.
      amateur_logits: ``[..., V]`` logits of the amateur (small) model.
      alpha: Plausibility threshold in ``[0, 1]``, a scalar or one per example ``[...]``;
        0 keeps every token the expert allows, 1 only its top token(s).
      beta: ``None`` for Li et al.'s score, or the contrast strength :math:`\beta`
        (a scalar or ``[...]``) for O'Brien & Lewis'.
      where: Optional ``[V]`` or ``[..., V]`` boolean mask of allowed tokens.

    Returns:
      ``[..., V]`` log-probabilities, ``-inf`` outside the plausible set.

    Raises:
      ValueError: If the shapes differ or ``alpha`` is out of ``[0, 1]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> expert = jnp.log(jnp.array([0.5, 0.45, 0.05]))
      >>> amateur = jnp.log(jnp.array([0.7, 0.2, 0.1]))
      >>> int(jnp.argmax(fj.logits.contrastive_decoding(expert, amateur, alpha=0.1)))
      1

    References:
      Li et al., `Contrastive Decoding: Open-ended Text Generation as Optimization
      <https://arxiv.org/abs/2210.15097>`_, ACL 2023. O'Brien and Lewis, `Contrastive
      Decoding Improves Reasoning in Large Language Models
      <https://arxiv.org/abs/2309.09117>`_, 2023.
    """
    validation.check_hparam("alpha", alpha, lower=0.0, upper=1.0)
    return _contrastive_decoding(expert_logits, amateur_logits, alpha, beta, where)


@jax.jit
def _contrastive_decoding(expert_logits, amateur_logits, alpha, beta, where):
    e, am = _inputs(where, [("expert_logits", expert_logits), ("amateur_logits", amateur_logits)])
    a = _checks.per_example(alpha, e.shape[:-1], "alpha", e.dtype)
    head = _plausible(e, a)
    if beta is None:
        score = _shifted(jnp.zeros_like(e), jnp.ones((), e.dtype), e, am)
    else:
        b = _checks.per_example(beta, e.shape[:-1], "beta", e.dtype)
        score = _shifted(e, b, e, am)
    return _checks.log_softmax(jnp.where(head, score, -jnp.inf))


def contrastive_guidance(
    logits: ArrayLike,
    expert_logits: ArrayLike,
    base_logits: ArrayLike,
    *,
    gamma: ArrayLike = 1.0,
    alpha: ArrayLike | None = 0.1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Contrastive expert guidance (STEER's coherence term) with a plausibility mask.

    The formulation implemented here:

    .. math::
      \log \tilde p(v) \propto \log p_M(v) + \gamma\,\big(\log p_E(v) - \log p_B(v)\big)
      \quad\text{for } v \in \mathcal V_{\mathrm{head}}(p_M),

    :math:`\mathcal V_{\mathrm{head}}(p_M) = \{v : \log p_M(v) \ge \log\alpha +
    \max_w \log p_M(w)\}` and ``-inf`` elsewhere. :math:`p_E` is a fine-tuned (domain)
    model, :math:`p_B` the base it was tuned from, :math:`p_M` the model being sampled.
    With :math:`p_M = p_E` this is the classifier-free-guidance form
    :math:`(1+\gamma)\log p_E - \gamma \log p_B` with which O'Neill et al. emphasise the
    difference between the fine-tuned and base distributions ("contrastive expert
    guidance"); STEER's second term, negative prompting, is the same call again with
    :math:`p_B` replaced by the model conditioned on a negative prompt. The plausibility
    mask is Li et al.'s adaptive constraint applied to :math:`p_M`, so the guidance only
    re-ranks tokens the sampled model finds plausible.

    Args:
      logits: ``[..., V]`` logits of the model being sampled (often ``expert_logits``).
      expert_logits: ``[..., V]`` logits of the fine-tuned expert.
      base_logits: ``[..., V]`` logits of its base model.
      gamma: Guidance strength :math:`\gamma`; a scalar or one per example ``[...]``.
      alpha: Plausibility threshold in ``[0, 1]`` (scalar or ``[...]``), or ``None`` for no
        mask.
      where: Optional ``[V]`` or ``[..., V]`` boolean mask of allowed tokens.

    Returns:
      ``[..., V]`` log-probabilities, ``-inf`` outside the plausible set.

    Raises:
      ValueError: If the shapes differ or ``alpha`` is out of ``[0, 1]``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> expert = jnp.log(jnp.array([0.5, 0.45, 0.05]))
      >>> base = jnp.log(jnp.array([0.7, 0.2, 0.1]))
      >>> out = fj.logits.contrastive_guidance(expert, expert, base, gamma=1.0, alpha=0.2)
      >>> int(jnp.argmax(out)), bool(jnp.isneginf(out[2]))
      (1, True)

    References:
      O'Neill et al., `Steering Language Generation: Harnessing Contrastive Expert
      Guidance and Negative Prompting for Coherent and Diverse Synthetic Data Generation
      <https://arxiv.org/abs/2308.07645>`_, 2023. Sanchez et al., `Stay on topic with
      Classifier-Free Guidance <https://arxiv.org/abs/2306.17806>`_, ICML 2024.
    """
    validation.check_hparam("alpha", alpha, lower=0.0, upper=1.0)
    return _contrastive_guidance(logits, expert_logits, base_logits, gamma, alpha, where)


@jax.jit
def _contrastive_guidance(logits, expert_logits, base_logits, gamma, alpha, where):
    m, e, b = _inputs(
        where, [("logits", logits), ("expert_logits", expert_logits), ("base_logits", base_logits)]
    )
    g = _checks.per_example(gamma, m.shape[:-1], "gamma", m.dtype)
    out = _shifted(m, g, e, b)
    if alpha is not None:
        out = jnp.where(_plausible(m, _checks.per_example(alpha, m.shape[:-1], "alpha", m.dtype)),
                        out, -jnp.inf)
    return _checks.log_softmax(out)


