"""OT fusion: exact and Sinkhorn transport, different widths, marginal correction, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax.alignment import PermutationSpec
from fusionjax.alignment import apply_permutations
from fusionjax.alignment import apply_transports
from fusionjax.alignment import axis_roles
from fusionjax.alignment import ot_fusion
from fusionjax.alignment import solve_transport
from fusionjax.alignment import transformer_spec
from fusionjax.alignment import transport_maps
from fusionjax.alignment._spec import path_str
from fusionjax.zoo import Transformer
from tests._testing import BF16
from tests._testing import assert_trees_close

SPEC = PermutationSpec(
    {
        "h0": [("Dense_0/kernel", 1), ("Dense_0/bias", 0), ("Dense_1/kernel", 0)],
        "h1": [("Dense_1/kernel", 1), ("Dense_1/bias", 0), ("Dense_2/kernel", 0)],
    }
)
EXACT = dict(rtol=0, atol=0)


def mlp(seed, w0=8, w1=8, dtype=jnp.float32):
    """A random 5 -> w0 -> w1 -> 3 MLP as nested dicts (numpy-drawn: nothing to compile)."""
    shapes = [(5, w0), (w0,), (w0, w1), (w1,), (w1, 3), (3,)]
    flat = np.random.default_rng(seed).normal(size=sum(int(np.prod(s)) for s in shapes))
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
    # Drawn in float64, rounded to float32 first unless float64 is asked for (as
    # jnp.asarray did), then put on the device (jnp.asarray compiles a program per shape).
    wide = jnp.dtype(dtype) == np.float64
    leaves = [
        jax.device_put(flat[a:b].reshape(s).astype(np.float64 if wide else np.float32).astype(dtype))
        for a, b, s in zip(offsets[:-1], offsets[1:], shapes, strict=True)
    ]
    return {f"Dense_{i}": {"kernel": leaves[2 * i], "bias": leaves[2 * i + 1]} for i in range(3)}


@jax.jit
def forward(p, x):
    """The MLP's logits."""
    for i in range(2):
        x = jax.nn.relu(x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"][None])
    return x @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"][None]


def widen(p):
    """Every hidden unit twice: incoming weights copied, outgoing weights halved (in NumPy)."""
    rep = lambda a, ax: np.repeat(np.asarray(a), 2, axis=ax)  # noqa: E731
    return {
        "Dense_0": {"kernel": rep(p["Dense_0"]["kernel"], 1), "bias": rep(p["Dense_0"]["bias"], 0)},
        "Dense_1": {
            "kernel": rep(rep(p["Dense_1"]["kernel"], 0) / 2, 1),
            "bias": rep(p["Dense_1"]["bias"], 0),
        },
        "Dense_2": {"kernel": rep(p["Dense_2"]["kernel"], 0) / 2, "bias": p["Dense_2"]["bias"]},
    }


def permute(spec, params, seed):
    """``params`` with its units randomly permuted, in numpy (nothing to compile)."""
    rng = np.random.default_rng(seed)
    perms = {g: rng.permutation(n) for g, n in spec.sizes(params).items()}
    axes = spec.leaf_axes(params)

    def leaf(kp, x):
        x = np.asarray(x)
        for a, g in enumerate(axes.get(path_str(kp), ())):
            if g is not None:
                x = np.take(x, perms[g], axis=a)
        return jax.device_put(x)

    return jax.tree_util.tree_map_with_path(leaf, params), perms


@pytest.fixture(scope="module")
def models():
    """A reference MLP, an independent one, a permuted copy of the reference, inputs."""
    ref = mlp(0)
    other = mlp(1)
    permuted, perms = permute(SPEC, ref, 2)
    x = jax.device_put(np.random.default_rng(3).normal(size=(16, 5)).astype(np.float32))
    return ref, other, permuted, x, perms


def test_permuted_copy_is_recovered_exactly(models, maybe_jit):
    """Exact OT fusion of a model with a permuted copy of itself returns the model."""
    ref, _, permuted, _, _ = models
    run = maybe_jit(lambda r, o: ot_fusion(SPEC, r, o)[:3])
    fused, aligned, transports = run(ref, permuted)
    assert_trees_close(aligned, ref, **EXACT)
    assert_trees_close(fused, ref, **EXACT)
    for t in transports.values():  # a permutation matrix over n
        np.testing.assert_array_equal(np.sort(np.asarray(t).ravel())[-8:], 1 / 8)
        np.testing.assert_array_equal(np.count_nonzero(t, axis=0), 1)


def test_permuted_copy_is_recovered_by_sinkhorn(models):
    """So does Sinkhorn with a small epsilon (up to its soft coupling)."""
    ref, _, permuted, _, _ = models
    out = ot_fusion(SPEC, ref, permuted, solver="sinkhorn", epsilon=0.01)
    assert all(bool(c) for c in out.converged.values())
    assert_trees_close(out.fused, ref, rtol=1e-4, atol=1e-4)


def test_exact_equal_widths_is_a_permutation_alignment(models):
    """Equal widths, exact solver: a permutation alignment preserving other's function."""
    ref, other, _, x, _ = models
    out = ot_fusion(SPEC, ref, other)
    # Exact maps with equal widths are permutations: the same as apply_permutations ...
    assert_trees_close(out.aligned, apply_permutations(SPEC, out.permutations, other), **EXACT)
    assert_trees_close(out.apply(other), out.aligned, **EXACT)
    # ... so other's function is preserved.
    np.testing.assert_allclose(forward(out.aligned, x), forward(other, x), rtol=1e-5, atol=1e-5)
    # and the first layer's assignment is the optimal one for its cost (vs scipy).
    from scipy.optimize import linear_sum_assignment

    def rows(p):
        return np.concatenate([p["Dense_0"]["kernel"].T, p["Dense_0"]["bias"][:, None]], 1)

    fo, fr = rows(other), rows(ref)
    cost = np.linalg.norm(fo[:, None] - fr[None], axis=-1)
    _, cols = linear_sum_assignment(cost.T)
    np.testing.assert_array_equal(out.permutations["h0"], cols)


def test_weight_endpoints_and_linearity(models):
    """weight=0 is ref, weight=1 the aligned other, in between the linear interpolation."""
    ref, other, _, _, _ = models
    run = jax.jit(lambda w: ot_fusion(SPEC, ref, other, weight=w)[:2])
    f0, aligned = run(0.0)
    f1, _ = run(1.0)
    fh, _ = run(0.25)
    assert_trees_close(f0, ref, **EXACT)
    assert_trees_close(f1, aligned, **EXACT)
    mix = lambda a, b: np.float32(0.75) * np.asarray(a) + np.float32(0.25) * np.asarray(b)  # noqa: E731
    assert_trees_close(fh, jax.tree.map(mix, ref, aligned))


@pytest.mark.parametrize("solver", ["exact", "sinkhorn"])
def test_different_widths_give_ref_shapes_and_right_marginals(models, solver):
    """Different widths: the result has ref's shapes; couplings have uniform marginals."""
    ref = models[0]
    other = mlp(4, 16, 16)
    out = ot_fusion(SPEC, ref, other, solver=solver, epsilon=0.05)
    assert jax.tree.map(jnp.shape, out.fused) == jax.tree.map(jnp.shape, ref)
    assert jax.tree.map(jnp.shape, out.aligned) == jax.tree.map(jnp.shape, ref)
    tol = 1e-6 if solver == "exact" else 2e-3  # Sinkhorn stops at an L1 marginal error of 1e-3
    for g, (m, n) in {"h0": (16, 8), "h1": (16, 8)}.items():
        t = np.asarray(out.transports[g])
        assert t.shape == (m, n) and (t >= 0).all()
        np.testing.assert_allclose(t.sum(1), 1 / m, atol=tol)
        np.testing.assert_allclose(t.sum(0), 1 / n, atol=tol)
    if solver == "exact":  # 16 -> 8: every ref unit receives exactly two other units
        np.testing.assert_array_equal(np.count_nonzero(out.transports["h0"], axis=0), 2)


@pytest.mark.parametrize("direction", ["wide_other", "wide_ref"])
def test_widened_copy_is_folded_back_exactly(models, direction):
    """Write axes average merged units, read axes sum them: a widened copy maps back."""
    ref, _, _, x, _ = models
    wide = widen(ref)
    wide, _ = permute(SPEC, wide, 5)
    np.testing.assert_allclose(forward(wide, x), forward(ref, x), rtol=1e-5, atol=1e-5)
    r, o = (ref, wide) if direction == "wide_other" else (wide, ref)
    out = ot_fusion(SPEC, r, o)
    assert_trees_close(out.aligned, r)
    np.testing.assert_allclose(forward(out.fused, x), forward(ref, x), rtol=1e-5, atol=1e-5)


def test_marginal_correction():
    """Write maps divide by the ref marginals, read maps by the other marginals."""
    # An unbalanced coupling (as an unconverged Sinkhorn returns): 3 other x 2 ref units.
    t = jax.device_put(np.array([[0.2, 0.1], [0.0, 0.3], [0.1, 0.3]], np.float32))
    maps = jax.jit(transport_maps, static_argnames="marginal_correction")  # not op by op
    write, read = maps(t)
    tn = np.asarray(t)  # references on the host
    np.testing.assert_allclose(write, tn / tn.sum(0)[None], rtol=1e-6)  # T diag(1/beta)
    np.testing.assert_allclose(read, tn / tn.sum(1)[:, None], rtol=1e-6)  # diag(1/alpha) T
    np.testing.assert_allclose(write.sum(0), 1.0, rtol=1e-6)  # ref units: convex combinations
    np.testing.assert_allclose(read.sum(1), 1.0, rtol=1e-6)  # other units: mass divided up
    w_uniform, r_uniform = maps(t, marginal_correction=False)
    np.testing.assert_allclose(w_uniform, 2 * tn, rtol=1e-6)  # divides by 1/n, 1/m instead
    np.testing.assert_allclose(r_uniform, 3 * tn, rtol=1e-6)
    np.testing.assert_allclose(maps(jax.device_put(np.eye(4, dtype=np.float32) / 4))[0], np.eye(4))
    # A boolean array flag (as an OTFusionOutput returned from jit holds) selects the same.
    flag_maps = jax.jit(lambda t, flag: transport_maps(t, marginal_correction=flag))
    np.testing.assert_allclose(flag_maps(t, jax.device_put(np.asarray(False)))[0], w_uniform, rtol=1e-6)
    np.testing.assert_allclose(flag_maps(t, jax.device_put(np.asarray(True)))[1], read, rtol=1e-6)

    # A constant written unit stays constant under a soft map of any widths.
    ref = mlp(7)
    other = mlp(8, 16, 16)
    other["Dense_0"]["bias"] = jax.device_put(np.full(16, 0.3, np.float32))
    out = ot_fusion(SPEC, ref, other, solver="sinkhorn", epsilon=0.5)
    np.testing.assert_allclose(out.aligned["Dense_0"]["bias"], 0.3, rtol=1e-5)


def test_activation_cost(models):
    """Activation costs recover a permuted copy; missing groups fall back to weights."""
    ref, _, permuted, x, perms = models

    def acts(p):  # pre-activations: no dead (tied) units on few inputs; float64 NumPy, cast
        p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
        h0 = np.asarray(x, np.float64) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"][None]
        h1 = np.maximum(h0, 0) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"][None]
        return {"h0": jax.device_put(h0.astype(np.float32)), "h1": jax.device_put(h1.astype(np.float32))}

    out = ot_fusion(SPEC, ref, permuted, cost="activation", activations=(acts(ref), acts(permuted)))
    assert_trees_close(out.aligned, ref, **EXACT)
    np.testing.assert_array_equal(out.permutations["h0"], np.argsort(np.asarray(perms["h0"])))
    # A group without activations falls back to the weight cost.
    a_r, a_p = acts(ref), acts(permuted)
    out = ot_fusion(
        SPEC, ref, permuted, cost="activation", activations=({"h1": a_r["h1"]}, {"h1": a_p["h1"]})
    )
    assert_trees_close(out.aligned, ref, **EXACT)
    with pytest.raises(ValueError, match="needs activations"):
        ot_fusion(SPEC, ref, permuted, cost="activation")
    with pytest.raises(ValueError, match=r"ref activations of group 'h0': expected \[M, 8\]"):
        ot_fusion(SPEC, ref, permuted, cost="activation", activations=({"h0": np.asarray(a_r["h0"]).T}, a_p))
    with pytest.raises(ValueError, match="same inputs"):
        ot_fusion(
            SPEC,
            ref,
            permuted,
            cost="activation",
            activations=({"h0": np.asarray(a_r["h0"])[:3]}, {"h0": a_p["h0"]}),
        )


def test_transformer_residual_stream_and_attention():
    """Hand spec with a shared residual map, heads, query-key and value groups."""
    model = Transformer(dim=8, depth=1, heads=2, mlp_width=16)
    x = jax.device_put(np.random.default_rng(9).normal(size=(4, 8, 8)).astype(np.float32))
    spec = transformer_spec(1)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(10)
    ref, other = (
        jax.tree.map(lambda s: jax.device_put(rng.normal(size=s.shape).astype(s.dtype)), shapes)
        for _ in range(2)
    )
    permuted, _ = permute(spec, ref, 12)
    out = ot_fusion(spec, ref, permuted)
    assert_trees_close(out.aligned, ref, **EXACT)
    out = ot_fusion(spec, ref, other)
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply(out.aligned, x), apply(other, x), rtol=1e-4, atol=1e-4)
    # Roles: attention out-projection writes the residual stream, q/k/v read it.
    roles = out.roles
    assert roles[("params/block_0/attn/out/kernel", 2)] == "write"
    assert roles[("params/block_0/attn/query/kernel", 0)] == "read"
    assert roles[("params/head/kernel", 0)] == "read"


