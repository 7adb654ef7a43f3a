"""Tests for InfiGFusion: co-activation graphs, sorted Gromov–Wasserstein, GLD losses.

The sorted GW is checked against the exact GW over permutation couplings (enumeration,
n = 4..7) and against ott-jax's entropic GW solver; the figures are in the docstring of
``fusionjax/distill/_graph.py``.
"""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import distill

with warnings.catch_warnings():
    # ott imports jaxopt, whose __init__ warns that it is no longer maintained (as in
    # fusionjax/alignment/_ot_transport.py); nothing here uses jaxopt.
    warnings.filterwarnings(
        "ignore", message="JAXopt is no longer maintained", category=DeprecationWarning
    )
    from ott.geometry import geometry
    from ott.problems.quadratic import quadratic_problem
    from ott.solvers.linear import sinkhorn
    from ott.solvers.quadratic import gromov_wasserstein

SEEDS = range(5)


def _pair(seed, n, noise):
    """A co-activation graph and a node-permuted, multiplicatively noisy copy, max-scaled.

    Data are drawn with NumPy (no compiled programs); one graph shape per ``n``.
    """
    rng = np.random.default_rng(seed)
    logits = (2.0 * rng.standard_normal((12, 20))).astype(np.float32)
    g = np.asarray(distill.coactivation_graph(logits, k=n).graph)
    perm = rng.permutation(n)
    e = rng.standard_normal((n, n)).astype(np.float32)
    h = g[np.ix_(perm, perm)] * (1.0 + noise * (e + e.T) / 2)
    c = g.max()
    return jax.device_put(g / c), jax.device_put(h / c)


def _normal(seed, shape, scale=1.0):
    """float32 normals drawn with NumPy and put on the device (no copy program per shape)."""
    x = scale * np.random.default_rng(seed).standard_normal(shape)
    return jax.device_put(x.astype(np.float32))


def _zeros(*shape, dtype=np.float32):
    return jax.device_put(np.zeros(shape, dtype))


# ----------------------------------------------------------------------------- graph


def test_graph_symmetric_psd_batched():
    logits = _normal(0, (3, 2, 9, 15))
    out = distill.coactivation_graph(logits, k=6)
    assert out.graph.shape == (3, 2, 6, 6) and out.channels.shape == (3, 2, 6)
    assert out.channels.dtype == jnp.int32
    g = np.asarray(out.graph, np.float64)
    np.testing.assert_array_equal(g, np.swapaxes(g, -1, -2))
    assert np.linalg.eigvalsh(g).min() >= -1e-7
    # one sequence alone gives the same graph as in the batch
    # (indexing on the host: no slicing programs)
    host, graph, channels = np.asarray(logits), np.asarray(out.graph), np.asarray(out.channels)
    single = distill.coactivation_graph(jax.device_put(host[1, 0]), k=6)
    np.testing.assert_allclose(single.graph, graph[1, 0], rtol=1e-5, atol=1e-7)
    # by hand: the top-6 channels by summed probability, mean outer product
    x = host[1, 0].astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ids = np.argsort(-p.sum(0), kind="stable")[:6]
    np.testing.assert_array_equal(np.sort(channels[1, 0]), np.sort(ids))
    z = p[:, channels[1, 0]]
    np.testing.assert_allclose(graph[1, 0], z.T @ z / 9, rtol=1e-5, atol=1e-8)


