"""Tests of the token -> next-byte distribution conversion (fusionjax.distill._bytes)."""

import time

import numpy as np
import pytest

from fusionjax.distill import TopK
from fusionjax.distill import next_byte_distributions
from fusionjax.distill import token_bytes

VOCAB = [b"a", b"b", b"c", b"ab", b"abc", b"ba", b"bb", b"cab", b"ca"]


def _tokenize(text, vocab):
    """Greedy longest-match tokenization (any tokenization that concatenates to the text)."""
    out, i = [], 0
    while i < len(text):
        best = max((t for t, s in enumerate(vocab) if text.startswith(s, i)), key=lambda t: len(vocab[t]))
        out.append(best)
        i += len(vocab[best])
    return out


def _brute(teacher_ids, teacher_lp, tokens, vocab, text):
    """Per byte j: {byte: prob} of byte j+1 by direct enumeration over the teacher's slots."""
    starts = np.cumsum([0] + [len(vocab[t]) for t in tokens])
    rows = []
    for j in range(len(text)):
        m = j + 1
        if m >= len(text):
            rows.append(None)
            continue
        i = int(np.searchsorted(starts, m, side="right")) - 1
        if i == 0:
            rows.append(None)
            continue
        u = text[starts[i] : m]
        dist = {}
        for t, lp in zip(teacher_ids[i - 1], teacher_lp[i - 1], strict=True):
            if t < 0 or not np.isfinite(lp):
                continue
            s = vocab[t]
            if len(s) > len(u) and s.startswith(u):
                dist[s[len(u)]] = dist.get(s[len(u)], 0.0) + float(np.exp(lp))
        total = sum(dist.values())
        rows.append({b: p / total for b, p in dist.items()} if total > 0 else None)
    return rows


@pytest.mark.parametrize("k", [1, 3, 9])
def test_matches_brute_force_enumeration(k):
    rng = np.random.default_rng(k)
    vocab = token_bytes(VOCAB)
    for _ in range(20):
        text = bytes(rng.choice(list(b"abc"), size=12).astype(np.uint8))
        tokens = _tokenize(text, VOCAB)
        logits = rng.normal(size=(len(tokens), len(VOCAB))) * 2
        lp = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
        ids = np.argsort(-lp, -1)[:, :k]
        tlp = np.take_along_axis(lp, ids, -1)
        out = next_byte_distributions(
            TopK(ids, tlp), np.asarray(tokens), vocab, num_bytes=len(text)
        )
        want = _brute(ids, tlp, tokens, VOCAB, text)
        for j, row in enumerate(want):
            assert bool(out.where[j]) == (row is not None), (text, j)
            if row is None:
                assert np.all(out.targets.ids[j] == -1)
                continue
            got = {
                int(b): float(np.exp(p))
                for b, p in zip(out.targets.ids[j], out.targets.log_probs[j], strict=True)
                if b >= 0
            }
            assert set(got) == set(row), (text, j)
            for b in row:
                np.testing.assert_allclose(got[b], row[b], rtol=1e-5)
            # Sums to one, most likely first, empty slots at the end.
            np.testing.assert_allclose(sum(got.values()), 1.0, rtol=1e-5)
            lps = out.targets.log_probs[j]
            assert np.all(np.diff(lps[np.isfinite(lps)]) <= 0)


def test_one_hot_teacher_gives_the_true_next_byte():
    rng = np.random.default_rng(0)
    vocab = token_bytes(VOCAB)
    text = bytes(rng.choice(list(b"abc"), size=40).astype(np.uint8))
    tokens = np.asarray(_tokenize(text, VOCAB))
    # Slot 0 holds the true next token; the other slots hold tokens of zero mass.
    ids = np.stack([np.r_[tokens[1:], 0], np.full(len(tokens), 2)], -1)
    lps = np.stack([np.zeros(len(tokens)), np.full(len(tokens), -np.inf)], -1)
    out = next_byte_distributions(TopK(ids, lps), tokens, vocab, num_bytes=len(text))
    first = len(VOCAB[tokens[0]])
    expect = np.zeros(len(text), bool)
    expect[first - 1 : len(text) - 1] = True  # every byte after the first token
    np.testing.assert_array_equal(out.where, expect)
    rows = np.flatnonzero(expect)
    np.testing.assert_array_equal(out.targets.ids[rows, 0], np.frombuffer(text, np.uint8)[rows + 1])
    np.testing.assert_array_equal(out.targets.log_probs[rows, 0], 0.0)