def test_apply_transports_and_roles(models):
    """apply_transports reproduces the alignment; roles follow the layout conventions."""
    ref, _, permuted, _, _ = models
    out = ot_fusion(SPEC, ref, permuted)
    assert_trees_close(apply_transports(SPEC, out.transports, permuted), ref, **EXACT)
    roles = axis_roles(SPEC, ref, "first")
    assert roles[("Dense_1/kernel", 0)] == "write" and roles[("Dense_1/bias", 0)] == "write"
    assert roles[("Dense_1/kernel", 1)] == "read"
    custom = ot_fusion(SPEC, ref, permuted, roles={("Dense_2/kernel", 0): "write"})
    assert custom.roles[("Dense_2/kernel", 0)] == "write"
    with pytest.raises(ValueError, match="not an axis of the spec"):
        ot_fusion(SPEC, ref, permuted, roles={("Dense_2/bias", 0): "write"})
    with pytest.raises(ValueError, match="transports has no entry for group 'h1'"):
        apply_transports(SPEC, {"h0": out.transports["h0"]}, permuted)


@pytest.mark.parametrize("solver,w_other", [("exact", 8), ("sinkhorn", 8), ("exact", 16)])
def test_bf16_models_are_fused_in_float32_and_returned_in_bf16(solver, w_other):
    """bf16 in, bf16 out: the float32 fusion of the same (upcast) values, cast to bf16."""
    # Cast on the host (the same rounding as XLA's convert): no program per leaf shape.
    to = lambda tree, dt: jax.tree.map(lambda a: jax.device_put(np.asarray(a).astype(dt)), tree)  # noqa: E731
    ref = to(mlp(0), jnp.bfloat16)
    other = to(mlp(1, w_other, w_other), jnp.bfloat16)
    out = ot_fusion(SPEC, ref, other, solver=solver, weight=0.3)
    want = ot_fusion(SPEC, to(ref, jnp.float32), to(other, jnp.float32), solver=solver, weight=0.3)
    for got, exp in ((out.fused, want.fused), (out.aligned, want.aligned)):
        assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(got))
        assert_trees_close(got, to(exp, jnp.bfloat16), **BF16)
    for t, t32 in zip(out.transports.values(), want.transports.values(), strict=True):
        assert t.dtype == jnp.float32  # couplings are computed in float32
        np.testing.assert_allclose(t, t32, rtol=1e-5, atol=1e-6)
    mapped = out.apply(other)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(mapped))
    assert_trees_close(mapped, out.aligned, **EXACT)


