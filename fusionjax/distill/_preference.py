r"""The preference route to knowledge fusion: DPO, SimPO, WRPO and FuseRL as pure functions.

Every loss takes *sequence* log-probabilities: ``[B]`` (or ``[B, M]`` for several sources)
sums of the token log-probabilities of a whole response under the policy (the target being
trained) and, where the method has one, under a frozen reference model. With the implicit
reward :math:`r(y) = \beta\,(\log\pi(y\mid x) - \log\pi_{\mathrm{ref}}(y\mid x))`:

- **DPO** (Rafailov et al. 2023):
  :math:`\ell = -(1-\epsilon)\log\sigma(r_w - r_l) - \epsilon\log\sigma(r_l - r_w)`
  (:math:`\epsilon` the label smoothing of the conservative DPO variant).
- **SimPO** (Meng et al. 2024): no reference, length-normalised reward
  :math:`r(y) = \frac{\beta}{|y|}\log\pi(y\mid x)` and a target margin :math:`\gamma`:
  :math:`\ell = -\log\sigma(r_w - r_l - \gamma)`.
- **WRPO** (Yang et al. 2025): the chosen side mixes the source's chosen response
  :math:`y_{ws}` and the target's own :math:`y_{wt}`,
  :math:`\ell = -\log\sigma\big(\alpha\,r(y_{ws}) + (1-\alpha)\,r(y_{wt}) - r(y_l)\big)`, with the
  fusion coefficient :math:`\alpha` raised linearly over training (:func:`wrpo_alpha`).
- **FuseRL** (Zhong et al. 2025): several sources answer each prompt; their responses get
  weights :math:`w_m = \mathrm{softmax}_m(R_m/\tau)` from reward-model scores :math:`R_m`
  (:func:`fuserl_weights`). FuseSFT: :math:`-\sum_m w_m \log\pi(y_m\mid x)`
  (:func:`fuserl_sft_loss`); FusePO: :math:`\sum_m w_m\,\ell_{\mathrm{DPO}}(y_{w,m}, y_{l,m})`
  over each source's preference pair (:func:`fuserl_po_loss`).

Convention: every preference loss returns a :class:`PreferenceOutput` (the mean loss over the
counted examples and the per-example parts), so all of them drop into the same optax loop;
``where: [B] bool`` excludes examples (padding rows) from every mean.

What costs time, and what is done about it: nothing here is heavier than a few elementwise
operations on ``[B]`` or ``[B, M]`` arrays; the cost of the preference route is the forward
passes that produce the sequence log-probabilities, which the caller runs (the reference
model's once, offline, as DPO implementations do). Shape checks run on the host before
tracing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import kernels
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike


class PreferenceOutput(NamedTuple):
    """The result of a preference loss.

    Attributes:
      loss: Scalar mean of ``losses`` over the counted examples (what to minimise).
      losses: ``[B]`` per-example losses (zero where ``where`` is False).
      chosen_rewards: ``[B]`` implicit rewards of the chosen responses (for WRPO the mixed
        chosen reward; for FuseRL the weighted sum over sources).
      rejected_rewards: ``[B]`` implicit rewards of the rejected responses.
      margins: ``[B]`` ``chosen_rewards - rejected_rewards`` (before SimPO's ``gamma``).
      accuracy: Scalar fraction of counted examples with a positive margin.
    """

    loss: jax.Array
    losses: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array
    margins: jax.Array
    accuracy: jax.Array


# -- checks --------------------------------------------------------------------


def _logps(x, name: str, *, ndim: int | None = None) -> jax.Array:
    if x is None:
        raise TypeError(f"{name} is required, got None.")
    if not hasattr(x, "dtype"):
        x = np.asarray(x, np.float32)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must hold floating-point log-probabilities, got dtype {x.dtype}.")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim}, got shape {x.shape}.")
    if x.ndim == 0:
        raise ValueError(f"{name} must have a batch axis [B], got a scalar.")
    return x


def _like(x, name: str, ref: jax.Array, ref_name: str) -> jax.Array:
    x = _logps(x, name)
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {ref.shape}, got {x.shape}.")
    return x


def _lengths(x, name: str, ref: jax.Array) -> jax.Array:
    if x is None:
        raise TypeError(f"{name} is required, got None.")
    if not hasattr(x, "shape"):
        x = np.asarray(x, np.float32)
    if x.shape != ref.shape:
        raise ValueError(f"{name} must have shape {ref.shape}, got {x.shape}.")
    if validation.is_concrete(x) and np.any(np.asarray(x) <= 0):
        raise ValueError(f"{name} must be positive token counts, got {np.asarray(x).tolist()}.")
    return x


def _mask(where, batch: tuple[int, ...]) -> jax.Array | None:
    if where is None:
        return None
    if not hasattr(where, "dtype"):
        where = np.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"where must be a boolean mask, got dtype {where.dtype}.")
    if where.shape != batch:
        raise ValueError(f"where must have shape {batch}, got {where.shape}.")
    return where


def _smoothing(label_smoothing) -> None:
    validation.check_hparam("label_smoothing", label_smoothing, lower=0.0, upper=0.5)


def _pair_losses(logits: jax.Array, label_smoothing) -> jax.Array:
    eps = jnp.asarray(label_smoothing, jnp.float32)
    return -(1.0 - eps) * jax.nn.log_sigmoid(logits) - eps * jax.nn.log_sigmoid(-logits)


def _f32(*xs):
    return [jnp.asarray(x, jnp.float32) for x in xs]


def _output(losses, chosen, rejected, where) -> PreferenceOutput:
    if where is not None:
        losses = jnp.where(where, losses, 0.0)
    margins = chosen - rejected
    acc = kernels.masked_mean((margins > 0).astype(jnp.float32), where)
    loss = kernels.masked_mean(losses, where)
    return PreferenceOutput(loss, losses, chosen, rejected, margins, acc)


# -- DPO and SimPO -------------------------------------------------------------


def dpo_loss(
    policy_chosen: ArrayLike,
    policy_rejected: ArrayLike,
    ref_chosen: ArrayLike,
    ref_rejected: ArrayLike,
    *,
    beta: ArrayLike = 0.1,
    label_smoothing: ArrayLike = 0.0,
    where: ArrayLike | None = None,
) -> PreferenceOutput:
    r"""Direct Preference Optimization on sequence log-probabilities.

    With :math:`r_w = \beta(\log\pi(y_w) - \log\pi_{\mathrm{ref}}(y_w))` and :math:`r_l` alike,

    .. math::
       \ell = -(1-\epsilon)\log\sigma(r_w - r_l) - \epsilon\log\sigma(r_l - r_w).

    When the policy equals the reference the loss is :math:`\log 2`; its gradient raises
    :math:`\log\pi(y_w)` and lowers :math:`\log\pi(y_l)`. Swapping chosen and rejected while
    replacing :math:`\epsilon` by :math:`1-\epsilon` leaves the loss unchanged.

    Args:
      policy_chosen: ``[B]`` summed token log-probs of the chosen responses under the policy.
      policy_rejected: ``[B]`` the same for the rejected responses.
      ref_chosen: ``[B]`` chosen responses under the frozen reference model.
      ref_rejected: ``[B]`` rejected responses under the reference model.
      beta: :math:`\beta>0`, the strength of the implicit KL penalty (larger: stay closer to
        the reference).
      label_smoothing: :math:`\epsilon\in[0, 0.5]`, the assumed rate of flipped preference
        labels (conservative DPO); 0 is plain DPO.
      where: Optional ``[B]`` bool mask of the examples that count.

    Returns:
      A :class:`PreferenceOutput`.

    Raises:
      ValueError: if shapes differ or ``beta``/``label_smoothing`` are out of range.
      TypeError: if an input is not floating point.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusionjax import distill
      >>> lp = jnp.array([-3.0, -4.0])
      >>> round(float(distill.dpo_loss(lp, lp, lp, lp, beta=0.1).loss), 4)  # log 2
      0.6931

    References:
      Rafailov et al, `Direct Preference Optimization: Your Language Model is Secretly a
      Reward Model <https://arxiv.org/abs/2305.18290>`_, NeurIPS 2023
    """
    validation.check_hparam("beta", beta, lower=0.0, lower_open=True)
    _smoothing(label_smoothing)
    pc = _logps(policy_chosen, "policy_chosen")
    pr = _like(policy_rejected, "policy_rejected", pc, "policy_chosen")
    rc = _like(ref_chosen, "ref_chosen", pc, "policy_chosen")
    rr = _like(ref_rejected, "ref_rejected", pc, "policy_chosen")
    mask = _mask(where, pc.shape)
    return _dpo(pc, pr, rc, rr, beta, label_smoothing, mask)


@jax.jit
def _dpo(pc, pr, rc, rr, beta, label_smoothing, mask):
    pc, pr, rc, rr, b = _f32(pc, pr, rc, rr, beta)
    chosen = b * (pc - rc)
    rejected = b * (pr - rr)
    return _output(_pair_losses(chosen - rejected, label_smoothing), chosen, rejected, mask)


def simpo_loss(
    policy_chosen: ArrayLike,
    policy_rejected: ArrayLike,
    chosen_length: ArrayLike,
    rejected_length: ArrayLike,
    *,
    beta: ArrayLike = 2.0,
    gamma: ArrayLike = 1.0,
    label_smoothing: ArrayLike = 0.0,
    where: ArrayLike | None = None,
) -> PreferenceOutput:
    r"""SimPO: reference-free, length-normalised preference loss with a target margin.

    .. math::
       r(y) = \frac{\beta}{|y|}\log\pi(y\mid x),\qquad
       \ell = -(1-\epsilon)\log\sigma(r_w - r_l - \gamma) - \epsilon\log\sigma(\gamma - r_w + r_l).

    The reward is the *average* token log-prob, so a response is not favoured for being short
    (a sum of log-probs is); doubling a response's length and its summed log-prob leaves the
    loss unchanged.

    Args:
      policy_chosen: ``[B]`` summed token log-probs of the chosen responses under the policy.
      policy_rejected: ``[B]`` the same for the rejected responses.
      chosen_length: ``[B]`` token counts :math:`|y_w|` (positive).
      rejected_length: ``[B]`` token counts :math:`|y_l|`.
      beta: :math:`\beta>0`, the reward scale (the paper uses 2 to 10).
      gamma: :math:`\gamma\ge0`, the target reward margin (the paper uses 0.3 to 1.6).
      label_smoothing: :math:`\epsilon\in[0, 0.5]` as in :func:`dpo_loss`.
      where: Optional ``[B]`` bool mask of the examples that count.

    Returns:
      A :class:`PreferenceOutput` (``margins`` are :math:`r_w - r_l`, before :math:`\gamma`).

    Raises:
      ValueError: if shapes differ, a length is not positive, or a hyperparameter is out of
        range.
      TypeError: if a log-prob input is not floating point.

    References:
      Meng, Xia and Chen, `SimPO: Simple Preference Optimization with a Reference-Free Reward
      <https://arxiv.org/abs/2405.14734>`_, NeurIPS 2024
    """
    validation.check_hparam("beta", beta, lower=0.0, lower_open=True)
    validation.check_hparam("gamma", gamma, lower=0.0)
    _smoothing(label_smoothing)
    pc = _logps(policy_chosen, "policy_chosen")
    pr = _like(policy_rejected, "policy_rejected", pc, "policy_chosen")
    lc = _lengths(chosen_length, "chosen_length", pc)
    lr = _lengths(rejected_length, "rejected_length", pc)
    mask = _mask(where, pc.shape)
    return _simpo(pc, pr, lc, lr, beta, gamma, label_smoothing, mask)


@jax.jit
def _simpo(pc, pr, lc, lr, beta, gamma, label_smoothing, mask):
    pc, pr, lc, lr, b, g = _f32(pc, pr, lc, lr, beta, gamma)
    chosen = b * pc / lc
    rejected = b * pr / lr
    return _output(_pair_losses(chosen - rejected - g, label_smoothing), chosen, rejected, mask)


# -- WRPO ----------------------------------------------------------------------


def wrpo_alpha(step: ArrayLike, total_steps: int, *, alpha_max: ArrayLike) -> jax.Array:
    r"""WRPO's fusion coefficient: linear from 0 to ``alpha_max`` over ``total_steps``.

    .. math:: \alpha(t) = \alpha_{\max}\cdot\min(t / T, 1).

    Early in training the chosen reward is the target's own response (on-policy, easy to
    fit); the weight moves progressively to the source's response (off-policy, where the
    sources' knowledge is). ``step`` may be traced (the step counter of a compiled loop).

    Args:
      step: The current step :math:`t\ge0` (a number or a traced integer/float scalar).
      total_steps: :math:`T\ge1`, the steps over which :math:`\alpha` rises (static).
      alpha_max: :math:`\alpha_{\max}\in[0,1]`, the final coefficient.

    Returns:
      The scalar :math:`\alpha(t)` (float32).

    Raises:
      ValueError: if ``total_steps`` is not a positive integer, ``alpha_max`` lies outside
        ``[0, 1]`` or a concrete ``step`` is negative.

    Examples:
      >>> from fusionjax import distill
      >>> [float(distill.wrpo_alpha(t, 4, alpha_max=0.5)) for t in (0, 2, 4, 9)]
      [0.0, 0.25, 0.5, 0.5]
    """
    total_steps = validation.check_int("total_steps", total_steps, lower=1)
    validation.check_hparam("alpha_max", alpha_max, lower=0.0, upper=1.0)
    validation.check_hparam("step", step, lower=0.0)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / np.float32(total_steps), 0.0, 1.0)
    return jnp.asarray(alpha_max, jnp.float32) * frac


def wrpo_loss(
    policy_source_chosen: ArrayLike,
    policy_target_chosen: ArrayLike,
    policy_rejected: ArrayLike,
    ref_source_chosen: ArrayLike,
    ref_target_chosen: ArrayLike,
    ref_rejected: ArrayLike,
    *,
    alpha: ArrayLike,
    beta: ArrayLike = 0.1,
    label_smoothing: ArrayLike = 0.0,
    where: ArrayLike | None = None,
) -> PreferenceOutput:
    r"""Weighted-Reward Preference Optimization (implicit model fusion).

    For each prompt, :math:`y_{ws}` is the best source model's response, :math:`y_{wt}` the
    target's own chosen response and :math:`y_l` the target's rejected one. With
    :math:`r(y) = \beta(\log\pi(y) - \log\pi_{\mathrm{ref}}(y))`:

    .. math::
       \ell = -(1-\epsilon)\log\sigma(\Delta) - \epsilon\log\sigma(-\Delta),\qquad
       \Delta = \alpha\,r(y_{ws}) + (1-\alpha)\,r(y_{wt}) - r(y_l).

    At :math:`\alpha=0` this is :func:`dpo_loss` on the target's own pair; :math:`\alpha` is
    raised over training by :func:`wrpo_alpha`.

    Args:
      policy_source_chosen: ``[B]`` log-probs of the source's chosen responses under the policy.
      policy_target_chosen: ``[B]`` the target's own chosen responses under the policy.
      policy_rejected: ``[B]`` the rejected responses under the policy.
      ref_source_chosen: ``[B]`` the source's chosen responses under the reference.
      ref_target_chosen: ``[B]`` the target's chosen responses under the reference.
      ref_rejected: ``[B]`` the rejected responses under the reference.
      alpha: The fusion coefficient :math:`\alpha\in[0,1]` (scalar, may be traced), usually
        :func:`wrpo_alpha` of the step.
      beta: :math:`\beta>0` as in :func:`dpo_loss`.
      label_smoothing: :math:`\epsilon\in[0, 0.5]` as in :func:`dpo_loss`.
      where: Optional ``[B]`` bool mask of the examples that count.

    Returns:
      A :class:`PreferenceOutput` whose ``chosen_rewards`` are the mixed rewards.

    Raises:
      ValueError: if shapes differ or a hyperparameter is out of range.
      TypeError: if an input is not floating point.

    References:
      Yang et al, `Weighted-Reward Preference Optimization for Implicit Model Fusion
      <https://arxiv.org/abs/2412.03187>`_, ICLR 2025
    """
    validation.check_hparam("alpha", alpha, lower=0.0, upper=1.0)
    validation.check_hparam("beta", beta, lower=0.0, lower_open=True)
    _smoothing(label_smoothing)
    if np.ndim(alpha) != 0:
        raise ValueError(f"alpha must be a scalar, got shape {np.shape(alpha)}.")
    ps = _logps(policy_source_chosen, "policy_source_chosen")
    pt = _like(policy_target_chosen, "policy_target_chosen", ps, "policy_source_chosen")
    pr = _like(policy_rejected, "policy_rejected", ps, "policy_source_chosen")
    rs = _like(ref_source_chosen, "ref_source_chosen", ps, "policy_source_chosen")
    rt = _like(ref_target_chosen, "ref_target_chosen", ps, "policy_source_chosen")
    rr = _like(ref_rejected, "ref_rejected", ps, "policy_source_chosen")
    mask = _mask(where, ps.shape)
    return _wrpo(ps, pt, pr, rs, rt, rr, alpha, beta, label_smoothing, mask)


@jax.jit
def _wrpo(ps, pt, pr, rs, rt, rr, alpha, beta, label_smoothing, mask):
    ps, pt, pr, rs, rt, rr, a, b = _f32(ps, pt, pr, rs, rt, rr, alpha, beta)
    chosen = a * b * (ps - rs) + (1.0 - a) * b * (pt - rt)
    rejected = b * (pr - rr)
    return _output(_pair_losses(chosen - rejected, label_smoothing), chosen, rejected, mask)


# -- FuseRL ----------------------------------------------------------------------


def _source_mask(where, shape, name="where"):
    if where is None:
        return None
    if not hasattr(where, "dtype"):
        where = np.asarray(where)
    if where.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean mask, got dtype {where.dtype}.")
    if where.shape != shape:
        raise ValueError(f"{name} must have shape {shape} ([B, M]), got {where.shape}.")
    return where


def fuserl_weights(
    rewards: ArrayLike, *, temperature: ArrayLike = 1.0, where: ArrayLike | None = None
) -> jax.Array:
    r"""FuseRL's per-prompt weights over the sources' responses: a softmax of their rewards.

    .. math:: w_{b,m} = \frac{\exp(R_{b,m}/\tau)}{\sum_{m'}\exp(R_{b,m'}/\tau)}.

    The weights sum to one per prompt; as :math:`\tau\to0` they select the best-rewarded
    response (the sparse "best output" signal of earlier fusion methods), as
    :math:`\tau\to\infty` they are uniform. Sources masked out get weight 0; a prompt with no
    source gets all-zero weights.

    Args:
      rewards: ``[B, M]`` reward-model scores of each source's response to each prompt.
      temperature: :math:`\tau>0`.
      where: Optional ``[B, M]`` bool mask of the responses that exist.

    Returns:
      ``[B, M]`` float32 weights.

    Raises:
      ValueError: if ``rewards`` is not ``[B, M]``, ``where`` has another shape, or
        ``temperature`` is not positive.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusionjax import distill
      >>> w = distill.fuserl_weights(jnp.array([[1.0, 3.0]]), temperature=1e-3)
      >>> w.tolist()
      [[0.0, 1.0]]

    References:
      Zhong et al, `FuseRL: Dense Preference Optimization for Heterogeneous Model Fusion
      <https://arxiv.org/abs/2504.06562>`_, 2025
    """
    validation.check_hparam("temperature", temperature, lower=0.0, lower_open=True)
    r = _logps(rewards, "rewards", ndim=2)
    mask = _source_mask(where, r.shape)
    return _weights(r, temperature, mask)


@jax.jit
def _weights(r, temperature, mask):
    r, t = _f32(r, temperature)
    z = r / t
    if mask is not None:
        z = jnp.where(mask, z, -jnp.inf)
    zmax = jnp.max(z, axis=-1, keepdims=True)
    zmax = jnp.where(jnp.isfinite(zmax), zmax, 0.0)
    e = jnp.exp(z - jax.lax.stop_gradient(zmax))
    return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


def fuserl_sft_loss(
    log_probs: ArrayLike,
    rewards: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    lengths: ArrayLike | None = None,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""FuseSFT: supervised fine-tuning on every source's response, weighted by its reward.

    .. math::
       \mathcal L = \frac1B\sum_b\Big(-\sum_m w_{b,m}\,\frac{\log\pi(y_{b,m}\mid x_b)}
       {|y_{b,m}|}\Big),\qquad w = \mathrm{softmax}(R/\tau)

    (:func:`fuserl_weights`; without ``lengths`` the log-probs are not divided). Dense
    supervision from all sources instead of SFT on the single best response, which
    :math:`\tau\to0` recovers.

    Args:
      log_probs: ``[B, M]`` summed token log-probs of source ``m``'s response under the policy.
      rewards: ``[B, M]`` reward-model scores of those responses.
      temperature: :math:`\tau>0` of the weights.
      lengths: Optional ``[B, M]`` token counts, for a per-token (length-normalised) loss.
      where: Optional ``[B, M]`` bool mask of the responses that exist; prompts with none
        do not count.

    Returns:
      The scalar loss.

    Raises:
      ValueError: if shapes differ or ``temperature`` is not positive.
      TypeError: if an input is not floating point.

    References:
      Zhong et al, `FuseRL: Dense Preference Optimization for Heterogeneous Model Fusion
      <https://arxiv.org/abs/2504.06562>`_, 2025
    """
    validation.check_hparam("temperature", temperature, lower=0.0, lower_open=True)
    lp = _logps(log_probs, "log_probs", ndim=2)
    r = _like(rewards, "rewards", lp, "log_probs")
    if lengths is not None:
        lengths = _lengths(lengths, "lengths", lp)
    mask = _source_mask(where, lp.shape)
    return _sft(lp, r, lengths, temperature, mask)


