"""Vocabulary mapping: exact, MinED, statistical; top-k carried; positions projected."""

import random

import jax
import numpy as np
import pytest

from fusionjax import distill
from tests._testing import np_log_softmax
from tests._testing import np_logsumexp


def _levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def _vocab(r, n, alphabet="abcd"):
    return ["".join(r.choice(alphabet) for _ in range(r.randint(1, 5))) for _ in range(n)]


def test_exact_ids():
    src = ["Ġthe", "▁cat", "##s", "dog", "Ġthe"]
    tgt = ["s", " cat", " the", " the", "x"]
    np.testing.assert_array_equal(distill.map_vocab(src, tgt), [2, 1, 0, -1, 2])
    np.testing.assert_array_equal(distill.map_vocab(src, tgt, normalize=None), [-1, -1, -1, -1, -1])


def test_min_edit_matches_brute_force():
    r = random.Random(0)
    src, tgt = _vocab(r, 70), _vocab(r, 90)
    got = distill.map_vocab(src, tgt, method="min_edit", chunk=16)
    for v, u in enumerate(got.tolist()):
        d = [_levenshtein(src[v], t) for t in tgt]
        assert u == d.index(min(d)), (src[v], tgt[u])  # ties to the smallest target id


def test_statistical_map_recovers_planted_mapping():
    rng = np.random.default_rng(0)
    vs, vt = 30, 12
    planted = rng.integers(0, vt, vs)
    sources, targets, aligns = [], [], []
    for _ in range(40):
        s = rng.integers(0, vs, 50)
        # 80% of positions carry the planted target id, 20% a random one.
        t = np.where(rng.random(50) < 0.8, planted[s], rng.integers(0, vt, 50))
        sources.append(s)
        targets.append(t)
        aligns.append(np.stack([np.arange(50), np.arange(50)], 1))
    out = distill.statistical_map(sources, targets, aligns, source_vocab_size=vs, target_vocab_size=vt)
    np.testing.assert_array_equal(out.mapping, planted)
    dense = out.dense(vt)
    np.testing.assert_allclose(dense.sum(1), 1.0, rtol=1e-6)
    assert np.all(dense[np.arange(vs), planted] > 0.6)
    # Counts are the co-occurrences, summed over all pairs.
    assert out.count.sum() == 40 * 50


def test_statistical_map_from_alignments():
    s_ids, t_ids = [5, 6, 7], [1, 2, 3, 4]
    al = distill.align_tokens(["Ġknowledge", "Ġfusion", "Ġof"], ["Ġknow", "ledge", "Ġfusion", "Ġof"])
    out = distill.statistical_map([s_ids], [t_ids], [al], source_vocab_size=8, target_vocab_size=5)
    np.testing.assert_array_equal(out.mapping, [-1, -1, -1, -1, -1, 1, 3, 4])  # 5 -> {1, 2}: tie
    one = distill.statistical_map(
        [s_ids], [t_ids], [al], source_vocab_size=8, target_vocab_size=5, one_to_one=True
    )
    np.testing.assert_array_equal(one.mapping, [-1, -1, -1, -1, -1, -1, 3, 4])


