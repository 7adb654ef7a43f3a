"""Coefficient pytrees and the differentiable merge they define."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from tests._testing import F32
from tests._testing import assert_trees_close


def random_model(seed, *, dtype=jnp.float32):
    """A small nested-dict model with a kernel, a bias, a conv-like kernel and an int leaf.

    As ``tests._testing.random_model``, drawn with NumPy (no XLA compilation per shape).
    """
    rng = np.random.default_rng(seed)

    def draw(*shape):
        return jax.device_put(rng.standard_normal(shape).astype(np.float32).astype(dtype))

    return {
        "dense": {"kernel": draw(8, 4), "bias": draw(4)},
        "conv": {"kernel": draw(3, 3, 2, 5)},
        "scale": draw(),
        "step": jax.device_put(np.int32(7)),
    }


def finetune_like(base, seed, n, *, scale=0.1):
    """``n`` models near ``base`` (float leaves perturbed, int leaves equal), NumPy draws."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        leaves, treedef = jax.tree.flatten(base)
        new = [
            jax.device_put(
                (
                    np.asarray(x, np.float32)
                    + (scale * rng.standard_normal(x.shape)).astype(np.float32).astype(x.dtype)
                ).astype(x.dtype)
            )
            if jnp.issubdtype(x.dtype, jnp.floating)
            else x
            for x in leaves
        ]
        out.append(treedef.unflatten(new))
    return out


@pytest.fixture(scope="module")
def models():
    base = random_model(0)
    fts = finetune_like(base, 1, 3)
    return base, fts, fj.learned.stacked_task_vectors(base, fts)


