"""Twin-Merging: exclusive factors vs NumPy SVD, the low-rank layer vs per-input weights, routing.

Tiny shapes: a 5-8-8-4 MLP of ``nn.Dense`` layers and three tasks whose inputs come from
separated clusters (so a router on features can tell them apart). The testbed evidence
is in ``tests/learned/twin_evidence_test.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from fusionjax import learned as fl
from tests.learned.wemoe_test import MLP  # the same 5-8-8-4 model of three nn.Dense

T, D, N = 3, 5, 40
M = 20  # held-out inputs per check: one shape, so each forward compiles once
LAYERS = [("Dense_0",), ("Dense_1",), ("Dense_2",)]
TA = fj.merging.task_arithmetic(scaling=0.3)  # one object: fj.merge compiles per merger


def features_fn(params, x):
    """The MLP's output, the features the router reads."""
    return MLP().apply({"params": params}, x)


FWD = jax.jit(features_fn)
DENSE = jax.jit(lambda x, w, k, b, f: fl.twin_dense(x, w, k, b, f, precision="highest"))


def logits_fn(params, task_index, x):
    """A fixed linear head per task on the features."""
    heads = jnp.asarray(np.random.default_rng(task_index).standard_normal((4, 2 + task_index)))
    return jnp.dot(features_fn(params, x), heads.astype(jnp.float32))


def _cluster(t, n, seed):
    """Inputs of task ``t``: a Gaussian cloud around ``6 e_t``."""
    rng = np.random.default_rng([seed, t])
    x = rng.standard_normal((n, D)) + 6.0 * np.eye(D)[t]
    return jax.device_put(x.astype(np.float32))


@pytest.fixture(scope="module")
def problem():
    """``(base, finetuned, task inputs)``; random numbers from NumPy (no per-shape compiles)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(MLP().init, jax.random.key(0), jnp.ones((1, D)))["params"]
    base = jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape)).astype(np.float32),
                        shapes)  # fmt: skip
    fts = [  # float32 sums on the host, as on the device; placed once
        jax.tree.map(lambda b: b + (0.3 * rng.standard_normal(b.shape)).astype(b.dtype), base)
        for _ in range(T)
    ]
    base, fts = jax.device_put((base, fts))
    return base, fts, [_cluster(t, N, 0) for t in range(T)]


@pytest.fixture(scope="module")
def trained(problem):
    """A compiled router run with full rank (so a one-hot routing recovers each model),
    on minibatches of 32 of the 120 examples."""
    base, fts, data = problem
    return fl.twin_merging(
        base, fts, data, features_fn, shared=TA, rank=100, steps=60, learning_rate=5e-2,
        batch_size=32, key=jax.random.key(3), chunk=25,
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# The exclusive factors: a NumPy SVD reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [2, 100], ids=["truncated", "clipped-to-full"])
def test_exclusive_factors_match_numpy_svd(problem, rank):
    """U S Vᵀ is the best rank-r approximation of θ_t − θ_shared; biases are kept whole."""
    base, fts, _ = problem
    shared = fj.merge(base, fts, TA)
    factors = fl.exclusive_factors(shared, fts, layers=LAYERS, rank=rank)
    factors = jax.tree.map(np.asarray, factors)  # indexed on the host
    for (name,) in LAYERS:
        entry, w_shared = factors[name], np.asarray(shared[name]["kernel"], np.float64)
        d, e = w_shared.shape
        r = min(rank, d, e)
        assert entry["u"].shape == (T, d, r) and entry["s"].shape == (T, r)
        assert entry["vt"].shape == (T, r, e) and entry["bias"].shape == (T, e)
        for t, ft in enumerate(fts):
            delta = np.asarray(ft[name]["kernel"], np.float64) - w_shared
            u, s, vt = np.linalg.svd(delta, full_matrices=False)
            reference = (u[:, :r] * s[:r]) @ vt[:r]
            u_t, s_t, vt_t = (np.asarray(entry[k][t], np.float64) for k in ("u", "s", "vt"))
            np.testing.assert_allclose(s_t, s[:r], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose((u_t * s_t) @ vt_t, reference, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(u_t.T @ u_t, np.eye(r), atol=1e-5)
            np.testing.assert_allclose(vt_t @ vt_t.T, np.eye(r), atol=1e-5)
            np.testing.assert_allclose(
                entry["bias"][t],
                np.asarray(ft[name]["bias"]) - np.asarray(shared[name]["bias"]),
                rtol=1e-6, atol=1e-6,
            )  # fmt: skip
            if r < min(d, e):  # Eckart-Young: the error is the dropped spectrum
                err = np.linalg.norm(delta - reference)
                np.testing.assert_allclose(err, np.linalg.norm(s[r:]), rtol=1e-4)


# --------------------------------------------------------------------------------------
# The low-rank layer against materialised per-input weights
# --------------------------------------------------------------------------------------


def _per_input_reference(x, w, kernel, bias, f):
    """y_i = x_i (W + Σ_t w_it U_t S_t V_tᵀ) + b + Σ_t w_it Δb_t, one matrix per input (f64)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    u, s, vt = (np.asarray(f[k], np.float64) for k in ("u", "s", "vt"))
    deltas = np.einsum("tdr,tr,tre->tde", u, s, vt)
    out = []
    for i in range(x.shape[0]):
        w_i = np.asarray(kernel, np.float64) + np.tensordot(w[i], deltas, axes=1)
        y = x[i] @ w_i
        if bias is not None:
            y = y + np.asarray(bias, np.float64)
        if "bias" in f:
            y = y + w[i] @ np.asarray(f["bias"], np.float64)
        out.append(y)
    return np.stack(out)