@pytest.mark.parametrize("jit", [False, True])
def test_carry_top_k_sums_mass(jit):
    # Data drawn and log-softmaxed in NumPy, put on the device: no programs per shape.
    x = 3.0 * np.random.default_rng(0).standard_normal((4, 6, 20))
    log_probs = jax.device_put(np_log_softmax(x).astype(np.float32))
    top = distill.top_k(log_probs, 8)
    mapping = jax.device_put(np.array([i % 7 if i % 5 else -1 for i in range(20)], np.int32))
    fn = jax.jit(distill.carry_top_k, static_argnames="unmapped") if jit else distill.carry_top_k
    out = fn(top, mapping)
    # Reference: dense scatter-add of the kept mass into target ids.
    p = np.exp(np.asarray(top.log_probs, np.float64))
    tgt = np.asarray(mapping)[np.asarray(top.ids)]
    want = np.zeros((4, 6, 7))
    for idx in np.ndindex(4, 6):
        for slot in range(8):
            if tgt[idx][slot] >= 0:
                want[idx][tgt[idx][slot]] += p[idx][slot]
    got = np.exp(np.asarray(distill.dense_log_probs(out, 7), np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    ids = np.asarray(out.ids)
    for idx in np.ndindex(4, 6):  # no duplicates, empty slots last and -inf
        live = ids[idx][ids[idx] >= 0]
        assert len(set(live.tolist())) == len(live)
        assert np.all(np.diff(np.exp(np.asarray(out.log_probs)[idx])) <= 0)
        assert np.all(np.isneginf(np.asarray(out.log_probs)[idx][ids[idx] < 0]))
    ren = fn(top, mapping, unmapped="renormalize")
    np.testing.assert_allclose(np_logsumexp(ren.log_probs), np_logsumexp(top.log_probs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_project_positions_follows_alignment(jit):
    al = distill.align_tokens(["Ġknowledge", "Ġfusion", "Ġof", "Ġlarg", "e"],
                              ["Ġknow", "ledge", "Ġfusion", "Ġof", "Ġlarge"])
    idx = al.source_index()
    np.testing.assert_array_equal(idx, [0, 0, 1, 2, -1])
    ids = np.arange(5 * 3, dtype=np.int32).reshape(5, 3)
    put = jax.device_put  # host data onto the device, no copy program per shape
    top = distill.TopK(put(ids), put(np.log(np.full((5, 3), 0.3, np.float32))))
    fn = jax.jit(distill.project_positions) if jit else distill.project_positions
    out = fn(top, put(np.asarray(idx)))
    out_ids, out_lp = np.asarray(out.top.ids), np.asarray(out.top.log_probs)  # indexed on the host
    np.testing.assert_array_equal(out.where, [True, True, True, True, False])
    np.testing.assert_array_equal(out_ids[:4], ids[np.array([0, 0, 1, 2])])
    np.testing.assert_array_equal(out_ids[4], [-1, -1, -1])
    assert np.all(np.isneginf(out_lp[4]))
    fb = fn(top, put(np.asarray(idx)), fallback_ids=put(np.array([9, 9, 9, 9, 42], np.int32)))
    fb_ids = np.asarray(fb.top.ids)
    np.testing.assert_array_equal(fb_ids[4], [42, -1, -1])
    assert float(np.asarray(fb.top.log_probs)[4, 0]) == 0.0
    np.testing.assert_array_equal(fb_ids[:4], out_ids[:4])


def test_bad_input():
    zeros = lambda *shape, dtype=np.float32: jax.device_put(np.zeros(shape, dtype))  # noqa: E731
    top = distill.TopK(zeros(2, 3, dtype=np.int32), zeros(2, 3))
    with pytest.raises(ValueError, match="source_vocab is empty"):
        distill.map_vocab([], ["a"])
    with pytest.raises(ValueError, match="method"):
        distill.map_vocab(["a"], ["a"], method="fuzzy")
    with pytest.raises(ValueError, match="unmapped"):
        distill.carry_top_k(top, zeros(3, dtype=np.int32), unmapped="keep")
    with pytest.raises(TypeError, match="mapping must hold integer"):
        distill.carry_top_k(top, zeros(3))
    with pytest.raises(TypeError, match="top must be a TopK"):
        distill.carry_top_k((top.ids, top.log_probs), zeros(3, dtype=np.int32))
    with pytest.raises(ValueError, match="source_index"):
        distill.project_positions(top, zeros(4, 5, dtype=np.int32))
    with pytest.raises(ValueError, match="target_ids\\[0\\] has ids outside"):
        distill.statistical_map([[0]], [[7]], [[[0, 0]]], source_vocab_size=2, target_vocab_size=3)
    with pytest.raises(ValueError, match="one entry per sequence"):
        distill.statistical_map([[0]], [], [], source_vocab_size=2, target_vocab_size=3)
