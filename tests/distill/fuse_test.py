"""FuseLLM's fused teachers and objective: MinCE/AvgCE, top-k, masks, the λ-mix, errors."""

import jax
import numpy as np
import optax
import pytest

from fusionjax import distill
from tests._testing import F32
from tests._testing import np_log_softmax

M, B, L, V = 3, 2, 5, 7


# Test data is NumPy (passed straight to the library): an eager jnp op in a test would
# compile a small kernel per shape, which costs more than the functions under test.


def _normal(seed, shape, scale=2.0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


def _labels(seed, shape=(B, L)):
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


def _log_softmax(x):
    return np_log_softmax(x).astype(np.float32)


def _top_k(x, k):
    """NumPy twin of distill.top_k (most likely first)."""
    ids = np.argsort(-np.asarray(x), axis=-1, kind="stable")[..., :k]
    return distill.TopK(ids.astype(np.int32), np.take_along_axis(np.asarray(x), ids, -1))


def _close(a, b, **tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **(tol or F32))


def _dense_from_topk(t, v=V):
    """Scatter-add a TopK into a dense [..., V] probability array (NumPy)."""
    ids, lp = np.asarray(t.ids), np.asarray(t.log_probs, np.float64)
    out = np.zeros(ids.shape[:-1] + (v,))
    for idx in np.ndindex(ids.shape[:-1]):
        for j in range(ids.shape[-1]):
            if ids[idx + (j,)] >= 0:
                out[idx + (ids[idx + (j,)],)] += np.exp(lp[idx + (j,)])
    return out


# ---------------------------------------------------------------- sequence cross-entropy


def test_sequence_ce_matches_numpy_with_mask_and_ignored_labels():
    x, y = _normal(0, (M, B, L, V)), _labels(1)
    y[0, 1] = -100  # ignored like Hugging Face's padding label
    where = np.ones((B, L), bool)
    where[1, 3:] = False
    got = distill.sequence_cross_entropy(x, y, where=where)
    lp = np_log_softmax(x)
    counted = where & (y >= 0)
    want = np.zeros((M, B))
    for m in range(M):
        for b in range(B):
            ts = np.nonzero(counted[b])[0]
            want[m, b] = -np.mean([lp[m, b, t, y[b, t]] for t in ts])
    _close(got, want, rtol=1e-5, atol=1e-5)
    # One teacher at a time gives that teacher's row.
    _close(distill.sequence_cross_entropy(x[1], y, where=where), np.asarray(got)[1])


def test_sequence_ce_of_top_k_teachers():
    x, y = _log_softmax(_normal(2, (M, B, L, V))), _labels(3)
    dense = distill.sequence_cross_entropy(x, y)
    # k = V keeps everything: the same CE.
    _close(distill.sequence_cross_entropy(_top_k(x, V), y), dense, rtol=1e-5, atol=1e-5)
    # k < V: labels in the top k read their log-prob; the others share the leftover mass.
    k = 3
    t = _top_k(x, k)
    got = distill.sequence_cross_entropy(t, y, vocab_size=V)
    ids, lp = t.ids, t.log_probs.astype(np.float64)
    want = np.zeros((M, B))
    for m, b in np.ndindex(M, B):
        terms = []
        for s in range(L):
            hit = np.nonzero(ids[m, b, s] == y[b, s])[0]
            if hit.size:
                terms.append(lp[m, b, s, hit[0]])
            else:
                terms.append(np.log((1 - np.exp(lp[m, b, s]).sum()) / (V - k)))
        want[m, b] = -np.mean(terms)
    _close(got, want, rtol=1e-5, atol=1e-5)
    # Without vocab_size the whole leftover mass is charged: a lower CE.
    assert np.all(np.asarray(distill.sequence_cross_entropy(t, y)) <= np.asarray(got) + 1e-6)


# ----------------------------------------------------------------------------- MinCE


def test_min_ce_picks_the_lowest_ce_teacher_per_sequence():
    x, y = _normal(4, (M, B, L, V)), _labels(5)
    ce = np.asarray(distill.sequence_cross_entropy(x, y))
    fused = np.asarray(distill.fuse_teachers(x, ce, method="min_ce"))
    best = np.argmin(ce, axis=0)
    for b in range(B):
        _close(fused[b], np_log_softmax(x[best[b], b]), rtol=1e-5, atol=1e-5)
    w = distill.teacher_weights(ce, method="min_ce")
    np.testing.assert_array_equal(np.asarray(w), np.eye(M)[best].T)


def test_min_ce_equals_a_dominant_teacher_dense_and_top_k():
    y = _labels(6)
    good = np.log(np.eye(V)[y] * 0.9 + 0.1 / V).astype(np.float32)  # 0.9 on the labels
    x = np.stack([_normal(7, (B, L, V)), good, _normal(8, (B, L, V))])
    ce = np.asarray(distill.sequence_cross_entropy(x, y))
    assert np.all(np.argmin(ce, axis=0) == 1)
    _close(distill.fuse_teachers(x, ce, method="min_ce"), np_log_softmax(good), atol=1e-5)
    fused = distill.fuse_teachers(_top_k(x, 3), ce, method="min_ce", temperature=0.5)
    want = _top_k(good, 3)
    np.testing.assert_array_equal(np.asarray(fused.ids), want.ids)
    _close(fused.log_probs, np_log_softmax(want.log_probs / 0.5), atol=1e-5)


def test_min_ce_skips_a_teacher_with_no_mass_at_a_position():
    t = _top_k(_log_softmax(_normal(9, (M, B, L, V))), 3)
    ids, lp = t.ids.copy(), t.log_probs.copy()
    ids[0, 0, 1], lp[0, 0, 1] = -1, -np.inf  # the best teacher has nothing at position 1
    ce = np.array([[0.5, 0.5], [1.5, 1.5], [2.5, 2.5]], np.float32)
    fused = distill.fuse_teachers(distill.TopK(ids, lp), ce)
    fused_ids = np.asarray(fused.ids)
    np.testing.assert_array_equal(fused_ids[0, 0], ids[0, 0, 0])
    np.testing.assert_array_equal(fused_ids[0, 1], ids[1, 0, 1])


# ----------------------------------------------------------------------------- AvgCE


@pytest.mark.parametrize("weighting", ["softmax_reward", "normalized_reward"])
def test_avg_ce_weights_sum_to_one_and_follow_the_reward(weighting):
    ce = np.abs(_normal(10, (M, B)))
    w = np.asarray(distill.teacher_weights(ce, method="avg_ce", weighting=weighting))
    _close(w.sum(0), np.ones(B))
    r = np.exp(-ce.astype(np.float64))
    want = np.exp(r) / np.exp(r).sum(0) if weighting == "softmax_reward" else r / r.sum(0)
    _close(w, want, rtol=1e-5, atol=1e-6)
    # Lower CE, higher weight.
    for b in range(B):
        order = np.argsort(ce[:, b])
        assert np.all(np.diff(w[order, b]) <= 1e-7)


def test_avg_ce_is_the_weighted_mixture_and_order_invariant():
    x, y = _normal(11, (M, B, L, V)), _labels(12)
    ce = np.asarray(distill.sequence_cross_entropy(x, y))
    fused = distill.fuse_teachers(x, ce, method="avg_ce", temperature=2.0)
    w = np.asarray(distill.teacher_weights(ce, method="avg_ce"), np.float64)
    want = np.einsum("mb,mblv->blv", w, np.exp(np_log_softmax(x / 2.0)))
    _close(np.exp(np.asarray(fused)), want, rtol=1e-5, atol=1e-6)
    perm = np.array([2, 0, 1])
    _close(distill.fuse_teachers(x[perm], ce[perm], method="avg_ce", temperature=2.0), fused)


def test_equal_teachers_give_the_same_distribution():
    x = _normal(13, (B, L, V))
    stacked = np.stack([x, x, x])
    ce = np.abs(_normal(14, (M, B)))
    for method in ("min_ce", "avg_ce"):
        _close(distill.fuse_teachers(stacked, ce, method=method), np_log_softmax(x), atol=2e-6)
    t = _top_k(stacked, 3)
    fused = distill.fuse_teachers(t, ce, method="avg_ce")
    assert fused.ids.shape == (B, L, M * 3)
    one = distill.TopK(t.ids[0], np_log_softmax(t.log_probs[0]))
    _close(_dense_from_topk(fused), _dense_from_topk(one), atol=1e-6)
    assert np.all(np.asarray(fused.ids)[..., 3:] == -1)  # repeated ids merged into one slot


def test_avg_ce_on_top_k_teachers_matches_the_dense_mixture():
    x, y = _normal(15, (M, B, L, V)), _labels(16)
    ce = np.asarray(distill.sequence_cross_entropy(x, y))
    dense = distill.fuse_teachers(x, ce, method="avg_ce", weighting="normalized_reward")
    fused = distill.fuse_teachers(_top_k(x, V), ce, method="avg_ce",
                                  weighting="normalized_reward")
    _close(_dense_from_topk(fused), np.exp(np.asarray(dense)), atol=1e-6)
    lp = np.maximum(np.asarray(fused.log_probs), -1e30)
    assert np.all(np.diff(lp, axis=-1) <= 1e-7)  # most likely first
    ids = np.asarray(fused.ids)
    for idx in np.ndindex(ids.shape[:-1]):
        live = ids[idx][ids[idx] >= 0]
        assert live.size == np.unique(live).size == V


# ------------------------------------------------------------------------ the losses


def test_fusion_loss_has_zero_gradient_when_the_student_is_the_target():
    grad = jax.jit(jax.grad(distill.fusion_loss), static_argnames="kind")
    z = _normal(17, (B, L, V))
    target = _log_softmax(z)
    for kind in ("ce", "kl"):
        _close(grad(z, target, kind=kind), np.zeros(z.shape), atol=1e-6)
    assert abs(float(distill.fusion_loss(z, target, kind="kl"))) < 1e-5
    # Against a top-k target the student equal to the renormalised top k has zero gradient,
    # and a different student a non-zero one.
    t = _top_k(target, 3)
    student = _dense_from_topk(distill.TopK(t.ids, np_log_softmax(t.log_probs)))
    student = np.log(np.maximum(student, 1e-30)).astype(np.float32)
    _close(grad(student, t, kind="kl"), np.zeros(z.shape), atol=1e-5)
    assert float(np.abs(np.asarray(grad(z, t, kind="kl"))).max()) > 1e-3


def test_masks_drop_positions():
    z, p = _normal(18, (B, L, V)), _log_softmax(_normal(19, (B, L, V)))
    where = np.broadcast_to(np.arange(L) < 3, (B, L))
    moved = z.copy()
    moved[:, 3:] = 100.0 * _normal(20, (B, L - 3, V))
    y = _labels(21)
    got = [distill.fusion_loss(zz, p, where=where) for zz in (z, moved)]
    _close(got[1], got[0])
    _close(got[0], _np_masked_ce(z, p, where), rtol=1e-5)
    clm = [distill.clm_loss(zz, y, where=where) for zz in (z, moved)]
    _close(clm[1], clm[0])
    _close(clm[0], -np.take_along_axis(np_log_softmax(z), y[..., None], -1)[..., 0][where].mean(),
           rtol=1e-5)


def _np_masked_ce(z, logp, where):
    per_pos = -(np.exp(logp.astype(np.float64)) * np_log_softmax(z)).sum(-1)
    return per_pos[where].mean()


def test_fusellm_loss_mixes_clm_and_fusion():
    z, y = _normal(22, (B, L, V)), _labels(23)
    fused = distill.fuse_teachers(_normal(24, (M, B, L, V)), np.abs(_normal(25, (M, B))))
    loss = jax.jit(lambda zz, lam: distill.fusellm_loss(zz, y, fused, lam=lam))
    # optax's CE jitted: one program, not its ops one by one
    clm = jax.jit(lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y).mean())(z, y)
    out1, out0, mixed = loss(z, 1.0), loss(z, 0.0), loss(z, 0.25)
    _close(out1.loss, clm, rtol=1e-6)
    _close(out1.clm, clm, rtol=1e-6)
    _close(out0.loss, _np_masked_ce(z, np.asarray(fused), np.ones((B, L), bool)), rtol=1e-5)
    _close(mixed.loss, 0.25 * np.asarray(mixed.clm) + 0.75 * np.asarray(mixed.fusion), rtol=1e-6)

    def objective(zz):
        out = distill.fusellm_loss(zz, y, fused, lam=0.9)
        return out.loss, out

    (val, aux), g = jax.jit(jax.value_and_grad(objective, has_aux=True))(z)
    assert isinstance(aux, distill.FuseLLMOutput) and np.isfinite(float(val))
    assert np.all(np.isfinite(np.asarray(g)))
    # A top-k fused target works the same way.
    t = distill.fuse_teachers(_top_k(_normal(26, (M, B, L, V)), 3), np.zeros((M, B), np.float32),
                              method="avg_ce")
    out = distill.fusellm_loss(z, y, t, lam=0.5)
    _close(out.fusion, distill.fusion_loss(z, t), rtol=1e-6)


