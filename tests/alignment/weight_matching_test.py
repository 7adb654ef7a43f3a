"""Tests for Git Re-Basin weight matching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax.alignment import PermutationSpec
from fusionjax.alignment import _weight_matching as wm
from fusionjax.alignment import _weight_matching_host as wm_host
from fusionjax.alignment._weight_matching import weight_matching
from tests import _testing as T


def mlp_spec(num_hidden):
    """Units of hidden layer l live on Dense_l's outputs and Dense_{l+1}'s inputs."""
    return PermutationSpec(
        {
            f"P{k}": [
                (f"Dense_{k}/kernel", 1),
                (f"Dense_{k}/bias", 0),
                (f"Dense_{k + 1}/kernel", 0),
            ]
            for k in range(num_hidden)
        }
    )


def mlp_params(seed, dims):
    """Random MLP parameters (built with NumPy: no compilation per shape)."""
    r = np.random.default_rng(seed)
    params = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        params[f"Dense_{i}"] = {
            "kernel": jax.device_put(r.standard_normal((a, b), np.float32) / np.sqrt(a)),
            "bias": jax.device_put(0.1 * r.standard_normal((b,), np.float32)),
        }
    return params


def mlp_apply(params, x):
    """The MLP's forward pass in NumPy float64."""
    n = len(params)
    for i in range(n):
        layer = params[f"Dense_{i}"]
        x = x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)
        if i < n - 1:
            x = np.maximum(x, 0)
    return x


def np_permute(spec, perms, params):
    """apply_permutations in NumPy (test setup without per-shape compilation)."""
    axes = spec.leaf_axes(params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for kp, x in flat:
        x = np.asarray(x)
        for ax, g in enumerate(axes.get("/".join(k.key for k in kp), ())):
            if g is not None:
                x = np.take(x, np.asarray(perms[g]), axis=ax)
        out.append(jax.device_put(x))
    return treedef.unflatten(out)


def planted(seed, dims, noise=1e-3):
    """``(spec, ref, other, P)``: other is ref with hidden units permuted by P, plus noise."""
    spec = mlp_spec(len(dims) - 2)
    ref = mlp_params(seed, dims)
    r = np.random.default_rng(seed + 1000)
    perms = {k: r.permutation(n).astype(np.int32) for k, n in spec.sizes(ref).items()}
    other = np_permute(spec, perms, ref)
    other = jax.tree.map(
        lambda x: jax.device_put(np.asarray(x) + noise * r.standard_normal(x.shape, np.float32)), other
    )
    return spec, ref, other, perms


def inverse(perms):
    return {k: np.argsort(p).astype(np.int32) for k, p in perms.items()}


def assert_perms_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize(
    "solver,dims",
    [
        ("scipy", (5, 8, 3)),
        ("scipy", (8, 32, 24, 32, 5)),
        ("hungarian", (8, 32, 24, 32, 5)),
        ("auto", (8, 32, 24, 32, 5)),
    ],
    ids=str,
)
def test_planted_permutation_recovered_exactly(solver, dims):
    spec, ref, other, perms = planted(0, dims)
    out = weight_matching(spec, ref, other, key=jax.random.key(1), solver=solver)
    # other's unit P[i] is ref's unit i, so the matching gathers other by P^-1.
    assert_perms_equal(out.permutations, inverse(perms))
    assert bool(out.converged)
    T.assert_trees_close(out.apply(other), ref, rtol=0, atol=1e-2)
    # Function preserved: the aligned model computes what other computes.
    x = np.random.default_rng(2).standard_normal((7, dims[0]))
    np.testing.assert_allclose(
        mlp_apply(out.apply(other), x), mlp_apply(other, x), rtol=1e-5, atol=1e-5
    )


def test_planted_conv_permutation_recovered():
    r = np.random.default_rng(0)
    shapes = {"conv0": [(3, 3, 2, 6), (6,)], "conv1": [(3, 3, 6, 7), (7,)], "head": [(7, 3)]}
    ref = {
        k: dict(
            zip(
                ("kernel", "bias")[: len(v)],
                (jax.device_put(r.standard_normal(s, np.float32)) for s in v),
                strict=True,
            )
        )
        for k, v in shapes.items()
    }
    spec = PermutationSpec(
        {
            "c0": [("conv0/kernel", 3), ("conv0/bias", 0), ("conv1/kernel", 2)],
            "c1": [("conv1/kernel", -1), ("conv1/bias", 0), ("head/kernel", 0)],
        }
    )
    perms = {k: r.permutation(n).astype(np.int32) for k, n in spec.sizes(ref).items()}
    other = np_permute(spec, perms, ref)
    out = weight_matching(spec, ref, other, solver="scipy")
    T.assert_trees_close(out.apply(other), ref)


@pytest.mark.parametrize("solver", ["scipy", "hungarian"])
def test_float64_numpy_inputs_without_x64_match_in_float32(solver):
    # x64 off (the suite's setting): float64 NumPy weights are matched as JAX holds them,
    # in float32, without a "float64 is not available" warning from inside the library
    # (the suite turns warnings into errors).
    assert not jax.config.read("jax_enable_x64")
    spec, ref, other, perms = planted(0, (8, 32, 24, 32, 5))
    as64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)  # noqa: E731
    out = weight_matching(spec, as64(ref), as64(other), solver=solver)
    assert_perms_equal(out.permutations, inverse(perms))
    assert out.objective.dtype == jnp.float32
    with jax.enable_x64(True):  # with x64 on, the same inputs are matched in float64
        out = weight_matching(spec, as64(ref), as64(other), solver=solver)
        assert_perms_equal(out.permutations, inverse(perms))
        assert out.objective.dtype == jnp.float64