def test_float64_models_stay_float64_under_x64():
    """With x64 enabled, float64 models are fused in float64 (not through float32)."""
    with jax.enable_x64(True):
        ref = mlp(0, dtype=jnp.float64)
        permuted, _ = permute(SPEC, ref, 2)
        out = ot_fusion(SPEC, ref, permuted, weight=0.3)
        for tree in (out.fused, out.aligned):
            assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(tree))
        # float32 arithmetic would be off by ~1e-8 relative; float64 is exact here.
        assert_trees_close(out.aligned, ref, rtol=1e-14, atol=1e-14)
        assert_trees_close(out.fused, ref, rtol=1e-14, atol=1e-14)
        assert all(t.dtype == jnp.float64 for t in out.transports.values())
        wide = mlp(1, 16, 16, dtype=jnp.float64)
        soft = ot_fusion(SPEC, ref, wide, solver="sinkhorn")
        assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(soft.fused))
        assert all(t.dtype == jnp.float64 for t in soft.transports.values())


def test_errors(models):
    """Errors name the path, the group or the hyperparameter."""
    ref, other, _, _, _ = models
    bad = jax.tree.map(lambda a: a, other)
    bad["Dense_2"]["bias"] = jax.device_put(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match=r"'Dense_2/bias': shape \(4,\) != \(3,\)"):
        ot_fusion(SPEC, ref, bad)
    bad = jax.tree.map(lambda a: a, other)
    bad["Dense_0"]["kernel"] = jax.device_put(np.zeros((6, 8), np.float32))
    with pytest.raises(ValueError, match=r"'Dense_0/kernel': axis 0 has 6 != 5"):
        ot_fusion(SPEC, ref, bad)
    bad = jax.tree.map(lambda a: a, other)
    del bad["Dense_2"]
    with pytest.raises(
        ValueError, match=r"other differs from ref: it is missing \['Dense_2'\]\['bias'\]"
    ):
        ot_fusion(SPEC, ref, bad)
    bad = jax.tree.map(lambda a: a, other)
    nan = np.array(bad["Dense_1"]["kernel"])
    nan[0, 0] = np.nan
    bad["Dense_1"]["kernel"] = jax.device_put(nan)
    with pytest.raises(ValueError, match=r"other has NaN or Inf values at \['Dense_1'\]\['kernel'\]"):
        ot_fusion(SPEC, ref, bad)
    with pytest.raises(ValueError, match=r"weight must lie in \[0.0, 1.0\]"):
        ot_fusion(SPEC, ref, other, weight=1.5)
    with pytest.raises(ValueError, match="solver must be"):
        ot_fusion(SPEC, ref, other, solver="emd")
    with pytest.raises(ValueError, match="epsilon must lie"):
        ot_fusion(SPEC, ref, other, solver="sinkhorn", epsilon=0.0)
    with pytest.raises(ValueError, match="not a leaf of params"):
        ot_fusion(PermutationSpec({"h": [("Dense_9/kernel", 1)]}), ref, other)
    square = PermutationSpec({"h": [("Dense_1/kernel", 0), ("Dense_1/kernel", 1)]})
    with pytest.raises(ValueError, match="group 'h' appears on no leaf exactly once"):
        ot_fusion(square, ref, other)
    with pytest.raises(ValueError, match=r"lcm\(97, 89\) = 8633 replicas"):
        solve_transport(jax.device_put(np.zeros((97, 89), np.float32)))