# ---------------------------------------------------------------------------- errors


def test_bad_input_raises_clear_errors():
    z, y = _normal(27, (B, L, V)), _labels(28)
    x, p = _normal(29, (M, B, L, V)), _log_softmax(z)
    ce = np.zeros((M, B), np.float32)
    with pytest.raises(ValueError, match="lam"):
        distill.fusellm_loss(z, y, p, lam=1.5)
    with pytest.raises(ValueError, match="where"):
        distill.fusion_loss(z, p, where=np.ones((B, L + 1), bool))
    with pytest.raises(TypeError, match="where"):
        distill.clm_loss(z, y, where=np.ones((B, L), np.float32))
    with pytest.raises(ValueError, match="vocabulary"):
        distill.fusion_loss(z, np.zeros((B, L, V + 1), np.float32))
    with pytest.raises(ValueError, match="ce"):
        distill.fuse_teachers(x, np.zeros((M + 1, B), np.float32))
    with pytest.raises(ValueError, match="method"):
        distill.fuse_teachers(x, ce, method="max_ce")
    with pytest.raises(ValueError, match="temperature"):
        distill.fuse_teachers(x, ce, temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        distill.sequence_cross_entropy(x, y[:, :-1])
    with pytest.raises(TypeError, match="labels"):
        distill.sequence_cross_entropy(x, y.astype(np.float32))
    with pytest.raises(ValueError, match="vocab_size"):
        distill.sequence_cross_entropy(_top_k(x, 3), y, vocab_size=2)
    with pytest.raises(ValueError, match="kind"):
        distill.fusion_loss(z, p, kind="js")