@pytest.mark.parametrize("solver", ["scipy", "hungarian"])
def test_identical_models_give_identity(solver):
    spec = mlp_spec(3)
    ref = mlp_params(3, (8, 32, 24, 32, 5))
    out = weight_matching(spec, ref, ref, solver=solver)
    for k, n in spec.sizes(ref).items():
        np.testing.assert_array_equal(np.asarray(out.permutations[k]), np.arange(n))
    expected = sum(float(np.vdot(x, x)) for x in map(np.asarray, jax.tree.leaves(ref)))
    np.testing.assert_allclose(float(out.objective), expected, rtol=1e-5)


def objective(spec, perms, ref, other):
    moved = np_permute(spec, perms, other)
    return sum(
        float(np.vdot(np.asarray(a, np.float64), np.asarray(b, np.float64)))
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(moved), strict=True)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_objective_never_below_identity_and_is_reported(seed):
    key = jax.random.key(seed)
    spec = mlp_spec(3)
    dims = (8, 32, 24, 32, 5)
    ref = mlp_params(seed, dims)
    other = mlp_params(seed + 99, dims)
    out = weight_matching(spec, ref, other, key=key, solver="scipy")
    ident = {k: np.arange(n) for k, n in spec.sizes(ref).items()}
    assert float(out.objective) >= objective(spec, ident, ref, other)
    np.testing.assert_allclose(
        float(out.objective), objective(spec, out.permutations, ref, other), rtol=1e-5
    )
    assert bool(out.converged)


def test_scipy_and_hungarian_agree_on_random_pair(rng):
    spec = mlp_spec(3)
    dims = (8, 32, 24, 32, 5)
    ref = mlp_params(4, dims)
    other = mlp_params(5, dims)
    a, sa = wm._weight_matching(
        spec, ref, other, max_iter=100, key=rng, init_permutations=None, solver="scipy"
    )
    b, sb = wm._weight_matching(
        spec, ref, other, max_iter=100, key=rng, init_permutations=None, solver="hungarian"
    )
    assert_perms_equal(a.permutations, b.permutations)
    np.testing.assert_allclose(float(a.objective), float(b.objective), rtol=1e-6)
    assert (sa.sweeps, sa.solves) == (sb.sweeps, sb.solves)


@pytest.mark.parametrize("n", [12, 256])
def test_skipping_matches_plain_coordinate_ascent(rng, n):
    """The result equals Algorithm 1 run plainly (a short NumPy/scipy version).

    n = 256 also exercises the cached, low-rank-updated contributions.
    """
    import scipy.optimize

    spec = mlp_spec(3)
    dims = (5, n, n, n, 3)
    ref = mlp_params(6, dims)
    other = mlp_params(7, dims)
    out, stats = wm._weight_matching(
        spec, ref, other, max_iter=100, key=rng, init_permutations=None, solver="scipy"
    )
    assert stats.skipped > 0
    if n >= wm_host._INCREMENTAL_MIN_SIZE:
        assert stats.updates > 0
    orders = np.asarray(wm.sweep_orders(rng, 100, 3))
    A = {f"{k}/{j}": np.asarray(v, np.float64) for k, d in ref.items() for j, v in d.items()}
    B = {f"{k}/{j}": np.asarray(v, np.float64) for k, d in other.items() for j, v in d.items()}
    perm = {g: np.arange(n) for g in spec.names}
    for t in range(100):
        progress = False
        for gi in orders[t]:
            g = spec.names[gi]
            cost = np.outer(A[f"Dense_{gi}/bias"], B[f"Dense_{gi}/bias"])
            left = (
                B[f"Dense_{gi}/kernel"] if gi == 0 else B[f"Dense_{gi}/kernel"][perm[f"P{gi - 1}"]]
            )
            cost += A[f"Dense_{gi}/kernel"].T @ left
            right = B[f"Dense_{gi + 1}/kernel"]
            if gi < 2:
                right = right[:, perm[f"P{gi + 1}"]]
            cost += A[f"Dense_{gi + 1}/kernel"] @ right.T
            _, new = scipy.optimize.linear_sum_assignment(cost, maximize=True)
            ar = np.arange(n)
            progress |= cost[ar, new].sum() > cost[ar, perm[g]].sum() + 1e-12
            perm[g] = new
        if not progress:
            break
    assert_perms_equal(out.permutations, perm)


