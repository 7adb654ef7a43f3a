r"""Vocabulary mapping: a teacher's distribution carried into the student's vocabulary.

After token alignment (:mod:`fusionjax.distill._align`), a source (teacher) distribution
over :math:`V_s` tokens at a target position must become a distribution over the target's
:math:`V_t` tokens. A mapping :math:`\pi: \{0..V_s-1\} \to \{-1, 0..V_t-1\}` sends each
source token to one target token (or none, :math:`-1`):

- *exact*: :math:`\pi(v)` is the target token with the same text (after
  :func:`~fusionjax.distill.normalize_token`), else :math:`-1` (FuseLLM's "hard" mapping);
- *minimum edit distance* (MinED, FuseLLM): :math:`\pi(v)=\arg\min_u \mathrm{ed}(v,u)`,
  ties to the smallest target id;
- *statistical* (FuseChat's statistics-based mapping): count
  :math:`N_{vu}` = how often source token :math:`v` is aligned with target token :math:`u`
  over aligned text; :math:`P(u\mid v) = N_{vu}/\sum_{u'}N_{vu'}` and
  :math:`\pi(v)=\arg\max_u N_{vu}` (ties to the smallest id).

:func:`carry_top_k` moves a :class:`~fusionjax.distill.TopK` through :math:`\pi`:
:math:`q(u) = \sum_{v:\pi(v)=u} p(v)` over the kept ids, mass of unmapped ids dropped or
spread proportionally (``unmapped=``). :func:`project_positions` then moves per-source-
position distributions onto target positions with FuseLLM's rule (a target token with a
single aligned source token takes its distribution; otherwise none, or a one-hot fallback).

What costs time, and what is done about it: MinED compares every unmapped source token
with every target token; the comparisons run as one vectorised Levenshtein recursion per
chunk of source tokens (:func:`~fusionjax.distill.edit_distances`), and exact hits skip the
search. Carrying and projecting run under :func:`jax.jit`: merging duplicates inside one
top-``k`` row is an :math:`O(k^2)` comparison, cheaper than a scatter into :math:`V_t` for
the ``k`` of FuseLLM (10).

References:
  Wan et al., `Knowledge Fusion of Large Language Models
  <https://arxiv.org/abs/2401.10491>`_, ICLR 2024.
  Wan et al., `FuseChat: Knowledge Fusion of Chat Models
  <https://arxiv.org/abs/2408.07990>`_, 2024.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax.distill._align import Normalizer
from fusionjax.distill._align import TokenAlignment
from fusionjax.distill._align import edit_distances
from fusionjax.distill._align import normalize_token
from fusionjax.distill._types import TopK


def map_vocab(
    source_vocab: Sequence[str],
    target_vocab: Sequence[str],
    *,
    method: Literal["exact", "min_edit"] = "exact",
    normalize: Normalizer | None = normalize_token,
    chunk: int = 256,
) -> np.ndarray:
    r"""Maps each source token id to a target token id by text: exact or MinED.

    Args:
      source_vocab: Source token strings, indexed by source id (``V_s`` of them).
      target_vocab: Target token strings, indexed by target id (``V_t``).
      method: ``"exact"``: the target id with the same normalised text, else ``-1``
        (several target ids with one text: the smallest). ``"min_edit"``: the target id at
        minimum edit distance (FuseLLM's MinED); ties go to the smallest target id, so an
        exact match always wins.
      normalize: Maps token strings to their text before comparing (default
        :func:`~fusionjax.distill.normalize_token`; ``None``: raw strings).
      chunk: Source tokens compared at once by MinED (bounds memory at
        ``chunk * V_t * max_len`` integers).

    Returns:
      ``[V_s]`` int32 target ids (``-1`` = unmapped, only for ``"exact"``).

    Raises:
      ValueError: If a vocabulary is empty or ``method`` is unknown.

    Examples:
      >>> map_vocab(["Ġthe", "Ġcat", "xyz"], ["a", " the", " cap"]).tolist()
      [1, -1, -1]
      >>> map_vocab(["Ġthe", "Ġcat", "xyz"], ["a", " the", " cap"], method="min_edit").tolist()
      [1, 2, 0]

    References:
      Wan et al., `Knowledge Fusion of Large Language Models
      <https://arxiv.org/abs/2401.10491>`_, ICLR 2024.
    """
    src = validation.string_list("source_vocab", source_vocab)
    tgt = validation.string_list("target_vocab", target_vocab)
    if method not in ("exact", "min_edit"):
        raise ValueError(f"method must be 'exact' or 'min_edit', got {method!r}.")
    validation.check_int("chunk", chunk, lower=1)
    if normalize is not None:
        src = [normalize(t) for t in src]
        tgt = [normalize(t) for t in tgt]
    index: dict[str, int] = {}
    for u, t in enumerate(tgt):
        index.setdefault(t, u)
    out = np.array([index.get(t, -1) for t in src], np.int32)
    if method == "min_edit":
        todo = np.flatnonzero(out < 0)
        for a in range(0, len(todo), chunk):
            rows = todo[a : a + chunk]
            d = edit_distances([src[i] for i in rows], tgt)
            out[rows] = np.argmin(d, axis=1)  # first minimum = smallest target id
    return out


class StatisticalMap(NamedTuple):
    r"""A vocabulary mapping estimated from aligned text (FuseChat's statistics-based map).

    Attributes:
      mapping: ``[V_s]`` int32 most frequent aligned target id per source id (``-1`` where
        the source id was never aligned); ties to the smallest target id.
      source: ``[E]`` int32 source ids of the nonzero counts (a sparse COO matrix).
      target: ``[E]`` int32 target ids of the nonzero counts.
      count: ``[E]`` int32 co-occurrence counts :math:`N_{vu}`.
      prob: ``[E]`` float32 conditional probabilities :math:`P(u \mid v)`.
    """

    mapping: np.ndarray
    source: np.ndarray
    target: np.ndarray
    count: np.ndarray
    prob: np.ndarray

    def dense(self, target_vocab_size: int) -> np.ndarray:
        """The conditional probabilities as a dense ``[V_s, V_t]`` float32 matrix.

        Args:
          target_vocab_size: ``V_t``.

        Returns:
          ``[V_s, V_t]`` rows summing to 1 (0 for never-aligned source ids).
        """
        out = np.zeros((len(self.mapping), target_vocab_size), np.float32)
        out[self.source, self.target] = self.prob
        return out


def statistical_map(
    source_ids: Sequence[Sequence[int]],
    target_ids: Sequence[Sequence[int]],
    alignments: Sequence[TokenAlignment | np.ndarray],
    *,
    source_vocab_size: int,
    target_vocab_size: int,
    one_to_one: bool = False,
) -> StatisticalMap:
    r"""Estimates a vocabulary mapping from co-occurrence counts over aligned text.

    Every aligned pair :math:`(i, j)` of every sequence adds one to
    :math:`N_{s_i t_j}`; the mapping is the row-wise argmax, the conditional probabilities
    the row-normalised counts.

    Args:
      source_ids: ``B`` sequences of source token ids.
      target_ids: ``B`` sequences of target token ids of the same texts.
      alignments: ``B`` :class:`~fusionjax.distill.TokenAlignment` (or ``[P, 2]`` pair
        arrays) between them.
      source_vocab_size: ``V_s``; every source id must be below it.
      target_vocab_size: ``V_t``; every target id must be below it.
      one_to_one: Count only pairs of 1:1 spans (both tokens in no other pair).

    Returns:
      :class:`StatisticalMap` (``mapping``, and the sparse counts and probabilities).

    Raises:
      ValueError: If the batch sizes differ, the batch is empty, a pair indexes past its
        sequence, or an id is out of its vocabulary.
    """
    validation.check_int("source_vocab_size", source_vocab_size, lower=1)
    validation.check_int("target_vocab_size", target_vocab_size, lower=1)
    if not (len(source_ids) == len(target_ids) == len(alignments)):
        raise ValueError(
            "source_ids, target_ids and alignments must have one entry per sequence, got "
            f"{len(source_ids)}, {len(target_ids)}, {len(alignments)}."
        )
    if len(source_ids) == 0:
        raise ValueError("source_ids is empty: need at least one aligned sequence.")
    keys = []
    for b, (s, t, a) in enumerate(zip(source_ids, target_ids, alignments, strict=True)):
        s, t = np.asarray(s, np.int64), np.asarray(t, np.int64)
        p = np.asarray(a.pairs if isinstance(a, TokenAlignment) else a, np.int64)
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"alignments[{b}] must be [P, 2] pairs, got shape {p.shape}.")
        if p.size and (p[:, 0].max() >= len(s) or p[:, 1].max() >= len(t) or p.min() < 0):
            raise ValueError(f"alignments[{b}] indexes past source_ids[{b}] or target_ids[{b}].")
        checks = (("source_ids", s, source_vocab_size), ("target_ids", t, target_vocab_size))
        for name, x, v in checks:
            if x.size and (x.min() < 0 or x.max() >= v):
                raise ValueError(f"{name}[{b}] has ids outside [0, {v}).")
        if one_to_one:
            cs = np.bincount(p[:, 0], minlength=len(s))
            ct = np.bincount(p[:, 1], minlength=len(t))
            p = p[(cs[p[:, 0]] == 1) & (ct[p[:, 1]] == 1)]
        keys.append(s[p[:, 0]] * target_vocab_size + t[p[:, 1]])
    flat, count = np.unique(np.concatenate(keys), return_counts=True)
    src, tgt = flat // target_vocab_size, flat % target_vocab_size
    row_total = np.bincount(src, weights=count, minlength=source_vocab_size)
    prob = (count / row_total[src]).astype(np.float32)
    # Row-wise argmax with ties to the smallest target id: sort by (source, -count, target).
    order = np.lexsort((tgt, -count, src))
    first = np.ones(len(order), bool)
    first[1:] = src[order][1:] != src[order][:-1]
    mapping = np.full(source_vocab_size, -1, np.int32)
    mapping[src[order][first]] = tgt[order][first]
    return StatisticalMap(
        mapping, src.astype(np.int32), tgt.astype(np.int32), count.astype(np.int32), prob
    )


def _check_top(top) -> TopK:
    if not isinstance(top, TopK):
        raise TypeError(f"top must be a TopK, got {type(top).__name__}.")
    ids, lp = jnp.asarray(top.ids), jnp.asarray(top.log_probs)
    if ids.shape != lp.shape or ids.ndim < 1:
        raise ValueError(
            "top.ids and top.log_probs must share a shape [..., k], got "
            f"{ids.shape} and {lp.shape}."
        )
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"top.ids must be integers, got {ids.dtype}.")
    return TopK(ids.astype(jnp.int32), lp.astype(validation.compute_dtype(lp.dtype)))


def carry_top_k(
    top: TopK, mapping, *, unmapped: Literal["drop", "renormalize"] = "drop"
) -> TopK:
    r"""A source top-``k`` distribution in target ids: :math:`q(u)=\sum_{v:\pi(v)=u} p(v)`.

    Source ids that map to the same target id are merged into the first (most likely)
    slot, holding their summed probability; the freed slots and the slots of unmapped ids
    (``mapping[v] == -1``) become empty (id ``-1``, ``-inf``). The result is sorted, most
    likely first. Jit-able; shapes are kept.

    Args:
      top: :class:`~fusionjax.distill.TopK` over source ids, ``[..., k]``.
      mapping: ``[V_s]`` int target ids per source id (``-1`` = unmapped), e.g. from
        :func:`map_vocab` or :func:`statistical_map`.
      unmapped: ``"drop"`` loses the mass of unmapped ids (the result holds less);
        ``"renormalize"`` scales the carried probabilities so they hold the same total
        mass as ``top`` did (a row with nothing mapped stays empty).

    Returns:
      :class:`~fusionjax.distill.TopK` ``[..., k]`` over target ids.

    Raises:
      ValueError: If ``unmapped`` is unknown or ``mapping`` is not 1-D.
      TypeError: If ``top`` is not a :class:`TopK` or ``mapping`` is not integer.

    Examples:
      >>> import jax.numpy as jnp
      >>> from fusionjax import distill
      >>> top = distill.TopK(jnp.array([0, 1, 2]), jnp.log(jnp.array([0.5, 0.3, 0.2])))
      >>> out = distill.carry_top_k(top, jnp.array([4, 4, -1]))
      >>> out.ids.tolist(), [round(float(p), 3) for p in jnp.exp(out.log_probs)]
      ([4, -1, -1], [0.8, 0.0, 0.0])
    """
    top = _check_top(top)
    if unmapped not in ("drop", "renormalize"):
        raise ValueError(f"unmapped must be 'drop' or 'renormalize', got {unmapped!r}.")
    mapping = jnp.asarray(mapping)
    if mapping.ndim != 1:
        raise ValueError(f"mapping must be 1-D [V_s], got shape {mapping.shape}.")
    if not jnp.issubdtype(mapping.dtype, jnp.integer):
        raise TypeError(f"mapping must hold integer target ids, got {mapping.dtype}.")
    return _carry(top, mapping, unmapped == "renormalize")


@functools.partial(jax.jit, static_argnums=2)
def _carry(top: TopK, mapping: jax.Array, renormalize: bool) -> TopK:
    ids, lp = top.ids, top.log_probs
    valid = (ids >= 0) & (ids < mapping.shape[0])
    tgt = jnp.where(valid, mapping.astype(jnp.int32)[jnp.clip(ids, 0, mapping.shape[0] - 1)], -1)
    live = (tgt >= 0) & (lp > -jnp.inf)
    lp_live = jnp.where(live, lp, -jnp.inf)
    same = (tgt[..., :, None] == tgt[..., None, :]) & live[..., :, None] & live[..., None, :]
    k = ids.shape[-1]
    earlier = jnp.tril(jnp.ones((k, k), bool), -1)  # [a, b]: b before a
    dup = jnp.any(same & jnp.broadcast_to(earlier, same.shape), axis=-1)
    total = jax.nn.logsumexp(
        jnp.where(same, lp_live[..., None, :], -jnp.inf), axis=-1
    )
    keep = live & ~dup
    out_lp = jnp.where(keep, total, -jnp.inf)
    if renormalize:
        before = jax.nn.logsumexp(jnp.where(lp > -jnp.inf, lp, -jnp.inf), axis=-1, keepdims=True)
        after = jax.nn.logsumexp(out_lp, axis=-1, keepdims=True)
        shift = jnp.where(after > -jnp.inf, before - after, 0.0)
        out_lp = jnp.where(keep, out_lp + shift, -jnp.inf)
    out_ids = jnp.where(keep, tgt, -1)
    order = jnp.argsort(-out_lp, axis=-1, stable=True)
    return TopK(
        jnp.take_along_axis(out_ids, order, axis=-1), jnp.take_along_axis(out_lp, order, axis=-1)
    )


def dense_log_probs(top: TopK, vocab_size: int) -> jax.Array:
    r"""A :class:`~fusionjax.distill.TopK` written out densely: ``[..., vocab_size]``.

    Args:
      top: ``[..., k]`` truncated distribution; duplicate ids have their mass summed.
      vocab_size: ``V``; ids must be below it (empty slots, ``-1``, are skipped).

    Returns:
      ``[..., V]`` float32 log-probabilities, ``-inf`` at ids not in ``top``.

    Raises:
      ValueError: If ``vocab_size`` is not a positive int.
    """
    top = _check_top(top)
    validation.check_int("vocab_size", vocab_size, lower=1)
    return _dense(top, vocab_size)


@functools.partial(jax.jit, static_argnums=1)
def _dense(top: TopK, vocab_size: int) -> jax.Array:
    ids = top.ids[..., :, None]
    vocab = jnp.arange(vocab_size, dtype=jnp.int32)
    vocab = jnp.broadcast_to(vocab, ids.shape[:-1] + (vocab_size,))
    onehot = (ids == vocab) & (ids >= 0)
    return jax.nn.logsumexp(jnp.where(onehot, top.log_probs[..., :, None], -jnp.inf), axis=-2)


class ProjectionOutput(NamedTuple):
    """Teacher distributions on the target's positions.

    Attributes:
      top: :class:`~fusionjax.distill.TopK` ``[..., T, k]``; at a position with no teacher
        distribution, empty (or the one-hot fallback when one is given).
      where: ``[..., T]`` bool, True where a teacher distribution was carried.
    """

    top: TopK
    where: jax.Array


def project_positions(top: TopK, source_index, *, fallback_ids=None) -> ProjectionOutput:
    r"""Carries per-source-position distributions onto target positions (FuseLLM's rule).

    Target position :math:`j` takes the source distribution at
    ``source_index[..., j]`` (from :meth:`~fusionjax.distill.TokenAlignment.source_index`
    or :func:`~fusionjax.distill.stack_source_index`: the single source token aligned with
    it, or ``-1`` when it is aligned with several, or padding). FuseLLM gives a position
    without a single source a one-hot distribution on the target's own token; pass those
    tokens as ``fallback_ids`` to get it, or leave them out and mask with ``where``.

    Args:
      top: :class:`~fusionjax.distill.TopK` ``[..., S, k]`` per source position, already in
        target ids (:func:`carry_top_k`).
      source_index: ``[..., T]`` int source positions (``-1`` = none).
      fallback_ids: Optional ``[..., T]`` int target token ids for the one-hot fallback.

    Returns:
      :class:`ProjectionOutput` (``top [..., T, k]``, ``where [..., T]``).

    Raises:
      ValueError: If the batch shapes of ``top`` and ``source_index`` differ.
    """
    top = _check_top(top)
    idx = jnp.asarray(source_index)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"source_index must be integers, got {idx.dtype}.")
    if top.ids.ndim < 2 or idx.shape[:-1] != top.ids.shape[:-2]:
        raise ValueError(
            f"source_index [..., T] must share the batch shape of top [..., S, k]; got "
            f"{idx.shape} and {top.ids.shape}."
        )
    fb = None
    if fallback_ids is not None:
        fb = jnp.asarray(fallback_ids)
        if fb.shape != idx.shape:
            raise ValueError(
                f"fallback_ids must have the shape of source_index {idx.shape}, got {fb.shape}."
            )
        fb = fb.astype(jnp.int32)
    return _project(top, idx.astype(jnp.int32), fb)


@jax.jit
def _project(top: TopK, idx: jax.Array, fb: jax.Array | None) -> ProjectionOutput:
    s = top.ids.shape[-2]
    where = (idx >= 0) & (idx < s)
    gather = jnp.clip(idx, 0, s - 1)[..., None]
    ids = jnp.take_along_axis(top.ids, gather, axis=-2)
    lp = jnp.take_along_axis(top.log_probs, gather, axis=-2)
    k = ids.shape[-1]
    if fb is None:
        empty_ids = jnp.full_like(ids, -1)
        empty_lp = jnp.full_like(lp, -jnp.inf)
    else:
        first = jnp.broadcast_to(jnp.arange(k) == 0, ids.shape)
        empty_ids = jnp.where(first, jnp.broadcast_to(fb[..., None], ids.shape), -1)
        empty_lp = jnp.where(first, jnp.zeros_like(lp), -jnp.inf)
    ids = jnp.where(where[..., None], ids, empty_ids)
    lp = jnp.where(where[..., None], lp, empty_lp)
    return ProjectionOutput(TopK(ids, lp), where)
