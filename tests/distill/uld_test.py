"""ULD and InfiFusion: NumPy reference, vocabulary permutations and padding, standardisation."""

import jax
import numpy as np
import optax
import pytest

from fusionjax import distill
from tests._testing import F32

B, L, VS, VT = 2, 4, 6, 9


def _normal(seed, shape, scale=2.0):  # NumPy data: no eager jnp op (a compile) per shape
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale


def _close(a, b, **tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **(tol or F32))


def _np_sorted_probs(z, tau, k=None, standardize=False):
    z = np.asarray(z, np.float64)
    if standardize:
        z = (z - z.mean(-1, keepdims=True)) / z.std(-1, keepdims=True)
    e = np.exp(z / tau - (z / tau).max(-1, keepdims=True))
    p = np.sort(e / e.sum(-1, keepdims=True), axis=-1)[..., ::-1]
    return p if k is None else p[..., :k]


def _np_uld(zs, zt, where, ts=1.0, tt=1.0, k=None, standardize=False):
    ps = _np_sorted_probs(zs, ts, k, standardize)
    pt = _np_sorted_probs(zt, tt, k, standardize)
    n = max(ps.shape[-1], pt.shape[-1])
    ps = np.concatenate([ps, np.zeros(ps.shape[:-1] + (n - ps.shape[-1],))], -1)
    pt = np.concatenate([pt, np.zeros(pt.shape[:-1] + (n - pt.shape[-1],))], -1)
    d = np.abs(ps - pt).sum(-1)
    return d[where].mean()


WHERE = np.array([[True, True, True, False], [True, False, True, True]])


@pytest.mark.parametrize("k", [None, 4])
def test_uld_matches_numpy(k):
    zs, zt = _normal(0, (B, L, VS)), _normal(1, (B, L, VT))
    got = distill.uld_distance(zs, zt, where=WHERE, student_temperature=2.0,
                               teacher_temperature=0.5, k=k)
    _close(got, _np_uld(zs, zt, WHERE, 2.0, 0.5, k), rtol=1e-5, atol=1e-6)


def test_uld_is_invariant_to_permuting_either_vocabulary():
    zs, zt = _normal(2, (B, L, VS)), _normal(3, (B, L, VT))
    base = distill.uld_distance(zs, zt)
    rng = np.random.default_rng(4)
    _close(distill.uld_distance(zs[..., rng.permutation(VS)], zt), base, atol=1e-6)
    _close(distill.uld_distance(zs, zt[..., rng.permutation(VT)]), base, atol=1e-6)


def test_uld_is_zero_for_identical_distributions_up_to_vocab_padding():
    zs = _normal(5, (B, L, VS))
    padded = np.concatenate([zs, np.full((B, L, VT - VS), -np.inf, np.float32)], axis=-1)
    padded = padded[..., np.random.default_rng(6).permutation(VT)]
    assert float(distill.uld_distance(zs, padded)) < 1e-6
    assert float(distill.uld_distance(padded, zs)) < 1e-6
    assert float(distill.uld_distance(zs, _normal(7, (B, L, VT)))) > 1e-2


def test_uld_loss_parts_jit_and_grad():
    zs, zt = _normal(8, (B, L, VS)), _normal(9, (B, L, VT))
    y = np.random.default_rng(10).integers(0, VS, (B, L)).astype(np.int32)
    where = WHERE

    def f(z):
        out = distill.uld_loss(z, y, zt, where=where, clm_weight=0.5, distill_weight=2.0)
        return out.loss, out

    (val, out), g = jax.jit(jax.value_and_grad(f, has_aux=True))(zs)
    # optax's CE jitted (one program, not its ops one by one); the mix on the host
    ce = lambda z, y: optax.softmax_cross_entropy_with_integer_labels(z, y)[WHERE].mean()  # noqa: E731
    _close(out.clm, jax.jit(ce)(zs, y), rtol=1e-6)
    _close(out.distill, _np_uld(zs, zt, WHERE), rtol=1e-5)
    _close(val, 0.5 * np.asarray(out.clm) + 2.0 * np.asarray(out.distill), rtol=1e-6)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    assert np.all(g[~WHERE] == 0)  # masked positions get no gradient


def test_infifusion_standardisation_is_invariant_to_logit_shift_and_scale():
    zs = _normal(11, (B, L, VS))
    teachers = [_normal(12, (B, L, VT)), _normal(13, (B, L, VS + 1))]
    y = np.zeros((B, L), np.int32)
    base = distill.infifusion_loss(zs, y, teachers, k=5, temperature=0.7).distill
    scale = np.exp(_normal(14, (B, L, 1), 1.0))
    shift = _normal(15, (B, L, 1), 5.0)
    moved = [t * scale + shift for t in teachers]
    got = distill.infifusion_loss(zs * scale - shift, y, moved, k=5, temperature=0.7).distill
    _close(got, base, rtol=1e-5, atol=1e-6)
    # Without standardisation the scale matters.
    plain = distill.uld_distance(zs, teachers, k=5)
    plain_moved = distill.uld_distance(zs, moved, k=5)
    assert abs(float(plain) - float(plain_moved)) > 1e-3