def test_init_permutations_honoured():
    spec, ref, other, perms = planted(1, (8, 32, 24, 32, 5))
    answer = inverse(perms)
    # No sweeps: the initial permutations come back unchanged.
    out = weight_matching(spec, ref, other, max_iter=0, init_permutations=answer)
    assert_perms_equal(out.permutations, answer)
    assert not bool(out.converged)
    # Starting at the optimum: one confirming sweep, nothing moves.
    res, stats = wm._weight_matching(
        spec, ref, other, max_iter=100, key=None, init_permutations=answer, solver="scipy"
    )
    assert_perms_equal(res.permutations, answer)
    assert stats.sweeps == 1 and bool(res.converged)
    # A different start is honoured too (max_iter=0 returns it verbatim).
    start = {k: np.random.default_rng(5).permutation(n) for k, n in spec.sizes(ref).items()}
    out = weight_matching(spec, ref, other, max_iter=0, init_permutations=start)
    assert_perms_equal(out.permutations, start)


def test_max_iter_limits_sweeps_and_reports_not_converged(rng):
    spec = mlp_spec(3)
    dims = (8, 32, 24, 32, 5)
    ref = mlp_params(8, dims)
    other = mlp_params(9, dims)
    out, stats = wm._weight_matching(
        spec, ref, other, max_iter=1, key=rng, init_permutations=None, solver="scipy"
    )
    assert stats.sweeps == 1 and not bool(out.converged)


def test_under_jit_uses_the_compiled_solver(rng):
    spec = mlp_spec(3)
    dims = (8, 32, 24, 32, 5)
    ref = mlp_params(10, dims)
    other = mlp_params(11, dims)

    @jax.jit
    def run(ref, other, key):
        out = weight_matching(spec, ref, other, key=key)
        return out.permutations, out.objective, out.converged

    perms, obj, conv = run(ref, other, rng)
    eager = weight_matching(spec, ref, other, key=rng, solver="scipy")
    assert_perms_equal(perms, eager.permutations)
    np.testing.assert_allclose(float(obj), float(eager.objective), rtol=1e-6)
    assert bool(conv)
    with pytest.raises(ValueError, match="cannot be used under jax.jit"):
        jax.jit(lambda r: weight_matching(spec, r, other, solver="scipy").objective)(ref)


def test_sweep_orders_are_permutations_and_key_dependent():
    a = np.asarray(wm.sweep_orders(jax.random.key(0), 50, 5))
    b = np.asarray(wm.sweep_orders(jax.random.key(1), 50, 5))
    assert a.shape == (50, 5)
    assert all(sorted(r) == list(range(5)) for r in a)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(
        np.asarray(wm.sweep_orders(None, 3, 4)), np.tile(np.arange(4), (3, 1))
    )
    traced = jax.jit(lambda k: wm.sweep_orders(k, 50, 5))(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(traced), a)


def test_errors_name_the_path():
    spec = mlp_spec(1)
    ref = mlp_params(0, (4, 6, 3))
    bad = jax.tree.map(lambda x: x, ref)
    bad["Dense_1"]["kernel"] = jnp.zeros((6, 2))
    with pytest.raises(ValueError, match=r"\['Dense_1'\]\['kernel'\]"):
        weight_matching(spec, ref, bad)
    nan = jax.tree.map(lambda x: x, ref)
    nan["Dense_0"]["bias"] = jax.device_put(np.full(6, np.nan, np.float32))
    with pytest.raises(ValueError, match=r"other has NaN.*\['Dense_0'\]\['bias'\]"):
        weight_matching(spec, ref, nan)
    missing = {"Dense_0": ref["Dense_0"]}
    with pytest.raises(ValueError, match="missing"):
        weight_matching(spec, ref, missing)
    with pytest.raises(ValueError, match="Dense_9/kernel"):
        weight_matching(PermutationSpec({"h": [("Dense_9/kernel", 0)]}), ref, ref)
    sizes = PermutationSpec({"h": [("Dense_0/kernel", 1), ("Dense_1/kernel", 1)]})
    with pytest.raises(ValueError, match="different sizes"):
        weight_matching(sizes, ref, ref)
    with pytest.raises(ValueError, match="solver"):
        weight_matching(spec, ref, ref, solver="lapjv")
    with pytest.raises(ValueError, match="not a permutation"):
        weight_matching(spec, ref, ref, init_permutations={"P0": jnp.zeros(6, jnp.int32)})
    with pytest.raises(ValueError, match="max_iter"):
        weight_matching(spec, ref, ref, max_iter=-1)


