"""Dynamic Logit Fusion: the derivative identities, exact vs grid, several experts, masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import logits as fl
from fusionjax.logits import _dynamic
from tests._testing import np_log_softmax


def _models(seed, shape, *, scale=1.0, expert_shift=0.5):
    """The inputs the solver was developed on (``jax.random``: the two-basin cases).

    NumPy arrays: the scaling is done on the host (float32, the same IEEE products as
    JAX's), not by an eager program compiled per op and shape.
    """
    n1, n2, n3 = (np.asarray(x) for x in _normals(jax.random.key(seed), shape=shape))
    strong = scale * n1
    base = scale * n2
    expert = base + expert_shift * scale * n3
    return strong, expert, base


@functools.partial(jax.jit, static_argnames="shape")
def _normals(key, *, shape):  # the same draws, one program per shape (not split + normal)
    k1, k2, k3 = jax.random.split(key, 3)
    return jax.random.normal(k1, shape), jax.random.normal(k2, shape), jax.random.normal(k3, shape)


def _small(seed, shape, *, scale=1.0, expert_shift=0.5):
    """Like ``_models`` from NumPy draws (no random-number kernel to compile per shape).

    NumPy arrays: the tests edit and check them on the host, and the jitted functions take
    them as they are (``jnp.asarray`` would compile a copy program per shape).
    """
    n = np.random.default_rng(seed).standard_normal((3, *shape), np.float32) * scale
    strong, base = n[0], n[1]
    return strong, base + expert_shift * n[2], base


def _kl(lp, lq):
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


SHAPE = (8, 64)  # one shape for the small tests: each new shape compiles the solver again


def test_derivative_identities_match_autodiff():
    strong, expert, base = _small(0, SHAPE, scale=2.0)

    @jax.jit
    def check(alpha, strong, expert, base):  # [8] positions, one alpha each
        ls = jax.nn.log_softmax(strong)
        d = jax.nn.log_softmax(expert) - jax.nn.log_softmax(base)
        pr = _dynamic._problem(strong, expert, base, None)

        def tilde(al):
            return jax.nn.log_softmax(ls + al[:, None] * d)

        big_a = lambda al: _kl(tilde(al), ls)  # noqa: E731  KL(P~ || P)
        big_b = lambda al: _kl(ls, tilde(al))  # noqa: E731  KL(P || P~)
        grad = lambda f: lambda al: jax.grad(lambda x: jnp.sum(f(x)))(al)  # noqa: E731
        lt = tilde(alpha)
        mean = jnp.sum(jnp.exp(lt) * d, -1)
        var = jnp.sum(jnp.exp(lt) * (d - mean[:, None]) ** 2, -1)
        k3 = jnp.sum(jnp.exp(lt) * (d - mean[:, None]) ** 3, -1)
        mean0 = jnp.sum(jnp.exp(ls) * d, -1)
        # The solver's two-pass evaluation: c = B, m1 = B', the central moments.
        c, m1, v, kk = _dynamic._moments(pr.log_p[0], pr.d[0], alpha[:, None], 0.3, 3)
        aa, bb = _dynamic._divergences(alpha[:, None], c, m1)
        return dict(
            autodiff=(grad(big_a)(alpha), grad(big_b)(alpha), grad(grad(big_b))(alpha),
                      grad(grad(big_a))(alpha), big_a(alpha), big_b(alpha), var, k3),
            identity=(alpha * var, mean - mean0, var, var + alpha * k3, aa[:, 0], bb[:, 0],
                      v[:, 0], kk[:, 0]),
        )

    for alpha in (0.0, 0.3, 1.1, 2.0):
        out = check(np.full((SHAPE[0],), alpha, np.float32), strong, expert, base)
        tols = [(2e-4, 1e-6)] * 2 + [(2e-3, 1e-5)] * 2 + [(1e-3, 2e-6)] * 2 + [(1e-3, 1e-6),
                                                                             (1e-2, 1e-5)]
        for want, got, (rtol, atol) in zip(out["autodiff"], out["identity"], tols, strict=True):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


CASES = {  # (seed, scale, expert_shift): all [32, 1000], solved as one [96, 1000] batch
    "random": (10, 1.0, 0.5),
    "peaked": (11, 6.0, 0.5),  # logit scale 6: the colleague's two-basin inputs
    "small-shift": (12, 1.0, 0.05),
}


def _check_exact_against_grids(strong, expert, base):
    # The checks run on the host (NumPy, float32 as in JAX): no eager program per op.
    exact = jax.device_get(fl.dynamic_alpha(strong, expert, base))
    grid = jax.device_get(fl.dynamic_alpha(strong, expert, base, solver="grid"))
    fine = fl.dynamic_alpha(strong, expert, base, solver="grid", grid_step=0.002)
    # The grid's argmin is within one step; a 0.002 grid pins the minimiser itself.
    assert np.all(np.abs(exact.alpha - grid.alpha) <= 0.1 + 1e-5)
    np.testing.assert_allclose(exact.alpha, fine.alpha, atol=0.004)
    # Objective compared with an independent computation (explicit KL sums).
    f_exact = np.asarray(fl.fusion_objective(strong, expert, base, exact.alpha))
    f_grid = np.asarray(fl.fusion_objective(strong, expert, base, grid.alpha))
    assert np.all(f_exact <= f_grid + 1e-6 + 1e-4 * f_grid), (f_exact - f_grid).max()
    np.testing.assert_allclose(exact.objective, f_exact, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(grid.objective, f_grid, rtol=2e-3, atol=1e-6)


def test_exact_matches_the_grid_and_is_never_worse():
    parts = [_models(seed, (32, 1000), scale=scale, expert_shift=shift)
             for seed, scale, shift in CASES.values()]
    _check_exact_against_grids(*(np.concatenate(xs) for xs in zip(*parts, strict=True)))


def test_exact_matches_the_grid_at_a_large_vocabulary():
    _check_exact_against_grids(*_models(13, (4, 32768), scale=3.0))


def test_grid_is_the_papers_search():
    strong, expert, base = _small(1, SHAPE)
    grid = fl.dynamic_alpha(strong, expert, base, solver="grid")
    alphas = np.arange(21, dtype=np.float32) * 0.1
    f = jax.vmap(lambda a: fl.fusion_objective(strong, expert, base, a))(alphas)  # [21, 8]
    np.testing.assert_allclose(grid.alpha, alphas[np.argmin(f, axis=0)], atol=1e-6)


def test_boundaries_and_degenerate_cases():
    strong, expert, base = _small(2, SHAPE)
    # Expert equal to base: nothing to transfer.
    out = fl.dynamic_logit_fusion(strong, base, base)
    np.testing.assert_array_equal(out.alpha, 0.0)
    np.testing.assert_allclose(out.log_probs, np_log_softmax(strong), atol=1e-6)
    # alpha_max binds: a strong model peaked on one token barely moves by alpha <= 2 while
    # the expert moved far from its base, so f decreases on [0, 2] and both solvers return
    # the boundary (at the default options: no extra compilation).
    peaked = 12.0 * np.eye(*SHAPE, dtype=np.float32)  # one-hot rows
    far = base + 2.0 * (expert - base)
    alphas = np.linspace(1.8, 2, 5, dtype=np.float32)
    f = jax.vmap(lambda al: fl.fusion_objective(peaked, far, base, al))(alphas)
    assert np.all(np.diff(f, axis=0) < 0)  # still decreasing at alpha_max
    for solver in ("exact", "grid"):
        np.testing.assert_array_equal(fl.dynamic_alpha(peaked, far, base, solver=solver).alpha, 2.0)
    # d constant on the strong model's support: P~ = P for every alpha, alpha stays 0.
    flat = np.zeros(SHAPE, np.float32)
    np.testing.assert_array_equal(fl.dynamic_alpha(strong, flat + 1.0, flat).alpha, 0.0)


def test_fusion_output_is_the_weighted_logit_arithmetic():
    strong, expert, base = _small(3, SHAPE)
    out = fl.dynamic_logit_fusion(strong, expert, base)
    alpha = np.asarray(out.alpha, np.float64)
    want = np_log_softmax(strong + alpha[:, None] * (np.float64(expert) - base))
    np.testing.assert_allclose(out.log_probs, want, rtol=1e-5, atol=1e-5)


def test_several_experts_follow_the_papers_summed_objective():
    shape = (16, 64)  # the expert choice does not depend on V
    strong, e0, base = _small(4, shape, expert_shift=0.2)
    e1 = base + 2.4 * (e0 - base)
    experts = np.stack([e0, e1, base + 0.3 * (e1 - base)])
    out = jax.device_get(fl.dynamic_alpha(strong, experts, base))

    @jax.jit  # one program for the reference (not an eager program per op)
    def brute_force(strong, experts, base):
        # Every expert alone on a fine grid, loss summed over every expert's targets.
        alphas = jnp.linspace(0.0, 2.0, 1001)
        lq = jax.nn.log_softmax(base)
        lts = jax.nn.log_softmax(experts)
        a, b = _kl(lts, lq[None]), _kl(lq[None], lts)  # [E, B]
        ls = jax.nn.log_softmax(strong)

        def summed(alpha, lt_e):
            lt = jax.nn.log_softmax(ls + alpha * (lt_e - lq))
            big_a, big_b = _kl(lt, ls), _kl(ls, lt)
            return jnp.sum((big_a[None] - a) ** 2 + (big_b[None] - b) ** 2, axis=0)

        loss = jax.vmap(lambda lt_e: jax.lax.map(lambda al: summed(al, lt_e), alphas))(lts)
        return loss.min(axis=1)  # [E, B]

    best = np.asarray(brute_force(strong, experts, base))
    np.testing.assert_allclose(out.objective, best.min(axis=0), rtol=1e-3, atol=1e-6)
    chosen = np.take_along_axis(best, out.expert_index[None], axis=0)[0]
    np.testing.assert_allclose(chosen, best.min(axis=0), rtol=1e-3, atol=1e-6)
    # The list form is the same stacked problem (checked before the solver: one compile
    # less); the grid solver agrees on the choice.
    as_list = [jax.device_put(e) for e in experts]
    np.testing.assert_array_equal(_dynamic._stack_experts(as_list, strong), experts)
    grid = fl.dynamic_alpha(strong, experts, base, solver="grid")
    assert np.all(out.objective <= np.asarray(grid.objective) * (1 + 1e-4) + 1e-6)


def test_one_expert_stacked_is_the_single_expert_problem():
    strong, expert, base = _small(6, SHAPE)
    one = fl.dynamic_alpha(strong, expert, base)
    stacked = fl.dynamic_alpha(strong, expert[None], base)  # a NumPy view: no eager op
    np.testing.assert_allclose(one.alpha, stacked.alpha)
    np.testing.assert_array_equal(stacked.expert_index, 0)


def test_masked_tokens_make_no_nan():
    strong, expert, base = _small(7, SHAPE, scale=2.0)
    strong[:, 0] = -np.inf  # strong rules out 0
    expert[:, [1, 3]] = -np.inf
    base[:, [2, 3]] = -np.inf
    where = np.arange(SHAPE[1]) != 19
    for solver in ("exact", "grid"):
        out = jax.device_get(
            fl.dynamic_logit_fusion(strong, expert, base, solver=solver, where=where)
        )
        assert not np.any(np.isnan(out.log_probs)) and not np.any(np.isnan(out.alpha))
        for tok in (0, 1, 2, 19):  # strong's mask, one side's masks, where
            assert np.all(np.isneginf(out.log_probs[:, tok]))
        assert np.all(np.isfinite(out.log_probs[:, 3]))  # both small models: no evidence
        total = np.log(np.sum(np.exp(np.float64(out.log_probs)), -1))
        np.testing.assert_allclose(total, 0.0, atol=1e-5)


def test_jit_vmap_and_pytree_outputs():
    strong, expert, base = _small(8, (2, *SHAPE))
    rows = [fl.dynamic_logit_fusion(strong[i], expert[i], base[i]) for i in range(2)]
    eager = jax.tree.map(lambda *xs: np.stack(xs), *rows)  # SHAPE's compiled solver
    jitted = jax.jit(fl.dynamic_logit_fusion)(strong, expert, base)
    mapped = jax.vmap(fl.dynamic_logit_fusion)(strong, expert, base)
    for out in (jitted, mapped):
        assert isinstance(out, fl.DynamicFusionOutput)
        np.testing.assert_allclose(out.log_probs, eager.log_probs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.alpha, eager.alpha, rtol=1e-5, atol=1e-6)
    res = jax.jit(lambda s, e, b: fl.dynamic_alpha(s, e, b, solver="grid"))(strong, expert, base)
    assert isinstance(res, fl.DynamicAlphaOutput) and res.alpha.shape == (2, SHAPE[0])
    assert res.expert_index.dtype == jnp.int32


def test_errors_name_the_argument():
    strong, expert, base = _small(9, SHAPE)
    with pytest.raises(ValueError, match="expert_logits must have the shape of strong_logits"):
        fl.dynamic_alpha(strong, expert[:, :5], base)
    with pytest.raises(ValueError, match="base_logits must have the shape of strong_logits"):
        fl.dynamic_alpha(strong, expert, base[:2])
    with pytest.raises(ValueError, match="solver"):
        fl.dynamic_alpha(strong, expert, base, solver="newton")
    with pytest.raises(ValueError, match="alpha_max"):
        fl.dynamic_alpha(strong, expert, base, alpha_max=0.0)
    with pytest.raises(ValueError, match="num_iterations"):
        fl.dynamic_alpha(strong, expert, base, num_iterations=0)
