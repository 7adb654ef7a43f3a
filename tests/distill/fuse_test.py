"""FuseLLM's fused teachers and objective: MinCE/AvgCE, top-k, masks, the λ-mix, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fusionjax import distill
from tests._testing import F32

M, B, L, V = 3, 2, 5, 7


def _normal(seed, shape, scale=2.0):  # NumPy draws: no random kernel to compile
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32) * scale)


def _labels(seed, shape=(B, L)):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def _close(a, b, **tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **(tol or F32))


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


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
    x, y = _normal(0, (M, B, L, V)), np.array(_labels(1))
    y[0, 1] = -100  # ignored like Hugging Face's padding label
    where = np.ones((B, L), bool)
    where[1, 3:] = False
    got = distill.sequence_cross_entropy(x, jnp.asarray(y), where=jnp.asarray(where))
    lp = _np_log_softmax(x)
    counted = where & (y >= 0)
    want = np.zeros((M, B))
    for m in range(M):
        for b in range(B):
            ts = np.nonzero(counted[b])[0]
            want[m, b] = -np.mean([lp[m, b, t, y[b, t]] for t in ts])
    _close(got, want, rtol=1e-5, atol=1e-5)
    # One teacher at a time gives that teacher's row.
    _close(distill.sequence_cross_entropy(x[1], jnp.asarray(y), where=jnp.asarray(where)), got[1])


def test_sequence_ce_of_top_k_teachers():
    x, y = jax.nn.log_softmax(_normal(2, (M, B, L, V))), _labels(3)
    dense = distill.sequence_cross_entropy(x, y)
    # k = V keeps everything: the same CE.
    _close(distill.sequence_cross_entropy(distill.top_k(x, V), y), dense, rtol=1e-5, atol=1e-5)
    # k < V: labels in the top k read their log-prob; the others share the leftover mass.
    k = 3
    t = distill.top_k(x, k)
    got = distill.sequence_cross_entropy(t, y, vocab_size=V)
    ids, lp, yy = np.asarray(t.ids), np.asarray(t.log_probs, np.float64), np.asarray(y)
    want = np.zeros((M, B))
    for m, b in np.ndindex(M, B):
        terms = []
        for s in range(L):
            hit = np.nonzero(ids[m, b, s] == yy[b, s])[0]
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
    ce = distill.sequence_cross_entropy(x, y)
    fused = distill.fuse_teachers(x, ce, method="min_ce")
    best = np.argmin(np.asarray(ce), axis=0)
    for b in range(B):
        _close(fused[b], jax.nn.log_softmax(x[best[b], b]), rtol=1e-5, atol=1e-5)
    w = distill.teacher_weights(ce, method="min_ce")
    np.testing.assert_array_equal(np.asarray(w), np.eye(M)[best].T)


def test_min_ce_equals_a_dominant_teacher_dense_and_top_k():
    y = _labels(6)
    good = jnp.log(jax.nn.one_hot(y, V) * 0.9 + 0.1 / V)  # [B, L, V]: puts 0.9 on the labels
    x = jnp.stack([_normal(7, (B, L, V)), good, _normal(8, (B, L, V))])
    ce = distill.sequence_cross_entropy(x, y)
    assert np.all(np.argmin(np.asarray(ce), axis=0) == 1)
    _close(distill.fuse_teachers(x, ce, method="min_ce"), jax.nn.log_softmax(good), atol=1e-5)
    fused = distill.fuse_teachers(distill.top_k(x, 3), ce, method="min_ce", temperature=0.5)
    want = distill.top_k(good, 3)
    np.testing.assert_array_equal(np.asarray(fused.ids), np.asarray(want.ids))
    _close(fused.log_probs, jax.nn.log_softmax(want.log_probs / 0.5), atol=1e-5)


def test_min_ce_skips_a_teacher_with_no_mass_at_a_position():
    x = jax.nn.log_softmax(_normal(9, (2, 1, 2, V)))
    t = distill.top_k(x, 2)
    ids = np.asarray(t.ids).copy()
    lp = np.asarray(t.log_probs).copy()
    ids[0, 0, 1], lp[0, 0, 1] = -1, -np.inf  # the best teacher has nothing at position 1
    ce = jnp.array([[0.5], [1.5]])
    fused = distill.fuse_teachers(distill.TopK(jnp.asarray(ids), jnp.asarray(lp)), ce)
    np.testing.assert_array_equal(np.asarray(fused.ids[0, 0]), ids[0, 0, 0])
    np.testing.assert_array_equal(np.asarray(fused.ids[0, 1]), ids[1, 0, 1])


# ----------------------------------------------------------------------------- AvgCE


@pytest.mark.parametrize("weighting", ["softmax_reward", "normalized_reward"])
def test_avg_ce_weights_sum_to_one_and_follow_the_reward(weighting):
    ce = jnp.abs(_normal(10, (M, B)))
    w = np.asarray(distill.teacher_weights(ce, method="avg_ce", weighting=weighting))
    _close(w.sum(0), np.ones(B))
    r = np.exp(-np.asarray(ce, np.float64))
    want = np.exp(r) / np.exp(r).sum(0) if weighting == "softmax_reward" else r / r.sum(0)
    _close(w, want, rtol=1e-5, atol=1e-6)
    # Lower CE, higher weight.
    for b in range(B):
        order = np.argsort(np.asarray(ce)[:, b])
        assert np.all(np.diff(w[order, b]) <= 1e-7)


def test_avg_ce_is_the_weighted_mixture_and_order_invariant():
    x, y = _normal(11, (M, B, L, V)), _labels(12)
    ce = distill.sequence_cross_entropy(x, y)
    fused = distill.fuse_teachers(x, ce, method="avg_ce", temperature=2.0)
    w = np.asarray(distill.teacher_weights(ce, method="avg_ce"), np.float64)
    want = np.einsum("mb,mblv->blv", w, np.exp(_np_log_softmax(np.asarray(x) / 2.0)))
    _close(jnp.exp(fused), want, rtol=1e-5, atol=1e-6)
    perm = np.array([2, 0, 1])
    _close(distill.fuse_teachers(x[perm], ce[perm], method="avg_ce", temperature=2.0), fused)


def test_equal_teachers_give_the_same_distribution():
    x = _normal(13, (B, L, V))
    stacked = jnp.stack([x, x, x])
    ce = jnp.abs(_normal(14, (M, B)))
    for method in ("min_ce", "avg_ce"):
        _close(distill.fuse_teachers(stacked, ce, method=method), jax.nn.log_softmax(x),
               atol=2e-6)
    t = distill.top_k(stacked, 4)
    fused = distill.fuse_teachers(t, ce, method="avg_ce")
    assert fused.ids.shape == (B, L, 3 * 4)
    _close(_dense_from_topk(fused), _dense_from_topk(
        distill.TopK(t.ids[0], jax.nn.log_softmax(t.log_probs[0]))), atol=1e-6)
    assert np.all(np.asarray(fused.ids)[..., 4:] == -1)  # repeated ids merged into one slot


def test_avg_ce_on_top_k_teachers_matches_the_dense_mixture():
    x, y = _normal(15, (M, B, L, V)), _labels(16)
    ce = distill.sequence_cross_entropy(x, y)
    dense = distill.fuse_teachers(x, ce, method="avg_ce", weighting="normalized_reward")
    fused = distill.fuse_teachers(distill.top_k(x, V), ce, method="avg_ce",
                                  weighting="normalized_reward")
    _close(_dense_from_topk(fused), jnp.exp(dense), atol=1e-6)
    lp = np.maximum(np.asarray(fused.log_probs), -1e30)
    assert np.all(np.diff(lp, axis=-1) <= 1e-7)  # most likely first
    ids = np.asarray(fused.ids)
    for idx in np.ndindex(ids.shape[:-1]):
        live = ids[idx][ids[idx] >= 0]
        assert live.size == np.unique(live).size == V


# ------------------------------------------------------------------------ the losses


def test_fusion_loss_has_zero_gradient_when_the_student_is_the_target():
    z = _normal(17, (B, L, V))
    target = jax.nn.log_softmax(z)
    for kind in ("ce", "kl"):
        g = jax.grad(distill.fusion_loss)(z, target, kind=kind)
        _close(g, np.zeros(z.shape), atol=1e-6)
    assert abs(float(distill.fusion_loss(z, target, kind="kl"))) < 1e-5
    # Against a top-k target the student equal to the renormalised top k has zero gradient.
    t = distill.top_k(target, 3)
    student = jnp.log(_dense_from_topk(distill.TopK(t.ids, jax.nn.log_softmax(t.log_probs))))
    student = jnp.maximum(student, -1e4).astype(jnp.float32)
    g = jax.grad(distill.fusion_loss)(student, t, kind="kl")
    _close(g, np.zeros(z.shape), atol=1e-5)
    # And a different student gets a non-zero gradient.
    assert float(jnp.abs(jax.grad(distill.fusion_loss)(z, t)).max()) > 1e-3


def test_masks_drop_positions():
    z, p = _normal(18, (B, L, V)), jax.nn.log_softmax(_normal(19, (B, L, V)))
    where = jnp.asarray(np.arange(L) < 3)[None, :].repeat(B, 0)
    base = distill.fusion_loss(z, p, where=where)
    z2 = z.at[:, 3:].set(100.0 * _normal(20, (B, L - 3, V)))
    _close(distill.fusion_loss(z2, p, where=where), base)
    _close(base, distill.fusion_loss(z[:, :3], p[:, :3]))
    y = _labels(21)
    _close(distill.clm_loss(z2, y, where=where), distill.clm_loss(z[:, :3], y[:, :3]))


def test_fusellm_loss_mixes_clm_and_fusion():
    z, y = _normal(22, (B, L, V)), _labels(23)
    fused = distill.fuse_teachers(_normal(24, (M, B, L, V)), jnp.abs(_normal(25, (M, B))))
    clm = optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
    out1 = distill.fusellm_loss(z, y, fused, lam=1.0)
    _close(out1.loss, clm, rtol=1e-6)
    _close(out1.clm, clm, rtol=1e-6)
    out0 = distill.fusellm_loss(z, y, fused, lam=0.0)
    _close(out0.loss, distill.fusion_loss(z, fused), rtol=1e-6)
    mixed = jax.jit(lambda zz, lam: distill.fusellm_loss(zz, y, fused, lam=lam))(z, 0.25)
    _close(mixed.loss, 0.25 * mixed.clm + 0.75 * mixed.fusion, rtol=1e-6)
    (val, aux), g = jax.value_and_grad(
        lambda zz: (lambda o: (o.loss, o))(distill.fusellm_loss(zz, y, fused, lam=0.9)),
        has_aux=True,
    )(z)
    assert isinstance(aux, distill.FuseLLMOutput) and np.isfinite(float(val))
    assert np.all(np.isfinite(np.asarray(g)))
    # A top-k fused target works the same way.
    t = distill.fuse_teachers(distill.top_k(_normal(26, (M, B, L, V)), 3), jnp.zeros((M, B)),
                              method="avg_ce")
    out = distill.fusellm_loss(z, y, t, lam=0.5)
    _close(out.fusion, distill.fusion_loss(z, t), rtol=1e-6)


# ---------------------------------------------------------------------------- errors


def test_bad_input_raises_clear_errors():
    z, y = _normal(27, (B, L, V)), _labels(28)
    x = _normal(29, (M, B, L, V))
    with pytest.raises(ValueError, match="lam"):
        distill.fusellm_loss(z, y, jax.nn.log_softmax(z), lam=1.5)
    with pytest.raises(ValueError, match="where"):
        distill.fusion_loss(z, jax.nn.log_softmax(z), where=jnp.ones((B, L + 1), bool))
    with pytest.raises(TypeError, match="where"):
        distill.clm_loss(z, y, where=jnp.ones((B, L)))
    with pytest.raises(ValueError, match="vocabulary"):
        distill.fusion_loss(z, jnp.zeros((B, L, V + 1)))
    with pytest.raises(ValueError, match="ce"):
        distill.fuse_teachers(x, jnp.zeros((M + 1, B)))
    with pytest.raises(ValueError, match="method"):
        distill.fuse_teachers(x, jnp.zeros((M, B)), method="max_ce")
    with pytest.raises(ValueError, match="temperature"):
        distill.fuse_teachers(x, jnp.zeros((M, B)), temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        distill.sequence_cross_entropy(x, y[:, :-1])
    with pytest.raises(TypeError, match="labels"):
        distill.sequence_cross_entropy(x, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="vocab_size"):
        distill.sequence_cross_entropy(distill.top_k(x, 3), y, vocab_size=2)
    with pytest.raises(ValueError, match="kind"):
        distill.fusion_loss(z, jax.nn.log_softmax(z), kind="js")