GRU_DIMS = (4, 16, 3)  # inputs, hidden units, outputs
GRU_SPEC = PermutationSpec(
    {
        "h": [
            (f"cell/{kind}{gate}", axis)
            for gate in "zrn"
            for kind, axis in (("w", 1), ("u", 0), ("u", 1), ("b", 0))
        ]
        + [("out", 0)]
    }
)
"""The hidden units of a GRU: written by every gate and read by every recurrent kernel."""


def gru_params(seed, dims=GRU_DIMS):
    """A random GRU cell and readout (NumPy-drawn)."""
    d, h, c = dims
    r = np.random.default_rng(seed)
    cell = {}
    for gate in "zrn":
        cell[f"w{gate}"] = r.standard_normal((d, h), np.float32) / np.sqrt(d)
        cell[f"u{gate}"] = r.standard_normal((h, h), np.float32) / np.sqrt(h)
        cell[f"b{gate}"] = 0.1 * r.standard_normal((h,), np.float32)
    params = {"cell": cell, "out": r.standard_normal((h, c), np.float32)}
    return jax.tree.map(jax.device_put, params)


def gru_apply(params, xs):
    """Runs the GRU over ``xs [T, B, d]`` from a zero state; logits of the last step."""
    p = params["cell"]

    def step(h, x):
        z = jax.nn.sigmoid(x @ p["wz"] + h @ p["uz"] + p["bz"][None])
        r = jax.nn.sigmoid(x @ p["wr"] + h @ p["ur"] + p["br"][None])
        n = jnp.tanh(x @ p["wn"] + (r * h) @ p["un"] + p["bn"][None])
        return (1 - z) * n + z * h, None

    h, _ = jax.lax.scan(step, jnp.zeros((xs.shape[1], GRU_DIMS[1])), xs)
    return h @ params["out"]


def test_gru_spec_is_the_derived_one_and_self_coupled():
    """derive_spec finds the recurrent group; the plan marks it self-coupled (an MLP's is not)."""
    from fusionjax.alignment import derive_spec
    from fusionjax.alignment._weight_matching_problem import make_plan

    params = gru_params(0)
    xs = jnp.zeros((5, 2, GRU_DIMS[0]))
    assert derive_spec(gru_apply, params, xs).same_groups(GRU_SPEC, params)
    assert make_plan(GRU_SPEC, params).self_coupled(0)
    assert not make_plan(mlp_spec(1), mlp_params(0, (4, 6, 3))).self_coupled(0)


def test_recurrent_group_objective_never_decreases_and_converges(rng):
    """A group on both axes of a recurrent kernel: each step is a quadratic problem.

    Before steps of such groups were checked against the true objective, this pair went
    33.01 (2 sweeps) -> 31.46 (3) -> 34.12 (5) -> 33.73 (10 and 100), never converging.
    """
    ref, other = gru_params(0), gru_params(1)
    values = []
    for sweeps in (1, 2, 3, 4, 6):  # sweep t's order does not depend on max_iter
        out = weight_matching(GRU_SPEC, ref, other, max_iter=sweeps, key=rng, solver="scipy")
        values.append(float(out.objective))
        np.testing.assert_allclose(
            values[-1], objective(GRU_SPEC, out.permutations, ref, other), rtol=1e-5
        )
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(values, values[1:], strict=False)), values
    assert values[-1] > values[0]
    out, stats = wm._weight_matching(
        GRU_SPEC, ref, other, max_iter=100, key=rng, init_permutations=None, solver="scipy"
    )
    assert bool(out.converged) and stats.sweeps < 100 and stats.rejected > 0
    assert float(out.objective) == pytest.approx(values[-1], rel=1e-6)
    # Honest: restarting from the result, no step is taken.
    again = weight_matching(
        GRU_SPEC, ref, other, key=rng, init_permutations=out.permutations, solver="scipy"
    )
    assert bool(again.converged)
    assert_perms_equal(again.permutations, out.permutations)
    # The compiled loop takes the same steps.
    compiled = weight_matching(GRU_SPEC, ref, other, key=rng, solver="hungarian")
    assert bool(compiled.converged)
    assert_perms_equal(compiled.permutations, out.permutations)
