"""Vocabulary mapping: exact, MinED, statistical; top-k carried; positions projected."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import distill


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
    key = jax.random.key(0)
    log_probs = jax.nn.log_softmax(3.0 * jax.random.normal(key, (4, 6, 20)))
    top = distill.top_k(log_probs, 8)
    mapping = jnp.array([i % 7 if i % 5 else -1 for i in range(20)], jnp.int32)
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
    np.testing.assert_allclose(
        jax.nn.logsumexp(ren.log_probs, -1), jax.nn.logsumexp(top.log_probs, -1), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("jit", [False, True])
def test_project_positions_follows_alignment(jit):
    al = distill.align_tokens(["Ġknowledge", "Ġfusion", "Ġof", "Ġlarg", "e"],
                              ["Ġknow", "ledge", "Ġfusion", "Ġof", "Ġlarge"])
    idx = al.source_index()
    np.testing.assert_array_equal(idx, [0, 0, 1, 2, -1])
    ids = jnp.arange(5 * 3, dtype=jnp.int32).reshape(5, 3)
    top = distill.TopK(ids, jnp.log(jnp.full((5, 3), 0.3)))
    fn = jax.jit(distill.project_positions) if jit else distill.project_positions
    out = fn(top, jnp.asarray(idx))
    np.testing.assert_array_equal(out.where, [True, True, True, True, False])
    np.testing.assert_array_equal(out.top.ids[:4], ids[jnp.array([0, 0, 1, 2])])
    np.testing.assert_array_equal(out.top.ids[4], [-1, -1, -1])
    assert np.all(np.isneginf(out.top.log_probs[4]))
    fb = fn(top, jnp.asarray(idx), fallback_ids=jnp.array([9, 9, 9, 9, 42]))
    np.testing.assert_array_equal(fb.top.ids[4], [42, -1, -1])
    assert float(fb.top.log_probs[4, 0]) == 0.0
    np.testing.assert_array_equal(fb.top.ids[:4], out.top.ids[:4])


def test_bad_input():
    top = distill.TopK(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="source_vocab is empty"):
        distill.map_vocab([], ["a"])
    with pytest.raises(ValueError, match="method"):
        distill.map_vocab(["a"], ["a"], method="fuzzy")
    with pytest.raises(ValueError, match="unmapped"):
        distill.carry_top_k(top, jnp.zeros(3, jnp.int32), unmapped="keep")
    with pytest.raises(TypeError, match="mapping must hold integer"):
        distill.carry_top_k(top, jnp.zeros(3))
    with pytest.raises(TypeError, match="top must be a TopK"):
        distill.carry_top_k((top.ids, top.log_probs), jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="source_index"):
        distill.project_positions(top, jnp.zeros((4, 5), jnp.int32))
    with pytest.raises(ValueError, match="target_ids\\[0\\] has ids outside"):
        distill.statistical_map([[0]], [[7]], [[[0, 0]]], source_vocab_size=2, target_vocab_size=3)
    with pytest.raises(ValueError, match="one entry per sequence"):
        distill.statistical_map([[0]], [], [], source_vocab_size=2, target_vocab_size=3)