def _manual(base, fts, lam_of_leaf):
    """θ0 + Σ_t λ_t τ_t computed leaf by leaf with NumPy."""
    out = {}
    for path, b in jax.tree_util.tree_flatten_with_path(base)[0]:
        name = jax.tree_util.keystr(path)
        if not jnp.issubdtype(b.dtype, jnp.floating):
            out[name] = np.asarray(b)
            continue
        lam = lam_of_leaf(name)
        acc = np.asarray(b, np.float64)
        for t, ft in enumerate(fts):
            f = dict(
                (jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(ft)[0]
            )
            acc = acc + lam[t] * (np.asarray(f[name], np.float64) - np.asarray(b, np.float64))
        out[name] = acc
    return out


def _flat(tree):
    return {
        jax.tree_util.keystr(p): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_combine_matches_manual_sum(models, granularity, maybe_jit):
    base, fts, tvs = models
    coef = fj.learned.init_coefficients(tvs, granularity=granularity)
    # Distinct values per task and per leaf.
    leaves, treedef = jax.tree.flatten(coef)
    coef = treedef.unflatten(  # built on the host, placed once
        jax.device_put(
            [np.asarray(x) * np.float32(1.0 + i) + np.arange(3, dtype=np.float32) for i, x in enumerate(leaves)]
        )
    )
    got = maybe_jit(fj.learned.combine)(base, tvs, coef)
    lam = dict(zip(_flat(coef).keys(), [np.asarray(x, np.float64) for x in jax.tree.leaves(coef)], strict=False))

    def lam_of_leaf(name):
        return lam[""] if granularity == "task" else lam[name]

    want = _manual(base, fts, lam_of_leaf)
    for name, x in _flat(got).items():
        np.testing.assert_allclose(x, want[name], err_msg=name, **F32)
    assert got["step"].dtype == jnp.int32 and int(got["step"]) == 7


def test_block_coefficients_scale_each_block(models):
    base, fts, tvs = models
    partition = fj.learned.random_blocks(base, 4, jax.random.key(3))
    coef = fj.learned.init_coefficients(tvs, granularity="block", partition=partition)
    assert coef["dense"]["kernel"].shape == (3, 4)
    assert partition["step"] is None
    values = np.arange(12.0, dtype=np.float32).reshape(3, 4) / np.float32(10)
    coef = jax.tree.map(lambda c: jax.device_put(values[:, : c.shape[1]]), coef)
    got = fj.learned.combine(base, tvs, coef, partition=partition)
    ids = np.asarray(partition["dense"]["kernel"])
    want = np.asarray(base["dense"]["kernel"], np.float64) + sum(
        np.asarray(values)[t][ids] * np.asarray(tvs["dense"]["kernel"][t], np.float64)
        for t in range(3)
    )
    np.testing.assert_allclose(got["dense"]["kernel"], want, **F32)
    # One block with equal coefficients is layer-wise merging.
    zero = jax.device_put(jax.tree.map(lambda p: np.zeros(p.shape, p.dtype), partition))
    one = fj.learned.init_coefficients(tvs, granularity="block", partition=zero)
    assert_trees_close(
        fj.learned.combine(base, tvs, one, partition=zero),
        fj.learned.combine(base, tvs, fj.learned.init_coefficients(tvs)),
    )


def test_zero_coefficients_give_base_and_one_hot_gives_model(models):
    base, fts, tvs = models
    assert_trees_close(fj.learned.combine(base, tvs, jnp.zeros(3)), base)
    assert_trees_close(fj.learned.combine(base, tvs, jnp.array([0.0, 1.0, 0.0])), fts[1])


def test_clamp_clips_forward_and_zeroes_gradient_outside(models):
    base, _, tvs = models
    coef = jnp.array([-0.5, 0.5, 1.5])
    clipped = fj.learned.combine(base, tvs, coef, clamp=(0.0, 1.0))
    assert_trees_close(clipped, fj.learned.combine(base, tvs, jnp.array([0.0, 0.5, 1.0])))

    def f(c):
        p = fj.learned.combine(base, tvs, c, clamp=(0.0, 1.0))
        return jnp.sum(p["dense"]["kernel"] ** 2)

    g = np.asarray(jax.jit(jax.grad(f))(coef))  # one program (eager grads: learned/loop_test)
    assert g[0] == 0 and g[2] == 0 and g[1] != 0
    np.testing.assert_array_equal(fj.learned.effective(coef, (0.0, 1.0)), [0.0, 0.5, 1.0])


def test_gradient_is_taken_with_respect_to_coefficients_only(models):
    base, _, tvs = models
    coef = fj.learned.init_coefficients(tvs)

    def f(c):
        p = fj.learned.combine(base, tvs, c)
        return sum(
            jnp.sum(x**2) for x in jax.tree.leaves(p) if jnp.issubdtype(x.dtype, jnp.floating)
        )

    g = jax.jit(jax.grad(f))(coef)  # one program (eager grads: learned/loop_test)
    assert jax.tree.structure(g) == jax.tree.structure(coef)
    # d/dλ_t Σ θ² = Σ 2 θ τ_t; check one leaf by hand.
    p = fj.learned.combine(base, tvs, coef)
    want = 2 * np.tensordot(np.asarray(tvs["dense"]["bias"]), np.asarray(p["dense"]["bias"]), axes=1)
    np.testing.assert_allclose(g["dense"]["bias"], want, rtol=1e-5)
    # The jaxpr of the gradient has no output the size of the task vectors.
    out_shapes = [o.aval.shape for o in jax.make_jaxpr(jax.grad(f))(coef).jaxpr.outvars]
    assert all(s == (3,) for s in out_shapes)


def test_bf16_leaves_are_merged_in_f32_and_cast_back():
    base = random_model(0, dtype=jnp.bfloat16)
    fts = finetune_like(base, 1, 2)
    tvs = fj.learned.stacked_task_vectors(base, fts)
    got = fj.learned.combine(base, tvs, jnp.array([0.5, 0.5]))
    assert got["dense"]["kernel"].dtype == jnp.bfloat16


def test_task_vector_fn_is_applied_and_merger_rejected(models):
    base, fts, _ = models
    trimmed = fj.learned.stacked_task_vectors(base, fts, fj.merging.trim(density=0.25))
    frac = float(jnp.mean(trimmed["dense"]["kernel"] != 0))
    assert 0.2 <= frac <= 0.3
    with pytest.raises(TypeError, match="merger"):
        fj.learned.stacked_task_vectors(base, fts, fj.merging.ties())


def test_errors_name_the_path(models):
    base, fts, tvs = models
    bad = jax.tree.map(lambda x: x, fj.learned.init_coefficients(tvs))
    bad["dense"]["kernel"] = jnp.zeros(2)
    with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\].*shape \(3,\)"):
        fj.learned.combine(base, tvs, bad)
    with pytest.raises(ValueError, match=r"\['conv'\]\['kernel'\]"):
        fj.learned.combine(
            base, {**tvs, "conv": {"kernel": tvs["conv"]["kernel"][:2]}}, jnp.zeros(3)
        )
    with pytest.raises(ValueError, match="init must be a scalar or have shape"):
        fj.learned.init_coefficients(tvs, init=jnp.zeros(2))
    with pytest.raises(ValueError, match="partition"):
        fj.learned.init_coefficients(tvs, granularity="block")
    with pytest.raises(ValueError, match="granularity"):
        fj.learned.init_coefficients(tvs, granularity="neuron")
    with pytest.raises(ValueError, match="empty"):
        fj.learned.stacked_task_vectors(base, [])
    with pytest.raises(ValueError, match=r"finetuned\[1\].*\['dense'\]\['bias'\]"):
        wrong = jax.tree.map(lambda x: x, fts[1])
        wrong["dense"]["bias"] = jnp.zeros(5)
        fj.learned.stacked_task_vectors(base, [fts[0], wrong])


def test_coefficient_table_lists_layers(models):
    _, _, tvs = models
    names, table = fj.learned.coefficient_table(fj.learned.init_coefficients(tvs))
    assert names == ["['conv']['kernel']", "['dense']['bias']", "['dense']['kernel']", "['scale']"]
    assert table.shape == (4, 3)
    names, table = fj.learned.coefficient_table(jnp.ones(3))
    assert names == ["*"] and table.shape == (1, 3)
