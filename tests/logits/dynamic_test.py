"""Dynamic Logit Fusion: the derivative identities, exact vs grid, several experts, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import logits as fl
from fusionjax.logits import _dynamic


def _models(seed, shape, *, scale=1.0, expert_shift=0.5):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    strong = scale * jax.random.normal(k1, shape)
    base = scale * jax.random.normal(k2, shape)
    expert = base + expert_shift * scale * jax.random.normal(k3, shape)
    return strong, expert, base


def _kl(lp, lq):
    return jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)


def test_derivative_identities_match_autodiff():
    strong, expert, base = _models(0, (64,), scale=2.0)
    ls = jax.nn.log_softmax(strong)
    d = jax.nn.log_softmax(expert) - jax.nn.log_softmax(base)

    def tilde(alpha):
        return jax.nn.log_softmax(ls + alpha * d)

    big_a = lambda al: _kl(tilde(al), ls)  # noqa: E731  KL(P~ || P)
    big_b = lambda al: _kl(ls, tilde(al))  # noqa: E731  KL(P || P~)
    for alpha in (0.0, 0.3, 1.1, 2.0):
        lt = tilde(alpha)
        mean = jnp.sum(jnp.exp(lt) * d)
        var = jnp.sum(jnp.exp(lt) * (d - mean) ** 2)
        k3 = jnp.sum(jnp.exp(lt) * (d - mean) ** 3)
        np.testing.assert_allclose(jax.grad(big_a)(alpha), alpha * var, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(
            jax.grad(big_b)(alpha), mean - jnp.sum(jnp.exp(ls) * d), rtol=2e-4, atol=1e-6
        )
        np.testing.assert_allclose(jax.grad(jax.grad(big_b))(alpha), var, rtol=2e-3, atol=1e-5)
        np.testing.assert_allclose(
            jax.grad(jax.grad(big_a))(alpha), var + alpha * k3, rtol=2e-3, atol=1e-5
        )
        # The solver's two-pass evaluation gives the same divergences and moments.
        pr = _dynamic._problem(strong, expert, base, None)
        bb, m1, v, kk = _dynamic._evaluate(pr.log_p, pr.d, jnp.float32(alpha), jnp.float32(0.3))
        _, aa, bb = _dynamic._objective(jnp.float32(alpha), bb, m1, pr.a, pr.b)
        np.testing.assert_allclose(aa[0, 0], big_a(alpha), rtol=1e-3, atol=2e-6)
        np.testing.assert_allclose(bb[0, 0], big_b(alpha), rtol=1e-3, atol=2e-6)
        np.testing.assert_allclose(v[0, 0], var, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(kk[0, 0], k3, rtol=1e-2, atol=1e-5)


CASES = {
    "random": dict(seed=10, shape=(32, 1000), scale=1.0),
    "peaked": dict(seed=11, shape=(32, 1000), scale=6.0),
    "small-shift": dict(seed=12, shape=(32, 1000), scale=1.0, expert_shift=0.05),
    "large-vocab": dict(seed=13, shape=(4, 32768), scale=3.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_matches_the_grid_and_is_never_worse(case):
    kw = dict(CASES[case])
    strong, expert, base = _models(kw.pop("seed"), kw.pop("shape"), **kw)
    exact = fl.dynamic_alpha(strong, expert, base)
    grid = fl.dynamic_alpha(strong, expert, base, solver="grid")
    fine = fl.dynamic_alpha(strong, expert, base, solver="grid", grid_step=0.002)
    # The grid's argmin is within one step; a 0.002 grid pins the minimiser itself.
    assert jnp.all(jnp.abs(exact.alpha - grid.alpha) <= 0.1 + 1e-5)
    np.testing.assert_allclose(exact.alpha, fine.alpha, atol=0.004)
    # Objective compared with an independent computation (explicit KL sums).
    f_exact = fl.fusion_objective(strong, expert, base, exact.alpha)
    f_grid = fl.fusion_objective(strong, expert, base, grid.alpha)
    assert jnp.all(f_exact <= f_grid + 1e-6 + 1e-4 * f_grid), (f_exact - f_grid).max()
    np.testing.assert_allclose(exact.objective, f_exact, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(grid.objective, f_grid, rtol=2e-3, atol=1e-6)


def test_grid_is_the_papers_search():
    strong, expert, base = _models(1, (8, 50))
    grid = fl.dynamic_alpha(strong, expert, base, solver="grid")
    alphas = jnp.arange(21, dtype=jnp.float32) * 0.1
    f = jax.vmap(lambda a: fl.fusion_objective(strong, expert, base, a))(alphas)  # [21, 8]
    np.testing.assert_allclose(grid.alpha, alphas[jnp.argmin(f, axis=0)], atol=1e-6)


def test_boundaries_and_degenerate_cases():
    strong, expert, base = _models(2, (6, 40))
    # Expert equal to base: nothing to transfer.
    out = fl.dynamic_logit_fusion(strong, base, base)
    np.testing.assert_array_equal(out.alpha, 0.0)
    np.testing.assert_allclose(out.log_probs, jax.nn.log_softmax(strong), atol=1e-6)
    # A tiny alpha_max binds: the answer is the boundary for both solvers.
    small = dict(alpha_max=0.01, grid_step=0.01)
    np.testing.assert_allclose(fl.dynamic_alpha(strong, expert, base, **small).alpha, 0.01)
    np.testing.assert_allclose(
        fl.dynamic_alpha(strong, expert, base, solver="grid", **small).alpha, 0.01
    )
    # d constant on the strong model's support: P~ = P for every alpha, alpha stays 0.
    flat = jnp.zeros((6, 40))
    np.testing.assert_array_equal(fl.dynamic_alpha(strong, flat + 1.0, flat).alpha, 0.0)


def test_fusion_output_is_the_weighted_logit_arithmetic():
    strong, expert, base = _models(3, (5, 30))
    out = fl.dynamic_logit_fusion(strong, expert, base)
    want = jax.nn.log_softmax(strong + out.alpha[:, None] * (expert - base))
    np.testing.assert_allclose(out.log_probs, want, rtol=1e-5, atol=1e-5)


def test_several_experts_follow_the_papers_summed_objective():
    shape = (16, 200)
    strong, e0, base = _models(4, shape, expert_shift=0.2)
    _, e1, _ = _models(5, shape, expert_shift=1.0)
    e1 = base + (e1 - jax.random.normal(jax.random.key(5), shape)) * 0 + 0.8 * (e0 - base) * 3
    experts = jnp.stack([e0, e1, base + 0.3 * (e1 - base)])
    out = fl.dynamic_alpha(strong, experts, base)
    # Brute force: every expert alone on a fine grid, loss summed over every expert's targets.
    alphas = jnp.linspace(0.0, 2.0, 1001)
    lq = jax.nn.log_softmax(base)
    a = jnp.stack([_kl(jax.nn.log_softmax(e), lq) for e in experts])  # [E, B]
    b = jnp.stack([_kl(lq, jax.nn.log_softmax(e)) for e in experts])
    ls = jax.nn.log_softmax(strong)

    def summed(alpha, e):
        lt = jax.nn.log_softmax(ls + alpha * (jax.nn.log_softmax(e) - lq))
        big_a, big_b = _kl(lt, ls), _kl(ls, lt)
        return jnp.sum((big_a[None] - a) ** 2 + (big_b[None] - b) ** 2, axis=0)

    loss = jnp.stack([jax.lax.map(lambda al, e=e: summed(al, e), alphas) for e in experts])
    best = loss.min(axis=1)  # [E, B]
    np.testing.assert_allclose(out.objective, best.min(axis=0), rtol=1e-3, atol=1e-6)
    chosen = jnp.take_along_axis(best, out.expert_index[None], axis=0)[0]
    np.testing.assert_allclose(chosen, best.min(axis=0), rtol=1e-3, atol=1e-6)
    # The list form and the grid solver agree on the choice.
    same = fl.dynamic_alpha(strong, list(experts), base)
    np.testing.assert_array_equal(same.expert_index, out.expert_index)
    grid = fl.dynamic_alpha(strong, experts, base, solver="grid")
    assert jnp.all(out.objective <= grid.objective * (1 + 1e-4) + 1e-6)


def test_one_expert_stacked_is_the_single_expert_problem():
    strong, expert, base = _models(6, (5, 30))
    one = fl.dynamic_alpha(strong, expert, base)
    stacked = fl.dynamic_alpha(strong, expert[None], base)
    np.testing.assert_allclose(one.alpha, stacked.alpha)
    np.testing.assert_array_equal(stacked.expert_index, 0)


def test_masked_tokens_make_no_nan():
    strong, expert, base = _models(7, (4, 20), scale=2.0)
    strong = strong.at[:, 0].set(-jnp.inf)  # strong rules out 0
    expert = expert.at[:, 1].set(-jnp.inf).at[:, 3].set(-jnp.inf)
    base = base.at[:, 2].set(-jnp.inf).at[:, 3].set(-jnp.inf)
    where = jnp.arange(20) != 19
    for solver in ("exact", "grid"):
        out = fl.dynamic_logit_fusion(strong, expert, base, solver=solver, where=where)
        assert not jnp.any(jnp.isnan(out.log_probs)) and not jnp.any(jnp.isnan(out.alpha))
        for tok in (0, 1, 2, 19):  # strong's mask, one side's masks, where
            assert jnp.all(jnp.isneginf(out.log_probs[:, tok]))
        assert jnp.all(jnp.isfinite(out.log_probs[:, 3]))  # both small models: no evidence
        np.testing.assert_allclose(jax.nn.logsumexp(out.log_probs, -1), 0.0, atol=1e-5)


def test_jit_vmap_and_pytree_outputs():
    strong, expert, base = _models(8, (3, 5, 40))
    eager = fl.dynamic_logit_fusion(strong, expert, base)
    jitted = jax.jit(fl.dynamic_logit_fusion)(strong, expert, base)
    mapped = jax.vmap(fl.dynamic_logit_fusion)(strong, expert, base)
    for out in (jitted, mapped):
        assert isinstance(out, fl.DynamicFusionOutput)
        np.testing.assert_allclose(out.log_probs, eager.log_probs, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.alpha, eager.alpha, rtol=1e-5, atol=1e-6)
    res = jax.jit(lambda s, e, b: fl.dynamic_alpha(s, e, b, solver="grid"))(strong, expert, base)
    assert isinstance(res, fl.DynamicAlphaOutput) and res.alpha.shape == (3, 5)
    assert res.expert_index.dtype == jnp.int32


def test_errors_name_the_argument():
    strong, expert, base = _models(9, (3, 10))
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