def test_batched_rows_with_padding_equal_row_by_row():
    rng = np.random.default_rng(1)
    vocab = token_bytes(VOCAB)
    texts = [bytes(rng.choice(list(b"abc"), size=10).astype(np.uint8)) for _ in range(4)]
    toks = [_tokenize(t, VOCAB) for t in texts]
    t_max = max(map(len, toks))
    tokens = np.full((4, t_max), -1)
    lp = rng.normal(size=(4, t_max, 4)).astype(np.float32)
    ids = rng.integers(0, len(VOCAB), size=(4, t_max, 4))
    for r, t in enumerate(toks):
        tokens[r, : len(t)] = t
    out = next_byte_distributions(TopK(ids, lp), tokens, vocab, num_bytes=10)
    for r, t in enumerate(toks):
        one = next_byte_distributions(
            TopK(ids[r, : len(t)], lp[r, : len(t)]), np.asarray(t), vocab, num_bytes=10
        )
        np.testing.assert_array_equal(out.where[r], one.where)
        np.testing.assert_array_equal(out.targets.ids[r], one.targets.ids)
        np.testing.assert_allclose(out.targets.log_probs[r], one.targets.log_probs, rtol=1e-6)


def test_masks_positions_without_a_consistent_slot():
    vocab = token_bytes(VOCAB)
    tokens = np.asarray([0, 4])  # "a", "abc"
    # The teacher ranks only "b" and "c" after "a": inside "abc" nothing is consistent.
    teacher = TopK(np.asarray([[1, 2], [0, 1]]), np.log(np.asarray([[0.5, 0.5], [0.5, 0.5]])))
    out = next_byte_distributions(teacher, tokens, vocab, num_bytes=4)
    # byte 1 (token start): b or c; bytes 2, 3 (inside "abc", prefix "a"/"ab"): none.
    np.testing.assert_array_equal(out.where, [True, False, False, False])
    assert sorted(out.targets.ids[0].tolist()) == [98, 99]


def test_rejects_bad_input():
    vocab = token_bytes(VOCAB)
    good = TopK(np.zeros((3, 2), np.int32), np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="tokens"):
        next_byte_distributions(good, np.zeros(4, np.int32), vocab, num_bytes=3)
    with pytest.raises(ValueError, match="num_bytes"):
        next_byte_distributions(good, np.zeros(3, np.int32), vocab, num_bytes=0)
    with pytest.raises(ValueError, match="vocabulary size"):
        next_byte_distributions(good, np.full(3, 99), vocab, num_bytes=3)
    with pytest.raises(ValueError, match="log_probs"):
        next_byte_distributions(TopK(good.ids, good.log_probs[:, :1]), np.zeros(3), vocab, num_bytes=3)
    with pytest.raises(ValueError, match="vocab"):
        token_bytes([])
    with pytest.raises(ValueError, match=r"vocab\[1\]"):
        token_bytes([b"a", b""])


def test_throughput_is_host_speed():
    """About 10^5-10^6 byte positions per second (k = 8); asserted loosely (shared cores)."""
    rng = np.random.default_rng(0)
    vocab = token_bytes(VOCAB)
    texts = [bytes(rng.choice(list(b"abc"), size=64).astype(np.uint8)) for _ in range(256)]
    toks = [_tokenize(t, VOCAB) for t in texts]
    tokens = np.full((256, 64), -1)
    for r, t in enumerate(toks):
        tokens[r, : len(t)] = t
    teacher = TopK(rng.integers(0, len(VOCAB), (256, 64, 8)), rng.normal(size=(256, 64, 8)))
    t0 = time.perf_counter()
    next_byte_distributions(teacher, tokens, vocab, num_bytes=64)
    rate = 256 * 64 / (time.perf_counter() - t0)
    assert rate > 2e4, rate