def test_infifusion_averages_teachers_with_weights():
    zs = _normal(16, (B, L, VS))
    t1, t2 = _normal(17, (B, L, VT)), _normal(18, (B, L, VS))
    y = np.zeros((B, L), np.int32)
    d1 = _np_uld(zs, t1, np.ones((B, L), bool), k=3, standardize=True)
    d2 = _np_uld(zs, t2, np.ones((B, L), bool), k=3, standardize=True)
    # Per-teacher weights, given per sequence (one compile for both checks).
    w13 = np.array([[1.0, 1.0], [3.0, 3.0]], np.float32)
    out = distill.infifusion_loss(zs, y, [t1, t2], k=3, weights=w13)
    _close(out.distill, 0.25 * d1 + 0.75 * d2, rtol=1e-5)
    # Per-sequence weights: one-hot per sequence picks that teacher for that sequence.
    w = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    per_seq = distill.infifusion_loss(zs, y, [t1, t2], k=3, weights=w).distill
    e1 = _np_uld(zs[:1], t1[:1], np.ones((1, L), bool), k=3, standardize=True)
    e2 = _np_uld(zs[1:], t2[1:], np.ones((1, L), bool), k=3, standardize=True)
    _close(per_seq, (e1 + e2) / 2, rtol=1e-5)
    # Stacked teachers of one size equal the list, and [M] weights act like [M, B] ones.
    same = [t2, _normal(19, (B, L, VS))]
    w = np.array([1.0, 3.0], np.float32)
    _close(distill.uld_distance(zs, np.stack(same), k=3, standardize=True, weights=w),
           distill.uld_distance(zs, same, k=3, standardize=True, weights=w[:, None] + 0 * w13),
           rtol=1e-6)


def test_bad_input_raises_clear_errors():
    zs, zt = _normal(20, (B, L, VS)), _normal(21, (B, L, VT))
    y = np.zeros((B, L), np.int32)
    with pytest.raises(ValueError, match="k must"):
        distill.uld_distance(zs, zt, k=0)
    with pytest.raises(TypeError, match="k must"):
        distill.uld_distance(zs, zt, k=2.5)
    with pytest.raises(ValueError, match="where"):
        distill.uld_distance(zs, zt, where=np.ones((B, L + 1), bool))
    with pytest.raises(ValueError, match="positions"):
        distill.uld_distance(zs, zt[:, :-1])
    with pytest.raises(ValueError, match="empty"):
        distill.infifusion_loss(zs, y, [])
    with pytest.raises(ValueError, match="weights"):
        distill.infifusion_loss(zs, y, [zt, zt], weights=np.ones(3))
    with pytest.raises(ValueError, match="weights"):
        distill.infifusion_loss(zs, y, [zt, zt], weights=np.array([-1.0, 2.0]))
    with pytest.raises(ValueError, match="temperature"):
        distill.infifusion_loss(zs, y, [zt], temperature=0.0)
    with pytest.raises(ValueError, match="clm_weight"):
        distill.uld_loss(zs, y, zt, clm_weight=-1.0)
    with pytest.raises(ValueError, match="labels"):
        distill.uld_loss(zs, y[:, :-1], zt)


# The student's gradient, one program per teacher form (an eager grad compiles the forward,
# its linearisation and transpose apiece); module level, so both parametrizations share it.
_grad_uld = jax.jit(jax.grad(lambda z, t: distill.uld_distance(z, t)))


@pytest.mark.parametrize("standardize", [False, True])
def test_precomputed_teacher_head_gives_the_logits_value(standardize):
    zs, zt = _normal(20, (B, L, VS)), _normal(21, (B, L, VT))
    head = distill.uld_teacher_targets(zt, k=5, temperature=2.0, standardize=standardize)
    assert head.ids.shape == (B, L, 5) and head.log_probs.shape == (B, L, 5)
    kw = dict(k=4, standardize=standardize, where=WHERE)
    full = distill.infifusion_loss(zs, np.zeros((B, L), np.int32), [zt], temperature=2.0, **kw)
    pre = distill.infifusion_loss(zs, np.zeros((B, L), np.int32), [head], temperature=2.0, **kw)
    _close(pre.distill, full.distill, rtol=1e-5, atol=1e-6)
    # Without k the missing tail counts as zeros: the value moves, the student's gradient
    # does not while the head is at least the student's vocabulary size.
    wide = distill.uld_teacher_targets(zt, k=VS)
    _close(_grad_uld(zs, wide), _grad_uld(zs, zt), rtol=1e-5, atol=1e-6)
    tail = 1.0 - np.exp(np.asarray(wide.log_probs, np.float64)).sum(-1).mean()
    gap = float(distill.uld_distance(zs, zt)) - float(distill.uld_distance(zs, wide))
    np.testing.assert_allclose(gap, tail, rtol=1e-4, atol=1e-6)


def test_precomputed_teacher_head_errors():
    zs = _normal(22, (B, L, VS))
    with pytest.raises(ValueError, match="k must be at most"):
        distill.uld_teacher_targets(zs, k=VS + 1)
    bad = distill.TopK(np.zeros((B, L + 1, 3), np.int32), np.zeros((B, L + 1, 3), np.float32))
    with pytest.raises(ValueError, match="teacher_logits.log_probs"):
        distill.uld_distance(zs, bad)
