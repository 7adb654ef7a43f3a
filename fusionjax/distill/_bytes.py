r"""A token-level teacher's next-token distributions as next-*byte* distributions.

The right vocabulary mapping for a byte-level student is no mapping at all: every token is
a string of bytes, so a teacher's distribution over its next token determines its
distribution over the next byte. At byte :math:`j` of a text tokenized by the teacher as
:math:`t_1 t_2 \dots`, let :math:`t_i` be the token that holds byte :math:`j`, starting at
byte :math:`s_i`, and :math:`u = x_{s_i} \dots x_{j-1}` the part of it already seen
(empty when :math:`j = s_i`). With :math:`p(t)` the teacher's distribution over
:math:`t_i` given :math:`t_{<i}`,

.. math::
  q(b \mid x_{<j}) \;=\; \frac{\sum_{t:\ t \sqsupseteq u b} p(t)}
                             {\sum_{t:\ t \sqsupseteq u,\ |t| > |u|} p(t)},

sums over the tokens that begin with :math:`u b` (resp. with :math:`u` and are longer):
at a token boundary the mass of every token whose first byte is :math:`b`, inside a token
the teacher's distribution conditioned on the token's bytes seen so far. Tokens equal to
:math:`u` are left out of both sums: after them the next byte would start a *new* token,
whose distribution needs another teacher call with :math:`u` as the last token (the
"prompt boundary" case of Lundberg's token healing); the conversion is exact for the
next byte given the prefix *and* that the current token continues, which is what the
teacher's own tokenization of the text says it does. That condition is a small leak: a
tokenization depends on the bytes that follow (BPE merges ``th`` + ``en`` only when ``en``
follows), so the targets know a little more than the prefix. Measured on the knowledge
testbed (docs teacher, docs training text): its byte targets give the true next byte
2.42 bits on average, below the teacher's own 2.84 bits per byte over whole windows; a
student trained on them gains less than from a byte-level teacher's own distributions
(:mod:`tests.distill.testbed_evidence_test`). Exact byte-level probabilities need a
teacher call per alternative tokenization (Phan et al. 2024, "Exact Byte-Level
Probabilities from Tokenized Language Models"); this conversion makes none.

The teacher's distribution comes as a :class:`fusionjax.distill.TopK` (FuseLLM keeps the
top 10 of each position); the sums run over its slots. A position where no slot is
consistent with :math:`u` (the teacher did not rank its own token among the top ``k``),
the teacher's first token (nothing predicts it) and bytes past the last complete token are
masked out. Candidates are compared by prefix through a trie of the vocabulary: every
``(token, length)`` gets the id of its prefix of that length, so "``t`` begins with
``u``" is one integer comparison, and the whole conversion is a few gathers over
``[positions, k]`` arrays.

What costs time, and what is done about it: nothing on the accelerator; it is host NumPy,
run once over a data set before training (as FuseLLM precomputes its teachers' logits).
The sums are one ``bincount`` over (position, byte value), so the cost is linear in
``positions x k`` and a teacher's *whole* vocabulary can be converted: that matters, since
cutting the teacher to its top 32 tokens first made the byte targets much worse (knowledge
testbed, docs teacher on docs text: 3.67 bits per byte against the true next byte with
the top 32 tokens, 2.42 with all 1024; 3.5 % of positions gave the true byte zero mass).
Rows are processed in chunks of about 4M candidate slots to bound memory. The trie is
built once per vocabulary (:func:`token_bytes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from fusionjax.distill._types import TopK

_NUM_BYTE_VALUES = 256


class TokenBytes(NamedTuple):
    """A vocabulary as byte strings, with the prefix trie :func:`next_byte_distributions` uses.

    Attributes:
      bytes: ``[V, L]`` int32, token ``t``'s bytes, ``-1`` past its end (``L`` the longest).
      lengths: ``[V]`` int32 byte lengths.
      prefix_ids: ``[V, L + 1]`` int32: ``prefix_ids[t, o]`` identifies the string of
        token ``t``'s first ``o`` bytes (equal ids, equal strings), ``-1`` for ``o > |t|``.
    """

    bytes: np.ndarray
    lengths: np.ndarray
    prefix_ids: np.ndarray


class ByteTargetsOutput(NamedTuple):
    """Next-byte distributions at every byte position.

    Attributes:
      targets: :class:`TopK` over bytes, ``ids [..., n, k]`` (byte values, ``-1`` empty)
        and ``log_probs [..., n, k]`` normalised over the slots (``-inf`` empty), most
        likely first. Row ``j`` is the distribution of byte ``j + 1`` given bytes ``<= j``
        (the convention of a causal model's logits).
      where: ``[..., n]`` bool, ``True`` where the row holds a distribution.
    """

    targets: TopK
    where: np.ndarray


def token_bytes(vocab: Sequence[bytes]) -> TokenBytes:
    r"""The byte matrix, lengths and prefix trie of a vocabulary.

    Args:
      vocab: Token ``t``'s byte string at index ``t`` (e.g. a byte-level BPE's tokens
        mapped back to bytes); tokens may not be empty.

    Returns:
      A :class:`TokenBytes`.

    Raises:
      ValueError: if ``vocab`` is empty or holds an empty or non-``bytes`` token.

    Examples:
      >>> tb = token_bytes([b"a", b"b", b"ab"])
      >>> tb.lengths.tolist(), bool(tb.prefix_ids[2, 1] == tb.prefix_ids[0, 1])
      ([1, 1, 2], True)
    """
    vocab = list(vocab)
    if not vocab:
        raise ValueError("vocab must hold at least one token")
    for t, s in enumerate(vocab):
        if not isinstance(s, (bytes, bytearray)) or not s:
            raise ValueError(f"vocab[{t}] must be a non-empty bytes string, got {s!r}")
    longest = max(len(s) for s in vocab)
    out = np.full((len(vocab), longest), -1, np.int32)
    prefix_ids = np.full((len(vocab), longest + 1), -1, np.int32)
    ids: dict[bytes, int] = {}
    for t, s in enumerate(vocab):
        out[t, : len(s)] = np.frombuffer(bytes(s), np.uint8)
        for o in range(len(s) + 1):
            prefix_ids[t, o] = ids.setdefault(bytes(s[:o]), len(ids))
    lengths = np.asarray([len(s) for s in vocab], np.int32)
    return TokenBytes(out, lengths, prefix_ids)


def next_byte_distributions(
    teacher: TopK,
    tokens: np.ndarray,
    vocab: TokenBytes,
    *,
    num_bytes: int,
    offsets: np.ndarray | None = None,
) -> ByteTargetsOutput:
    r"""Converts a teacher's top-``k`` next-token distributions to next-byte ones.

    See the module docstring for the formula. Host NumPy, vectorised over every position.

    Args:
      teacher: ``TopK(ids [..., T, k], log_probs [..., T, k])``: row ``i`` is the
        teacher's distribution of token ``i + 1`` given tokens ``<= i`` (a causal model's
        log-probabilities cut by :func:`fusionjax.distill.top_k`); need not be normalised.
      tokens: ``[..., T]`` the teacher's tokens of the text, ``-1`` for padding at the
        end of a row.
      vocab: The teacher's vocabulary (:func:`token_bytes`).
      num_bytes: ``n``, bytes of the text per row; rows of the output are byte positions.
      offsets: ``[..., T]`` byte offset of each token in the text; default: the
        cumulative byte lengths of the tokens (tokens that concatenate to the text, as a
        byte-level BPE's do).

    Returns:
      A :class:`ByteTargetsOutput` with ``[..., num_bytes, min(k, 256)]`` targets: the
      most likely bytes first (each slot proposes one byte, so at most ``k`` distinct).

    Raises:
      ValueError: on mismatched shapes, token ids out of the vocabulary, or ``num_bytes``
        below 1.

    Examples:
      >>> import numpy as np
      >>> from fusionjax.distill import TopK
      >>> vocab = token_bytes([b"a", b"b", b"ab"])
      >>> teacher = TopK(np.array([[2, 0], [0, 1]]), np.log(np.array([[0.6, 0.4], [0.5, 0.5]])))
      >>> out = next_byte_distributions(teacher, np.array([0, 2]), vocab, num_bytes=3)
      >>> out.where.tolist()  # "a" then "ab": byte 1 ("a") and byte 2 ("b", inside "ab")
      [True, True, False]
      >>> np.exp(out.targets.log_probs[0]).round(2).tolist(), out.targets.ids[1, 0].item()
      ([1.0, 0.0], 98)
    """
    ids = np.asarray(teacher.ids)
    lps = np.asarray(teacher.log_probs, np.float32)
    tokens = np.asarray(tokens)
    if ids.shape != lps.shape or ids.ndim < 2:
        raise ValueError(
            f"teacher ids and log_probs must share a shape [..., T, k], got {ids.shape} "
            f"and {lps.shape}"
        )
    if tokens.shape != ids.shape[:-1]:
        raise ValueError(f"tokens must be [..., T] = {ids.shape[:-1]}, got {tokens.shape}")
    if not isinstance(num_bytes, (int, np.integer)) or num_bytes < 1:
        raise ValueError(f"num_bytes must be a positive integer, got {num_bytes!r}")
    v = vocab.lengths.shape[0]
    if np.any(tokens >= v) or np.any(ids >= v):
        raise ValueError(f"tokens and teacher.ids must be < the vocabulary size {v}")
    batch, (t_len, k) = ids.shape[:-2], ids.shape[-2:]
    ids = ids.reshape(-1, t_len, k)
    lps = lps.reshape(-1, t_len, k)
    tokens = tokens.reshape(-1, t_len)
    if offsets is not None:
        offsets = np.asarray(offsets)
        if offsets.shape != tokens.shape and offsets.shape != (*batch, t_len):
            raise ValueError(f"offsets must be [..., T] = {(*batch, t_len)}, got {offsets.shape}")
        offsets = offsets.reshape(tokens.shape)
    width = min(k, _NUM_BYTE_VALUES)
    # Rows in chunks of about 2**22 candidate slots: the gathers are [rows, n, k] arrays.
    step = max(1, (1 << 22) // max(1, num_bytes * k))
    parts = [
        _convert(
            ids[r : r + step],
            lps[r : r + step],
            tokens[r : r + step],
            None if offsets is None else offsets[r : r + step],
            vocab,
            num_bytes,
            width,
        )
        for r in range(0, tokens.shape[0], step)
    ]
    out_ids = np.concatenate([q[0] for q in parts])
    out_lp = np.concatenate([q[1] for q in parts])
    where = np.concatenate([q[2] for q in parts])
    shape = (*batch, num_bytes)
    return ByteTargetsOutput(
        TopK(out_ids.reshape(*shape, width), out_lp.reshape(*shape, width)), where.reshape(shape)
    )


def _convert(ids, lps, tokens, starts, vocab, num_bytes, width):
    """:func:`next_byte_distributions` on ``[rows, T, k]`` arrays (one chunk of rows)."""
    rows, t_len, k = ids.shape
    valid_tok = tokens >= 0
    tok = np.where(valid_tok, tokens, 0)
    lengths = np.where(valid_tok, vocab.lengths[tok], 0)
    if starts is None:
        starts = np.cumsum(lengths, axis=-1) - lengths
    ends = starts + lengths
    # For every byte m (predicted by row j = m - 1): the token holding it and its offset.
    m = np.arange(num_bytes)
    cover = (starts[:, None, :] <= m[None, :, None]) & (m[None, :, None] < ends[:, None, :])
    cover &= valid_tok[:, None, :]
    holder = np.argmax(cover, axis=-1)  # [rows, n]
    held = np.any(cover, axis=-1) & (holder >= 1)  # the first token has no prediction
    offset = m[None, :] - np.take_along_axis(starts, holder, axis=-1)
    offset = np.where(held, offset, 0)
    own = np.take_along_axis(tok, holder, axis=-1)  # the token that holds byte m
    src = np.maximum(holder - 1, 0)  # the teacher row that predicts it
    cand = np.take_along_axis(ids, src[..., None], axis=1)  # [rows, n, k]
    cand_lp = np.take_along_axis(lps, src[..., None], axis=1)
    cand_ok = (cand >= 0) & np.isfinite(cand_lp)
    c = np.where(cand_ok, cand, 0)
    o = offset[..., None]
    prefix = vocab.prefix_ids
    consistent = cand_ok & (vocab.lengths[c] > o)
    consistent &= prefix[c, o] == prefix[own, offset][..., None]
    nxt = vocab.bytes[c, np.minimum(o, vocab.bytes.shape[1] - 1)]
    # Probabilities relative to the best consistent slot, summed per next byte value by
    # one bincount over (position, byte): O(positions * k), any k (a full vocabulary).
    top = np.max(np.where(consistent, cand_lp, -np.inf), axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    mass = np.where(consistent, np.exp(cand_lp - top), 0.0)
    positions = rows * num_bytes
    index = np.arange(positions).reshape(rows, num_bytes, 1) * _NUM_BYTE_VALUES + nxt
    bins = np.bincount(
        index[consistent], weights=mass[consistent], minlength=positions * _NUM_BYTE_VALUES
    ).reshape(rows, num_bytes, _NUM_BYTE_VALUES)
    total = np.sum(bins, axis=-1, keepdims=True)
    held &= total[..., 0] > 0
    order = np.argsort(-bins, axis=-1, kind="stable")[..., :width]
    kept = np.take_along_axis(bins, order, axis=-1)
    with np.errstate(divide="ignore"):
        out_lp = np.log(kept / np.where(total > 0, total, 1.0)).astype(np.float32)
    out_ids = np.where(kept > 0, order, -1).astype(np.int32)
    out_lp = np.where(held[..., None] & (kept > 0), out_lp, -np.inf).astype(np.float32)
    out_ids = np.where(held[..., None], out_ids, -1)
    # Row j predicts byte j + 1: shift left by one, the last row predicts past the text.
    out_lp = np.concatenate([out_lp[:, 1:], np.full((rows, 1, width), -np.inf, np.float32)], 1)
    out_ids = np.concatenate([out_ids[:, 1:], np.full((rows, 1, width), -1, np.int32)], 1)
    where = np.concatenate([held[:, 1:], np.zeros((rows, 1), bool)], 1)
    return out_ids, out_lp, where