@pytest.mark.parametrize(
    "x_shape, with_bias",
    [((6, 7), True), ((6, 3, 7), True), ((6, 7), False)],
    ids=["rows", "tokens", "no-bias"],
)
def test_twin_dense_matches_materialised_per_input_weights(x_shape, with_bias):
    """h W + Σ w_t ((h U_t) S_t) V_tᵀ equals h W(x) with W(x) built per input."""
    rng = np.random.default_rng(1)
    d, e, r, n = 7, 5, 2, x_shape[0]

    def draw(*shape):  # NumPy draws placed with device_put (no compile per shape)
        return jax.device_put(rng.standard_normal(shape).astype(np.float32))

    x, kernel = draw(*x_shape), draw(d, e)
    z = rng.standard_normal((n, T)).astype(np.float32)
    weights = jax.device_put(np.exp(z) / np.exp(z).sum(-1, keepdims=True))  # softmax on the host
    f = {"u": draw(T, d, r), "s": jax.device_put(np.abs(np.asarray(draw(T, r)))), "vt": draw(T, r, e)}
    bias = draw(e) if with_bias else None
    if with_bias:
        f["bias"] = draw(T, e)
    y = DENSE(x, weights, kernel, bias, f)
    assert y.shape == x_shape[:-1] + (e,)
    np.testing.assert_allclose(y, _per_input_reference(x, weights, kernel, bias, f),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_twin_apply_is_the_per_input_merge_of_the_whole_model(problem):
    """In a flax model: one-hot routing at full rank gives each fine-tuned model exactly;
    a mixed routing gives the model θ_shared + Σ_t w_t Δ_t (the same w for every row)."""
    base, fts, data = problem
    shared = fj.merge(base, fts, TA)
    factors = fl.exclusive_factors(shared, fts, layers=LAYERS, rank=100)

    @jax.jit
    def routed(factors, weights, x):
        with fl.twin_apply(factors, weights):
            return features_fn(shared, x)

    x = _cluster(0, M, seed=9)
    for t in range(T):
        onehot = jax.device_put(np.tile(np.eye(T, dtype=np.float32)[t], (M, 1)))
        np.testing.assert_allclose(routed(factors, onehot, x), FWD(fts[t], x),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    w = np.array([0.2, 0.5, 0.3], np.float32)
    merged = jax.tree.map(  # float32 on the host: no eager op per leaf shape
        lambda s, *f: s + sum(wt * (ft - s) for wt, ft in zip(w, f, strict=True)),
        *jax.tree.map(np.asarray, (shared, *fts)),
    )  # fmt: skip
    got = routed(factors, jax.device_put(np.tile(w, (M, 1))), x)
    np.testing.assert_allclose(got, FWD(merged, x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# The router and the whole method
# --------------------------------------------------------------------------------------


def test_router_learns_the_tasks_and_the_model_follows(problem, trained):
    """The loss falls, held-out inputs are routed to their task, and the routed model is
    closer to each input's own fine-tuned model than the shared expert is."""
    base, fts, _ = problem
    res = trained
    assert res.losses.shape == (60,)
    assert res.losses[-1] < 0.2 * res.losses[0], res.losses[[0, -1]]
    assert np.log(T) - 1e-4 < res.losses[0] < np.log(T) + 1e-4  # zero output layer at init
    np.testing.assert_allclose(res.shared["Dense_1"]["kernel"],
                               fj.merge(base, fts, TA)
                               ["Dense_1"]["kernel"], rtol=1e-6)  # fmt: skip
    for t in range(T):
        x = _cluster(t, M, seed=9)  # held out
        w = np.asarray(fl.twin_weights(res, features_fn, x))  # checks in NumPy: no compiles
        assert np.mean(w.argmax(-1) == t) >= 0.9
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
        own = np.asarray(FWD(fts[t], x))
        near = np.linalg.norm(np.asarray(fl.twin_features(res, features_fn, x)) - own, axis=-1)
        far = np.linalg.norm(np.asarray(FWD(res.shared, x)) - own, axis=-1)
        confident = w[:, t] > 0.9
        assert confident.mean() >= 0.8, w[:, t]
        assert np.all((near < 0.5 * far)[confident]), (near, far)


def test_twin_logits_under_jit_equals_features_through_the_head(trained):
    """twin_logits works under jax.jit and agrees with twin_features through the head."""
    x = _cluster(1, M, seed=5)
    jitted = jax.jit(lambda res, x: fl.twin_logits(res, logits_fn, 1, x, features_fn=features_fn))(
        trained, x
    )
    head = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)), jnp.float32)
    np.testing.assert_allclose(
        jitted, jnp.dot(fl.twin_features(trained, features_fn, x), head), rtol=1e-5, atol=1e-5
    )


def test_ties_shared_expert_and_chosen_layers(problem):
    """Any Step builds the shared expert, the factors are taken against it, and only the
    chosen layers are routed."""
    base, fts, data = problem
    ties = fj.merging.ties(density=0.5, scaling=1.0)
    res = fl.twin_merging(base, fts, data, features_fn, shared=ties, rank=100, steps=0,
                          layers=["Dense_1"], key=jax.random.key(0))  # fmt: skip
    expected = fj.merge(base, fts, ties)
    np.testing.assert_allclose(res.shared["Dense_0"]["kernel"], expected["Dense_0"]["kernel"])
    assert set(res.factors) == {"Dense_1"}
    u, s, vt = (res.factors["Dense_1"][k][2] for k in ("u", "s", "vt"))
    np.testing.assert_allclose((u * s[None]) @ vt,
                               fts[2]["Dense_1"]["kernel"] - expected["Dense_1"]["kernel"],
                               atol=1e-5)  # fmt: skip
    assert res.losses.shape == (0,)


# --------------------------------------------------------------------------------------
# Errors, raised before any work
# --------------------------------------------------------------------------------------


def test_errors_name_the_parameter(problem):
    """Bad ranks, data, layers, keys and weights raise, naming what is wrong."""
    base, fts, data = problem
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="rank"):
        fl.twin_merging(base, fts, data, features_fn, rank=0, key=key)
    with pytest.raises(TypeError, match="rank"):
        fl.twin_merging(base, fts, data, features_fn, rank=2.5, key=key)
    with pytest.raises(ValueError, match="task_inputs"):
        fl.twin_merging(base, fts, data[:2], features_fn, key=key)
    with pytest.raises(ValueError, match=r"task_inputs\[1\]"):
        fl.twin_merging(base, fts, [data[0], data[1][:0], data[2]], features_fn, key=key)
    with pytest.raises(ValueError, match="finetuned"):
        fl.twin_merging(base, [], [], features_fn, key=key)
    with pytest.raises(ValueError, match="PRNG key"):
        fl.twin_merging(base, fts, data, features_fn)
    with pytest.raises(ValueError, match="layers names"):
        fl.twin_merging(base, fts, data, features_fn, layers=["Nope"], key=key)
    with pytest.raises(ValueError, match="steps"):
        fl.twin_merging(base, fts, data, features_fn, steps=-1, key=key)
    with pytest.raises(ValueError, match="layers names"):
        fl.exclusive_factors(base, fts, layers=[("Dense_0", "bias")], rank=2)
    factors = fl.exclusive_factors(base, fts, layers=[("Dense_0",)], rank=2)
    with pytest.raises(ValueError, match=r"\['Dense_0'\]"):
        with fl.twin_apply(factors, jnp.ones((3, T))):
            jax.eval_shape(features_fn, base, data[0][:5])  # 5 inputs, 3 weight rows
    with pytest.raises(ValueError, match=r"weights must be \[n, T\] with T = 3"):
        fl.twin_dense(jnp.ones((2, D)), jnp.ones((2, 2)), base["Dense_0"]["kernel"], None,
                      factors["Dense_0"])  # fmt: skip
    with pytest.raises(ValueError, match="factors holds no layer"):
        with fl.twin_apply({}, jnp.ones((2, T))):
            pass
