r"""Vocabulary-free distillation: Universal Logit Distillation and InfiFusion's multi-teacher form.

When the student and a teacher have different vocabularies, their distributions cannot be
compared token by token. Universal Logit Distillation (ULD; Boizard et al., 2024) compares
them *as sorted vectors*: with :math:`p^{\downarrow}` the probabilities sorted in decreasing
order and the shorter vector padded with zeros to the longer length :math:`n`,

.. math::
   \mathrm{ULD}(p, q) = \sum_{i=1}^{n} \big|p^{\downarrow}_i - q^{\downarrow}_i\big|,

the closed form of a Wasserstein-1 distance between the two sets of probability values (the
optimal transport between two sorted sequences matches them in order), blind to which token
holds which value. Positions must already be aligned (the caller aligns them); the loss is the
mean over counted positions, plus the usual causal-LM term:
:math:`\alpha\,\mathrm{CLM} + \beta\,\mathrm{ULD}` (``clm_weight``, ``distill_weight``).

InfiFusion (Yan et al., 2025) distils :math:`M` teachers at once and adds two steps:

- **logit standardisation** (Sun et al., 2024): each position's logits become their z-score,
  :math:`\tilde z = (z - \mathrm{mean}(z)) / \mathrm{std}(z)`, before
  :math:`\mathrm{softmax}(\tilde z / \tau)`; models whose logits differ in offset and scale
  become comparable, and the result is invariant to any per-position shift and positive
  scaling of the logits;
- **top-K selection**: only the :math:`K` largest probabilities of each distribution are
  compared (the head, where the information is; the tail is noise), not renormalised.

The multi-teacher term is :math:`\sum_m \bar w_m\,\mathrm{ULD}(p_\theta, p_m)` with weights
:math:`\bar w_m` (equal by default, or per teacher, or per teacher and sequence) normalised
over the teachers.

Teachers of different vocabulary sizes cannot be stacked: pass them as a list (each
``[..., L, V_m]``), or stacked ``[M, ..., L, V]`` when they share a size (e.g. padded with
``-inf`` logits, which add zero-probability entries and change nothing).

**Precomputed teachers.** Distillation sets usually store each teacher's head, not its
logits (FuseLLM keeps the top 10 per position). A teacher may be given as a
:class:`fusionjax.distill.TopK` instead of logits: its ``log_probs [..., L, k_t]`` are
taken as the teacher's *final* log-probabilities (after any standardisation and
temperature, normalised over its whole vocabulary, not over the slots) and its ``ids``
are not used (the loss is blind to them). :func:`uld_teacher_targets` computes exactly
that from logits, so a loss on ``uld_teacher_targets(z, k=k_t, ...)`` equals the loss on
``z`` whenever ``k_t >= k`` (or, with ``k=None``, when ``k_t`` covers the teacher's
nonzero probabilities; otherwise the missing tail counts as zeros, which changes the
value by a constant and the student's gradient not at all as long as
``k_t >= V_s``, the student's vocabulary size).

What costs time, and what is done about it: a softmax over each vocabulary and one sort per
position (:math:`O(V \log V)`); with ``k`` the sort becomes ``jax.lax.top_k``
(:math:`O(V \log k)`), and the :math:`L_1` works on ``k`` values. The student's sorted
vector is computed once and shared by all teachers; teachers are a Python loop of
:math:`M` (small) inside one compiled kernel.

References:
  Boizard et al., `Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
  Loss for LLMs <https://arxiv.org/abs/2402.12030>`_, TMLR 2025 (code:
  Nicolas-BZRD/llm-recipes).
  Yan et al., `InfiFusion: A Unified Framework for Enhanced Cross-Model Reasoning via LLM
  Fusion <https://arxiv.org/abs/2501.02795>`_, 2025 (code: Reallm-Labs/InfiFusion).
  Sun et al., `Logit Standardization in Knowledge Distillation
  <https://arxiv.org/abs/2403.01427>`_, CVPR 2024.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusionjax._src import kernels
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax.distill._types import TopK


class ULDOutput(NamedTuple):
    r"""A vocabulary-free distillation objective and its parts (scalars), for training curves.

    Attributes:
      loss: :math:`\alpha\,\mathrm{clm} + \beta\,\mathrm{distill}`, the value to minimise.
      clm: The causal-LM cross-entropy against the gold tokens (masked mean).
      distill: The (teacher-weighted) ULD distance (masked mean over positions).
    """

    loss: jax.Array
    clm: jax.Array
    distill: jax.Array


# ----------------------------------------------------------------------------- checks


def _check_positive_scalar(name: str, value) -> None:
    validation.check_hparam(name, value, lower=0.0, lower_open=True)
    if validation.is_concrete(value) and np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}.")


def _check_k(k) -> int | None:
    return None if k is None else validation.check_int("k", k, lower=1)


def _check_teacher(t, name: str, z: jax.Array) -> jax.Array | TopK:
    if isinstance(t, TopK):
        lp = validation.float_array(t.log_probs, f"{name}.log_probs", 2)
        if lp.shape[:-1] != z.shape[:-1]:
            raise ValueError(
                f"{name}.log_probs must have the student's positions {z.shape[:-1]} before "
                f"its slot axis (align positions first), got shape {lp.shape}."
            )
        return TopK(jnp.zeros((), jnp.int32), lp)  # ids are not used: vocabulary-free
    t = validation.float_array(t, name, 2)
    if t.shape[:-1] != z.shape[:-1]:
        raise ValueError(
            f"{name} must have the student's positions {z.shape[:-1]} before its vocabulary "
            f"axis (align positions first; vocabularies may differ), got shape {t.shape}."
        )
    return t


def _teacher_list(teachers, z: jax.Array) -> tuple[jax.Array, ...]:
    if isinstance(teachers, TopK):
        return (_check_teacher(teachers, "teacher_logits", z),)
    if isinstance(teachers, (list, tuple)):
        if len(teachers) == 0:
            raise ValueError("teacher_logits is empty: at least one teacher is needed.")
        return tuple(_check_teacher(t, f"teacher_logits[{i}]", z) for i, t in enumerate(teachers))
    stacked = validation.float_array(teachers, "teacher_logits", 3)
    if stacked.shape[1:-1] != z.shape[:-1]:
        raise ValueError(
            f"stacked teacher_logits must have shape [M, ..., L, V] with the student's "
            f"positions {z.shape[:-1]} after the teacher axis, got {stacked.shape}; pass "
            "teachers of different vocabulary sizes as a list."
        )
    return stacked  # split inside the compiled kernel


def _teacher_weights(weights, m: int, batch: tuple[int, ...]) -> jax.Array | None:
    if weights is None:
        return None
    validation.check_weights(weights, "weights")
    dtype = jnp.result_type(weights)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"weights must be real numbers, got {dtype}.")
    w = jnp.asarray(weights).astype(jnp.float32)
    if w.shape not in ((m,), (m, *batch)):
        raise ValueError(
            f"weights must have shape [M] = {(m,)} (one per teacher) or [M, ...] = "
            f"{(m, *batch)} (one per teacher and sequence), got {w.shape}."
        )
    return w


# ------------------------------------------------------------------------------ kernels


def _standardize(z: jax.Array) -> jax.Array:
    """Per-position z-score of the finite logits; ``-inf`` entries stay ``-inf``."""
    finite = jnp.isfinite(z)
    n = jnp.maximum(jnp.sum(finite, axis=-1, keepdims=True), 1).astype(z.dtype)
    safe = jnp.where(finite, z, 0.0)
    mean = jnp.sum(safe, axis=-1, keepdims=True) / n
    centred = jnp.where(finite, z - mean, 0.0)
    var = jnp.sum(centred * centred, axis=-1, keepdims=True) / n
    std = jnp.sqrt(jnp.where(var > 0, var, 1.0))  # a constant row stays at 0, no NaN gradient
    return jnp.where(finite, centred / std, -jnp.inf)


def _sorted_probs(z, temperature, k, standardize):
    """Probabilities sorted in decreasing order ``[..., L, min(k, V)]`` (the top ``k``).

    A :class:`TopK` ``z`` holds final log-probabilities: used as they are.
    """
    if isinstance(z, TopK):
        p = jnp.where(jnp.isfinite(z.log_probs), jnp.exp(z.log_probs), 0.0)
    else:
        if standardize:
            z = _standardize(z)
        p = jax.nn.softmax(z / temperature, axis=-1)
    if k is None:
        return -jnp.sort(-p, axis=-1)
    return jax.lax.top_k(p, min(k, p.shape[-1]))[0]


def _l1_padded(a, b):
    """``sum |a - b|`` over the last axis after padding the shorter with zeros."""
    n = max(a.shape[-1], b.shape[-1])
    pad = [(0, 0)] * (a.ndim - 1)
    a = jnp.pad(a, pad + [(0, n - a.shape[-1])])
    b = jnp.pad(b, pad + [(0, n - b.shape[-1])])
    return jnp.sum(jnp.abs(a - b), axis=-1)


def _all(where, shape):
    return jnp.ones(shape, bool) if where is None else where


def _distill_terms(z, teachers, weights, where, st, tt, k, standardize):
    """Per-position teacher-weighted ULD ``[..., L]`` (weights normalised over teachers)."""
    if not isinstance(teachers, tuple):
        teachers = tuple(teachers[i] for i in range(teachers.shape[0]))
    s = _sorted_probs(z, st, k, standardize)
    d = jnp.stack([_l1_padded(s, _sorted_probs(t, tt, k, standardize)) for t in teachers])
    m = len(teachers)
    if weights is None:
        w = jnp.full((m,) + (1,) * (d.ndim - 1), 1.0 / m, d.dtype)
    else:
        w = weights / jnp.sum(weights, axis=0, keepdims=True)
        w = w.reshape(w.shape + (1,) * (d.ndim - w.ndim)).astype(d.dtype)
    return jnp.sum(w * d, axis=0)


@functools.partial(jax.jit, static_argnames=("k", "standardize"))
def _distance(z, teachers, weights, where, st, tt, k, standardize):
    per_pos = _distill_terms(z, teachers, weights, where, st, tt, k, standardize)
    return kernels.masked_mean(per_pos, _all(where, per_pos.shape))


@functools.partial(jax.jit, static_argnames=("k", "standardize"))
def _objective(z, labels, teachers, weights, where, st, tt, cw, dw, k, standardize):
    per_pos = _distill_terms(z, teachers, weights, where, st, tt, k, standardize)
    where = _all(where, per_pos.shape)
    distill = kernels.masked_mean(per_pos, where)
    counted = where & (labels >= 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(z, jnp.maximum(labels, 0))
    clm = kernels.masked_mean(ce, counted)
    return ULDOutput(cw * clm + dw * distill, clm, distill)


# ----------------------------------------------------------------------------- public


def uld_distance(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike | Sequence[ArrayLike],
    *,
    where: ArrayLike | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    k: int | None = None,
    standardize: bool = False,
    weights: ArrayLike | None = None,
) -> jax.Array:
    r"""The ULD distance between a student and one or more teachers of any vocabularies.

    Per position, :math:`\sum_i |p^{\downarrow}_i - q^{\downarrow}_i|` between the sorted
    probability vectors (:math:`\mathrm{softmax}(z/\tau)`, optionally of the standardised
    logits, optionally only the top ``k``), the shorter padded with zeros; averaged over the
    counted positions (over all counted positions at once, not per sequence first as in the
    ULD reference code, which weighs short sequences more). With several teachers, the
    per-position distances are averaged with the normalised ``weights``.

    Args:
      student_logits: ``[..., L, V_s]`` student logits.
      teacher_logits: ``[..., L, V_t]`` logits of one teacher, a list of such arrays (the
        vocabulary sizes may differ), or ``[M, ..., L, V]`` stacked teachers. A teacher
        may be a precomputed :class:`fusionjax.distill.TopK` (:func:`uld_teacher_targets`;
        its log-probabilities are used as they are, see the module docstring).
      where: Optional ``[..., L]`` bool mask of counted positions.
      student_temperature: :math:`\tau_s > 0` for the student's softmax.
      teacher_temperature: :math:`\tau_t > 0` for the teachers' softmax.
      k: Compare only the ``k`` largest probabilities of each distribution (``None``: all).
      standardize: Z-score each position's logits before the temperature (InfiFusion).
      weights: Per-teacher weights ``[M]`` or ``[M, ...]`` (per sequence), non-negative, not
        all zero, normalised over teachers; ``None`` for equal weights.

    Returns:
      Scalar: the masked mean of the (weighted) per-position distance, in ``[0, 2]``.

    Raises:
      TypeError: If arrays have the wrong dtype.
      ValueError: If a teacher's positions differ from the student's, ``where`` or
        ``weights`` has the wrong shape, ``k < 1``, or a temperature is not positive.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusionjax import distill
      >>> s = jnp.log(jnp.array([[[0.7, 0.2, 0.1]]]))
      >>> t = jnp.log(jnp.array([[[0.1, 0.0, 0.7, 0.2]]]))  # the same values, permuted, padded
      >>> round(float(distill.uld_distance(s, t)), 6)
      0.0

    References:
      Boizard et al., `Towards Cross-Tokenizer Distillation: the Universal Logit
      Distillation Loss for LLMs <https://arxiv.org/abs/2402.12030>`_, TMLR 2025, Eq. 5.
    """
    z = validation.float_array(student_logits, "student_logits", 2)
    teachers = _prepare_teachers(teacher_logits, z)
    k = _check_k(k)
    _check_positive_scalar("student_temperature", student_temperature)
    _check_positive_scalar("teacher_temperature", teacher_temperature)
    w = _teacher_weights(weights, _count(teachers), z.shape[:-2])
    where = validation.bool_mask(where, z.shape[:-1])
    return _distance(z, teachers, w, where, student_temperature, teacher_temperature, k,
                     bool(standardize))


def _count(teachers) -> int:
    return len(teachers) if isinstance(teachers, tuple) else teachers.shape[0]


def _prepare_teachers(teacher_logits, z):
    if isinstance(teacher_logits, TopK):
        return (_check_teacher(teacher_logits, "teacher_logits", z),)
    if not isinstance(teacher_logits, (list, tuple)):
        t = jnp.asarray(teacher_logits)
        if t.ndim == z.ndim:  # one teacher
            return (_check_teacher(t, "teacher_logits", z),)
    return _teacher_list(teacher_logits, z)


def uld_loss(
    student_logits: ArrayLike,
    labels: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    where: ArrayLike | None = None,
    clm_weight: float = 1.0,
    distill_weight: float = 1.0,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
) -> ULDOutput:
    r"""Universal Logit Distillation's objective :math:`\alpha\,\mathrm{CLM} + \beta\,\mathrm{ULD}`.

    :math:`\mathrm{ULD}` is :func:`uld_distance` over the whole vocabularies (sorted,
    zero-padded, :math:`L_1`), :math:`\mathrm{CLM}` the student's cross-entropy against its
    own gold tokens; both masked means over ``where``. The result is a NamedTuple for
    ``jax.value_and_grad(lambda p: (o := uld_loss(...)).loss, o), has_aux=True)``-style use.

    Args:
      student_logits: ``[..., L, V_s]`` student logits.
      labels: ``[..., L]`` int student next tokens (negative = not counted in the CLM term).
      teacher_logits: ``[..., L, V_t]`` teacher logits at the same (aligned) positions,
        or a precomputed :class:`fusionjax.distill.TopK` (:func:`uld_teacher_targets`).
      where: Optional ``[..., L]`` bool mask of counted positions.
      clm_weight: :math:`\alpha \ge 0` (the reference code's ``crossentropy_weight``).
      distill_weight: :math:`\beta \ge 0` (``distillation_weight``).
      student_temperature: :math:`\tau_s > 0`.
      teacher_temperature: :math:`\tau_t > 0`.

    Returns:
      :class:`ULDOutput` ``(loss, clm, distill)`` of scalars.

    Raises:
      TypeError: If arrays have the wrong dtype.
      ValueError: If shapes disagree, weights are negative, or temperatures not positive.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusionjax import distill
      >>> z = jnp.zeros((1, 2, 4))
      >>> out = distill.uld_loss(z, jnp.array([[0, 1]]), jnp.zeros((1, 2, 6)))
      >>> round(float(out.distill), 4)  # |1/4 - 1/6| * 4 + 1/6 * 2
      0.6667

    References:
      Boizard et al., `Towards Cross-Tokenizer Distillation: the Universal Logit
      Distillation Loss for LLMs <https://arxiv.org/abs/2402.12030>`_, TMLR 2025.
    """
    return _objective_entry(
        student_logits, labels, (teacher_logits,), where=where, clm_weight=clm_weight,
        distill_weight=distill_weight, student_temperature=student_temperature,
        teacher_temperature=teacher_temperature, k=None, standardize=False, weights=None,
    )


def infifusion_loss(
    student_logits: ArrayLike,
    labels: ArrayLike,
    teacher_logits: ArrayLike | Sequence[ArrayLike],
    *,
    where: ArrayLike | None = None,
    k: int | None = 100,
    temperature: float = 1.0,
    standardize: bool = True,
    weights: ArrayLike | None = None,
    clm_weight: float = 1.0,
    distill_weight: float = 1.0,
) -> ULDOutput:
    r"""InfiFusion's multi-teacher ULD with top-K selection and logit standardisation.

    .. math::
       \alpha\,\mathrm{CLM} + \beta \sum_m \bar w_m\,
       \mathrm{ULD}_K\big(\mathrm{softmax}(\tilde z_\theta/\tau),\
       \mathrm{softmax}(\tilde z_m/\tau)\big)

    with :math:`\tilde z` the per-position z-scored logits (student and teachers alike),
    :math:`\mathrm{ULD}_K` the :math:`L_1` between the :math:`K` largest probabilities of
    each (sorted, zero-padded when a vocabulary is smaller than :math:`K`), and
    :math:`\bar w` the normalised teacher weights. The standardisation statistics are taken
    over the whole vocabulary (the finite logits) and the top :math:`K` are not
    renormalised, so ``k=None`` is plain ULD on standardised logits; this is our reading
    of the paper, whose released code was not available to check.

    Args:
      student_logits: ``[..., L, V_s]`` student logits.
      labels: ``[..., L]`` int student next tokens (negative = not counted in the CLM term).
      teacher_logits: A list of ``[..., L, V_m]`` teacher logits (vocabularies may differ)
        or ``[M, ..., L, V]`` stacked, at the student's aligned positions. A teacher may be
        a precomputed :class:`fusionjax.distill.TopK` from :func:`uld_teacher_targets`
        (with the same ``standardize`` and ``temperature``; used as it is).
      where: Optional ``[..., L]`` bool mask of counted positions.
      k: :math:`K`, how many of the largest probabilities are compared (``None``: all).
      temperature: :math:`\tau > 0` after standardisation (for student and teachers).
      standardize: Z-score the logits per position (set ``False`` for plain top-K ULD).
      weights: Per-teacher weights ``[M]`` or ``[M, ...]`` (per sequence), non-negative,
        normalised over teachers; ``None`` for the plain average.
      clm_weight: :math:`\alpha \ge 0`.
      distill_weight: :math:`\beta \ge 0`.

    Returns:
      :class:`ULDOutput` ``(loss, clm, distill)`` of scalars.

    Raises:
      TypeError: If arrays have the wrong dtype.
      ValueError: If the teacher list is empty, a teacher's positions differ from the
        student's, ``where``/``weights`` have the wrong shape, ``k < 1``, or
        ``temperature`` is not positive.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusionjax import distill
      >>> z = jnp.array([[[0.0, 1.0, 2.0]]])
      >>> teachers = [3.0 * z + 1.0, jnp.array([[[4.0, 2.0, -jnp.inf, 0.0]]])]
      >>> out = distill.infifusion_loss(z, jnp.array([[2]]), teachers, k=3)
      >>> round(float(out.distill), 6)  # both teachers are the student after standardisation
      0.0

    References:
      Yan et al., `InfiFusion: A Unified Framework for Enhanced Cross-Model Reasoning via LLM
      Fusion <https://arxiv.org/abs/2501.02795>`_, 2025.
      Sun et al., `Logit Standardization in Knowledge Distillation
      <https://arxiv.org/abs/2403.01427>`_, CVPR 2024.
    """
    _check_positive_scalar("temperature", temperature)
    return _objective_entry(
        student_logits, labels, teacher_logits, where=where, clm_weight=clm_weight,
        distill_weight=distill_weight, student_temperature=temperature,
        teacher_temperature=temperature, k=k, standardize=standardize, weights=weights,
    )


def _objective_entry(student_logits, labels, teacher_logits, *, where, clm_weight,
                     distill_weight, student_temperature, teacher_temperature, k,
                     standardize, weights) -> ULDOutput:
    z = validation.float_array(student_logits, "student_logits", 2)
    ldtype = jnp.result_type(labels)
    if not jnp.issubdtype(ldtype, jnp.integer):
        raise TypeError(f"labels must be integer token ids, got {ldtype}.")
    labels = jnp.asarray(labels).astype(jnp.int32)
    if labels.shape != z.shape[:-1]:
        raise ValueError(
            f"labels must have the student's positions shape {z.shape[:-1]}, got {labels.shape}."
        )
    teachers = _prepare_teachers(teacher_logits, z)
    k = _check_k(k)
    _check_positive_scalar("student_temperature", student_temperature)
    _check_positive_scalar("teacher_temperature", teacher_temperature)
    validation.check_hparam("clm_weight", clm_weight, lower=0.0)
    validation.check_hparam("distill_weight", distill_weight, lower=0.0)
    w = _teacher_weights(weights, _count(teachers), z.shape[:-2])
    where = validation.bool_mask(where, z.shape[:-1])
    return _objective(z, labels, teachers, w, where, student_temperature, teacher_temperature,
                      clm_weight, distill_weight, k, bool(standardize))


@functools.partial(jax.jit, static_argnames=("k", "standardize"))
def _teacher_targets(z, temperature, k, standardize):
    if standardize:
        z = _standardize(z)
    lp = jax.nn.log_softmax(z / temperature, axis=-1)
    vals, ids = jax.lax.top_k(lp, k)
    return TopK(ids.astype(jnp.int32), vals)


def uld_teacher_targets(
    teacher_logits: ArrayLike,
    *,
    k: int,
    temperature: float = 1.0,
    standardize: bool = False,
) -> TopK:
    r"""A teacher's head for the vocabulary-free losses, computed once before training.

    The ``k`` largest of :math:`\log \mathrm{softmax}(\tilde z / \tau)` per position
    (:math:`\tilde z` the z-scored logits when ``standardize``, else :math:`z`),
    normalised over the *whole* vocabulary. Passed as a teacher to :func:`uld_distance`,
    :func:`uld_loss` or :func:`infifusion_loss`, it gives the value those compute from
    ``teacher_logits`` with the same ``temperature`` and ``standardize`` whenever the
    loss compares at most ``k`` values (see the module docstring for ``k=None``). Storing
    it costs ``2k`` numbers per position instead of the vocabulary.

    Args:
      teacher_logits: ``[..., L, V_t]`` teacher logits (or log-probabilities: both the
        softmax and the standardisation ignore a per-position shift).
      k: Slots kept, ``1 <= k <= V_t``.
      temperature: :math:`\tau > 0`.
      standardize: Z-score each position's logits first (InfiFusion).

    Returns:
      :class:`fusionjax.distill.TopK` ``(ids [..., L, k] int32, log_probs [..., L, k])``,
      most likely first.

    Raises:
      TypeError: If ``teacher_logits`` is not floating point.
      ValueError: If ``k`` is not in ``[1, V_t]`` or ``temperature`` is not positive.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusionjax import distill
      >>> s, t = jnp.zeros((1, 2, 4)), jnp.log(jnp.array([[[0.5, 0.3, 0.2]] * 2]))
      >>> head = distill.uld_teacher_targets(t, k=2)
      >>> a = distill.uld_distance(s, t, k=2)
      >>> bool(jnp.allclose(a, distill.uld_distance(s, head, k=2)))
      True

    References:
      Boizard et al., `Towards Cross-Tokenizer Distillation: the Universal Logit
      Distillation Loss for LLMs <https://arxiv.org/abs/2402.12030>`_, TMLR 2025.
      Yan et al., `InfiFusion <https://arxiv.org/abs/2501.02795>`_, 2025.
    """
    z = validation.float_array(teacher_logits, "teacher_logits", 2)
    k = validation.check_int("k", k, lower=1)
    if k > z.shape[-1]:
        raise ValueError(f"k must be at most the teacher's vocabulary size {z.shape[-1]}, got {k}.")
    _check_positive_scalar("temperature", temperature)
    return _teacher_targets(z, temperature, k, bool(standardize))