@jax.jit
def _sft(lp, r, lengths, temperature, mask):
    lp = jnp.asarray(lp, jnp.float32)
    if lengths is not None:
        lp = lp / jnp.asarray(lengths, jnp.float32)
    w = jax.lax.stop_gradient(_weights(r, temperature, mask))
    terms = w * lp if mask is None else jnp.where(mask, w * lp, 0.0)
    per_prompt = -jnp.sum(terms, axis=-1)
    rows = None if mask is None else jnp.any(mask, axis=-1)
    return kernels.masked_mean(per_prompt, rows)


def fuserl_po_loss(
    policy_chosen: ArrayLike,
    policy_rejected: ArrayLike,
    ref_chosen: ArrayLike,
    ref_rejected: ArrayLike,
    rewards: ArrayLike,
    *,
    beta: ArrayLike = 0.1,
    temperature: ArrayLike = 1.0,
    label_smoothing: ArrayLike = 0.0,
    where: ArrayLike | None = None,
) -> PreferenceOutput:
    r"""FusePO with DPO: each source's preference pair, weighted by the source's reward.

    For prompt :math:`b` every source :math:`m` contributes a pair
    :math:`(y_{w,m}, y_{l,m})`; with :math:`w = \mathrm{softmax}(R/\tau)` over the sources
    (:func:`fuserl_weights`, ``rewards`` the scores of the chosen responses),

    .. math::
       \ell_b = \sum_m w_{b,m}\,\ell_{\mathrm{DPO}}(y_{w,m}, y_{l,m}).

    The weights are constants of the gradient (as rewards are). For FusePO with SimPO, weight
    ``simpo_loss(...).losses`` reshaped to ``[B, M]`` by :func:`fuserl_weights` the same way.

    Args:
      policy_chosen: ``[B, M]`` policy log-probs of each source's chosen response.
      policy_rejected: ``[B, M]`` policy log-probs of each source's rejected response.
      ref_chosen: ``[B, M]`` reference log-probs of the chosen responses.
      ref_rejected: ``[B, M]`` reference log-probs of the rejected responses.
      rewards: ``[B, M]`` reward scores of each source's chosen response.
      beta: :math:`\beta>0` as in :func:`dpo_loss`.
      temperature: :math:`\tau>0` of the weights.
      label_smoothing: :math:`\epsilon\in[0, 0.5]` as in :func:`dpo_loss`.
      where: Optional ``[B, M]`` bool mask of the pairs that exist; prompts with none do
        not count.

    Returns:
      A :class:`PreferenceOutput` over prompts (rewards and margins are the weighted sums
      over sources).

    Raises:
      ValueError: if shapes differ or a hyperparameter is out of range.
      TypeError: if an input is not floating point.

    References:
      Zhong et al, `FuseRL: Dense Preference Optimization for Heterogeneous Model Fusion
      <https://arxiv.org/abs/2504.06562>`_, 2025
    """
    validation.check_hparam("beta", beta, lower=0.0, lower_open=True)
    _smoothing(label_smoothing)
    pc = _logps(policy_chosen, "policy_chosen", ndim=2)
    pr = _like(policy_rejected, "policy_rejected", pc, "policy_chosen")
    rc = _like(ref_chosen, "ref_chosen", pc, "policy_chosen")
    rr = _like(ref_rejected, "ref_rejected", pc, "policy_chosen")
    r = _like(rewards, "rewards", pc, "policy_chosen")
    validation.check_hparam("temperature", temperature, lower=0.0, lower_open=True)
    mask = _source_mask(where, pc.shape)
    return _fusepo(pc, pr, rc, rr, r, beta, temperature, label_smoothing, mask)


@jax.jit
def _fusepo(pc, pr, rc, rr, r, beta, temperature, label_smoothing, mask):
    pc, pr, rc, rr, b = _f32(pc, pr, rc, rr, beta)
    w = jax.lax.stop_gradient(_weights(r, temperature, mask))
    chosen = b * (pc - rc)
    rejected = b * (pr - rr)
    pair = _pair_losses(chosen - rejected, label_smoothing)
    if mask is not None:
        pair = jnp.where(mask, pair, 0.0)
        chosen = jnp.where(mask, chosen, 0.0)
        rejected = jnp.where(mask, rejected, 0.0)
    rows = None if mask is None else jnp.any(mask, axis=-1)
    return _output(
        jnp.sum(w * pair, axis=-1),
        jnp.sum(w * chosen, axis=-1),
        jnp.sum(w * rejected, axis=-1),
        rows,
    )