def test_graph_invariant_to_vocab_permutation():
    logits = _normal(1, (2, 8, 20))
    perm = np.random.default_rng(2).permutation(20)
    a = distill.coactivation_graph(logits, k=6)
    b = distill.coactivation_graph(jax.device_put(np.asarray(logits)[..., perm]), k=6)
    np.testing.assert_allclose(a.graph, b.graph, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(perm[b.channels], a.channels)


def test_graph_mask_and_logit_shift():
    logits = _normal(3, (2, 8, 20))
    where = jax.device_put(np.arange(8)[None, :] < np.array([[5], [8]]))
    a = distill.coactivation_graph(logits, k=6, where=where)
    # masked positions change nothing; per-position shifts change nothing (probs)
    noisy_np = np.array(logits)
    noisy_np[0, 5:] = 100.0
    noisy = jax.device_put(noisy_np + np.arange(8.0, dtype=np.float32)[None, :, None])
    b = distill.coactivation_graph(noisy, k=6, where=where)
    np.testing.assert_allclose(a.graph, b.graph, rtol=1e-5, atol=1e-7)
    assert not np.allclose(
        np.asarray(distill.coactivation_graph(noisy, k=6).graph)[0], np.asarray(a.graph)[0], atol=1e-3
    )
    empty = distill.coactivation_graph(logits, k=6, where=_zeros(2, 8, dtype=bool))
    np.testing.assert_array_equal(empty.graph, 0.0)
    raw = distill.coactivation_graph(logits, k=6, values="logits", temperature=2.0)
    z = np.asarray(logits, np.float64)[1][:, np.asarray(raw.channels)[1]] / 2.0
    np.testing.assert_allclose(np.asarray(raw.graph)[1], z.T @ z / 8, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- GW


def test_sorted_gw_zero_for_identical_and_relabelled():
    gn = np.asarray(distill.coactivation_graph(_normal(4, (3, 2, 9, 15)), k=6).graph)[:, 0]
    g = jax.device_put(gn)
    np.testing.assert_array_equal(distill.sorted_gw(g, g), 0.0)
    rng = np.random.default_rng(5)
    perms = [rng.permutation(6) for _ in gn]
    relabelled = jax.device_put(np.stack([a[np.ix_(p, p)] for a, p in zip(gn, perms, strict=True)]))
    degrees = np.sort(gn.sum(-1), axis=-1)
    assert (np.diff(degrees, axis=-1) > 0).all()  # distinct node features
    np.testing.assert_allclose(distill.sorted_gw(g, relabelled), 0.0, atol=1e-12)
    other = jax.device_put(np.roll(gn, 1, axis=0))
    assert (np.asarray(distill.sorted_gw(g, other)) > 0).all()
    np.testing.assert_allclose(distill.sorted_gw(g, other), distill.sorted_gw(other, g), rtol=1e-6)


def test_permutation_gw_matches_a_python_loop():
    a, b = _pair(7, 5, 0.3)
    an, bn = np.asarray(a, np.float64), np.asarray(b, np.float64)
    best = min(
        np.mean((an - bn[np.ix_(p, p)]) ** 2) for p in itertools.permutations(range(5))
    )
    np.testing.assert_allclose(distill.permutation_gw(a, b), best, rtol=1e-5)


def test_sorted_gw_is_the_gw_cost_of_the_degree_matching():
    a, b = _pair(8, 6, 0.3)
    sa, sb = np.argsort(np.asarray(a).sum(-1)), np.argsort(np.asarray(b).sum(-1))
    coupling = np.zeros((6, 6), np.float32)
    coupling[sa, sb] = 1 / 6
    gw_cost = jax.jit(distill.gw_cost)  # one program, not its einsums op by op
    np.testing.assert_allclose(
        gw_cost(a, b, jax.device_put(coupling)), distill.sorted_gw(a, b), rtol=1e-4
    )


@pytest.mark.parametrize("n", [4, 5, 6, 7])
def test_sorted_gw_against_exact_permutation_gw(n):
    """Never below the exact value; additive error <= 0.5 mean(A∘A); ratio <= 12 at noise 0.3.

    Measured over 30 seeds per (n, noise): additive error <= 0.47 mean(A∘A); at noise 0.3
    the ratio is <= 9.9 (median 1.0-2.4); at noise 0.05 the matching is exact in 50-83 %
    of cases, but the ratio reaches 138 where the exact value is near 0 and noise swaps
    two nearly equal degrees, so no ratio is asserted there.
    """
    for noise in (0.05, 0.3):
        for seed in SEEDS:
            a, b = _pair(seed, n, noise)
            approx = float(distill.sorted_gw(a, b))
            exact = float(distill.permutation_gw(a, b))
            scale = float(np.mean(np.square(np.asarray(a))))
            assert approx >= exact - 1e-7 * scale
            assert approx - exact <= 0.5 * scale, (n, noise, seed, approx, exact, scale)
            if noise == 0.3:
                assert approx <= 12.0 * exact, (n, seed, approx, exact)
    a, b = _pair(0, n, 0.0)  # an exact relabelling: both are 0
    assert float(distill.permutation_gw(a, b)) == pytest.approx(0.0, abs=1e-12)
    assert float(distill.sorted_gw(a, b)) == pytest.approx(0.0, abs=1e-12)


def test_sorted_gw_against_ott_entropic_gw():
    """ott-jax's entropic GW (eps 1e-3, n = 6), its plan scored by the same GW objective."""
    solver = gromov_wasserstein.GromovWasserstein(
        sinkhorn.Sinkhorn(max_iterations=2000), epsilon=1e-3, max_iterations=50
    )

    @jax.jit
    @jax.numpy_rank_promotion("allow")  # ott's own code broadcasts across ranks
    @jax.numpy_dtype_promotion("standard")  # and mixes int and float
    def ott_gw(a, b):
        prob = quadratic_problem.QuadraticProblem(
            geometry.Geometry(cost_matrix=a), geometry.Geometry(cost_matrix=b)
        )
        return distill.gw_cost(a, b, solver(prob).matrix)

    ratios = []
    for seed in SEEDS:
        a, b = _pair(seed, 6, 0.3)
        approx, ott_cost = float(distill.sorted_gw(a, b)), float(ott_gw(a, b))
        exact = float(distill.permutation_gw(a, b))
        scale = float(np.mean(np.square(np.asarray(a))))
        # ott's plan never scored below the permutation minimum in 30 seeds (a soft plan
        # could); the sorted matching is within the stated additive error of it.
        assert ott_cost >= exact - 0.01 * scale, (seed, ott_cost, exact)
        assert approx - ott_cost <= 0.5 * scale, (seed, approx, ott_cost, scale)
        ratios.append(approx / ott_cost)
    assert np.median(ratios) <= 2.0, ratios  # measured median 1.02, max 8.0 over 30 seeds


def test_gw_is_differentiable_and_jittable():
    a, b = _pair(3, 7, 0.3)
    grad = jax.jit(jax.grad(distill.sorted_gw))(a, b)
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0
    np.testing.assert_allclose(jax.jit(distill.sorted_gw)(a, b), distill.sorted_gw(a, b))


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("jit", [False, True])
def test_loss_zero_for_same_model_and_grads_finite(jit):
    student = _normal(9, (2, 8, 20))
    teacher = _normal(10, (2, 8, 12))  # another vocabulary
    fn = lambda s, t: distill.infigfusion_loss(s, t, k=6)  # noqa: E731
    fn = jax.jit(fn) if jit else fn
    assert float(fn(student, student)) == 0.0
    loss = fn(student, teacher)
    assert float(loss) > 0
    if jit:  # one compiled gradient is enough
        grad = jax.jit(jax.grad(fn))(student, teacher)
        assert np.isfinite(grad).all() and np.abs(grad).sum() > 0
    # one sequence per batch entry: the loss is the mean of per-sequence sorted GW
    gs = distill.coactivation_graph(student, k=6).graph
    gt = distill.coactivation_graph(teacher, k=6).graph
    np.testing.assert_allclose(loss, np.mean(np.asarray(distill.sorted_gw(gs, gt))), rtol=1e-5)


def test_multi_teacher_weights_and_masks():
    s = _normal(11, (2, 8, 20))
    t1 = _normal(12, (2, 8, 12))
    t2 = _normal(13, (2, 8, 20), scale=3.0)
    where = jax.device_put(np.array([[True] * 5 + [False] * 3, [False] * 8]))
    l1 = distill.infigfusion_loss(s, t1, k=6, where=where)
    l2 = distill.infigfusion_loss(s, t2, k=6, where=where)
    weights = jax.device_put(np.array([1.0, 3.0], np.float32))
    both = distill.multi_teacher_infigfusion_loss(s, [t1, t2], k=6, weights=weights, where=where)
    np.testing.assert_allclose(both, (np.asarray(l1) + 3 * np.asarray(l2)) / 4, rtol=1e-5)
    weights = jax.device_put(np.array([0.0, 2.0], np.float32))
    only = distill.multi_teacher_infigfusion_loss(s, (t1, t2), k=6, weights=weights, where=where)
    np.testing.assert_allclose(only, l2, rtol=1e-6)
    # the fully masked sequence does not count: the loss is the first sequence's
    per = distill.sorted_gw(
        distill.coactivation_graph(s, k=6, where=where).graph,
        distill.coactivation_graph(t1, k=6, where=where).graph,
    )
    np.testing.assert_allclose(l1, np.asarray(per)[0], rtol=1e-5)


def test_objective_composes_clm_and_graph():
    s = _normal(14, (2, 8, 20))
    t = _normal(15, (2, 8, 12))
    y = jax.device_put(np.random.default_rng(16).integers(0, 20, (2, 8)).astype(np.int32))
    where = jax.device_put(np.arange(8)[None, :] < np.array([[8], [3]]))
    out = jax.jit(
        lambda s, y, t, lam: distill.infigfusion_objective(s, y, [t], k=6, clm_weight=lam, where=where)
    )(s, y, t, 0.25)
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(s)), np.asarray(y)[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.clm, nll[np.asarray(where)].mean(), rtol=1e-5)
    np.testing.assert_allclose(out.graph, distill.infigfusion_loss(s, t, k=6, where=where), rtol=1e-5)
    np.testing.assert_allclose(out.loss, 0.25 * out.clm + 0.75 * out.graph, rtol=1e-6)


def test_errors_name_the_parameter():
    s = _zeros(2, 5, 8)
    with pytest.raises(ValueError, match="k must be at most"):
        distill.coactivation_graph(s, k=9)
    with pytest.raises(TypeError, match="k must be an integer"):
        distill.coactivation_graph(s, k=2.0)
    with pytest.raises(TypeError, match="logits must be floating"):
        distill.coactivation_graph(_zeros(5, 8, dtype=np.int32), k=2)
    with pytest.raises(ValueError, match="at least 2 axes"):
        distill.coactivation_graph(_zeros(8), k=2)
    with pytest.raises(TypeError, match="where must be a boolean"):
        distill.coactivation_graph(s, k=2, where=jax.device_put(np.ones((2, 5), np.float32)))
    with pytest.raises(ValueError, match=r"where must have shape"):
        distill.coactivation_graph(s, k=2, where=jax.device_put(np.ones((2, 4), bool)))
    with pytest.raises(ValueError, match="values must be"):
        distill.coactivation_graph(s, k=2, values="energy")
    with pytest.raises(ValueError, match="temperature"):
        distill.coactivation_graph(s, k=2, temperature=0.0)
    with pytest.raises(ValueError, match="g_teacher must have the shape"):
        distill.sorted_gw(_zeros(3, 3), _zeros(4, 4))
    with pytest.raises(ValueError, match="g_student must be square"):
        distill.sorted_gw(_zeros(3, 4), _zeros(3, 4))
    with pytest.raises(ValueError, match="n <= 8"):
        distill.permutation_gw(_zeros(9, 9), _zeros(9, 9))
    with pytest.raises(ValueError, match="coupling must be"):
        distill.gw_cost(_zeros(3, 3), _zeros(2, 2), _zeros(2, 3))
    with pytest.raises(TypeError, match="teacher_logits must be a sequence"):
        distill.multi_teacher_infigfusion_loss(s, s, k=2)
    with pytest.raises(TypeError, match="teacher_logits must be one array"):
        distill.infigfusion_loss(s, [s], k=2)
    with pytest.raises(ValueError, match="non-empty"):
        distill.multi_teacher_infigfusion_loss(s, [], k=2)
    with pytest.raises(ValueError, match=r"teacher_logits\[1\] must share"):
        distill.multi_teacher_infigfusion_loss(s, [s, _zeros(2, 4, 8)], k=2)
    with pytest.raises(ValueError, match=r"vocabulary size of teacher_logits\[0\]"):
        distill.multi_teacher_infigfusion_loss(s, [_zeros(2, 5, 3)], k=4)
    with pytest.raises(ValueError, match="weights must have shape"):
        distill.multi_teacher_infigfusion_loss(s, [s], k=2, weights=jax.device_put(np.ones(2, np.float32)))
    with pytest.raises(ValueError, match="weights"):
        distill.multi_teacher_infigfusion_loss(s, [s], k=2, weights=jax.device_put(np.array([-1.0], np.float32)))
    with pytest.raises(ValueError, match="clm_weight"):
        distill.infigfusion_objective(s, _zeros(2, 5, dtype=np.int32), [s], k=2, clm_weight=1.5)
    with pytest.raises(TypeError, match="targets must be integer"):
        distill.infigfusion_objective(s, _zeros(2, 5), [s], k=2)
    with pytest.raises(ValueError, match="targets must have shape"):
        distill.infigfusion_objective(s, _zeros(2, 4, dtype=np.int32), [s], k=2)
