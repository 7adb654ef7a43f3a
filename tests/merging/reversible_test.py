"""Reversible model merging: exact recovery, monotone error in k, NumPy reference, storage."""

import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import merging as M

T_MODELS, R, N_IN, N_OUT = 4, 3, 7, 5


def models(seed, t=T_MODELS):
    rng = np.random.default_rng(seed)
    base = {
        "w": rng.normal(size=(N_IN, N_OUT)).astype(np.float32),
        "b": rng.normal(size=(N_OUT,)).astype(np.float32),
        "s": np.array(0.5, np.float32),
        "step": np.int32(3),
    }
    fts = [
        {
            "w": base["w"] + rng.normal(size=(N_IN, N_OUT)).astype(np.float32),
            "b": base["b"] + rng.normal(size=(N_OUT,)).astype(np.float32),
            "s": np.array(rng.normal(), np.float32),
            "step": np.int32(3),
        }
        for _ in range(t)
    ]
    return base, fts


def adapters(seed, t=T_MODELS, layout="torch"):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(t):
        a = rng.normal(size=(R, N_IN)).astype(np.float32)
        b = rng.normal(size=(N_OUT, R)).astype(np.float32)
        out.append({"q": M.LoRA(a, b) if layout == "torch" else M.LoRA(a.T, b.T)})
    return out


def np_rmm(xs, axis, k, center=True):
    """Per-position PCA over tasks, NumPy float64: the recovered arrays, one per task."""
    x = np.moveaxis(np.stack([np.float64(v) for v in xs]), axis + 1, -1)  # [T, *P, d]
    mu = x.mean(0) if center else np.zeros(x.shape[1:])
    out = np.empty_like(x)
    for pos in np.ndindex(*x.shape[1:-1]):
        xc = x[(slice(None), *pos)] - mu[pos]  # [T, d]
        u, s, vt = np.linalg.svd(xc, full_matrices=False)
        out[(slice(None), *pos)] = mu[pos] + (u[:, :k] * s[:k]) @ vt[:k]
    return list(np.moveaxis(out, -1, axis + 1))


def test_dense_recovery_exact_at_full_rank_and_matches_numpy():
    base, fts = models(0)
    exact = M.reversible_merge(base, fts, num_basis=T_MODELS - 1)
    lossy = M.reversible_merge(base, fts, num_basis=1)
    taus = [fts[t]["w"] - base["w"] for t in range(T_MODELS)]
    ref = np_rmm(taus, 1, 1)
    for t in range(T_MODELS):
        got = M.reversible_task_model(base, exact, t)
        for name in ("w", "b", "s"):
            np.testing.assert_allclose(got[name], fts[t][name], rtol=1e-5, atol=1e-5)
        assert got["step"] == 3 and got["step"].dtype == np.int32
        one = M.reversible_task_model(base, lossy, t)
        np.testing.assert_allclose(np.float64(one["w"]) - base["w"], ref[t], atol=1e-5)
        assert np.abs(one["w"] - fts[t]["w"]).max() > 1e-2  # k=1 is lossy: the test can fail


def test_error_falls_monotonically_with_k_and_vanishes_at_the_stacked_rank():
    # uncentred, flax layout (the centred torch path is checked against NumPy below)
    ads = adapters(1, t=5, layout="flax")  # positions hold R=3-vectors: rank <= 3
    errors = []
    for k in (1, 2, 3):
        out = M.reversible_lora(ads, num_basis=k, center=False, layout="flax")
        err = 0.0
        for t, ad in enumerate(ads):
            rec = M.reversible_adapter(out, t)["q"]
            err += float(np.sum((rec.a - ad["q"].a) ** 2) + np.sum((rec.b - ad["q"].b) ** 2))
        errors.append(err)
    assert errors[0] > errors[1] > errors[2] >= 0
    assert errors[2] < 1e-8  # k = R: the vectors span at most R dimensions


@pytest.mark.parametrize("layout", ["torch"])
def test_lora_matches_numpy_reference_and_paper_storage(layout):
    ads = adapters(2, layout=layout)
    k = 2
    out = M.reversible_lora(ads, num_basis=k, layout=layout)
    a_axis, b_axis = (0, 1) if layout == "torch" else (1, 0)
    ref_a = np_rmm([ad["q"].a for ad in ads], a_axis, k)
    ref_b = np_rmm([ad["q"].b for ad in ads], b_axis, k)
    for t in range(T_MODELS):
        rec = M.reversible_adapter(out, t)["q"]
        np.testing.assert_allclose(rec.a, ref_a[t], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(rec.b, ref_b[t], rtol=1e-5, atol=1e-5)
    # the paper's count: k(r + T) + r numbers per position, positions = in + out
    assert out.size() == (N_IN + N_OUT) * (k * (R + T_MODELS) + R)
    assert out.num_tasks == T_MODELS
    exact = M.reversible_lora(ads, num_basis=T_MODELS - 1, layout=layout)
    for t in range(T_MODELS):
        np.testing.assert_allclose(
            M.lora_delta(M.reversible_adapter(exact, t), layout=layout)["q"],
            M.lora_delta(ads[t], layout=layout)["q"],
            rtol=1e-4, atol=1e-4,
        )


def test_rank_option_recovers_the_truncated_svd_task_vectors():
    base, fts = models(3)
    out = M.reversible_merge(base, fts, num_basis=T_MODELS - 1, rank=2)
    # positions hold 2-vectors: num_basis is capped at 2 (exact: k >= min(r, T - 1))
    assert isinstance(out.basis["w"], M.LoRA) and out.basis["w"].a.shape == (2, 2, N_OUT)
    for t in range(T_MODELS):
        u, s, vt = np.linalg.svd(np.float64(fts[t]["w"]) - base["w"], full_matrices=False)
        ref = base["w"] + (u[:, :2] * s[:2]) @ vt[:2]
        got = M.reversible_task_model(base, out, t)
        np.testing.assert_allclose(got["w"], ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["b"], fts[t]["b"], rtol=1e-5, atol=1e-5)


def test_bfloat16_leaves_keep_their_dtype():
    base, fts = models(4)
    cast = lambda p: {**p, "w": jnp.asarray(p["w"], jnp.bfloat16)}  # noqa: E731
    out = M.reversible_merge(cast(base), [cast(f) for f in fts], num_basis=1)
    assert out.basis["w"].dtype == jnp.bfloat16
    assert M.reversible_task_model(cast(base), out, 0)["w"].dtype == jnp.bfloat16


def test_bad_inputs():
    base, fts = models(5)
    ads = adapters(5)
    with pytest.raises(ValueError, match="num_basis"):
        M.reversible_merge(base, fts, num_basis=0)
    with pytest.raises(TypeError, match="num_basis"):
        M.reversible_lora(ads, num_basis=1.5)
    with pytest.raises(ValueError, match="rank"):
        M.reversible_merge(base, fts, num_basis=1, rank=0)
    with pytest.raises(ValueError, match="finetuned"):
        M.reversible_merge(base, [], num_basis=1)
    with pytest.raises(ValueError, match=r"finetuned\[1\].*\['w'\]"):
        M.reversible_merge(base, [fts[0], {**fts[1], "w": fts[1]["w"][:3]}], num_basis=1)
    bad = [ads[0], {"q": M.LoRA(np.ones((2, N_IN), np.float32), np.ones((N_OUT, 2), np.float32))}]
    with pytest.raises(ValueError, match="one rank per layer"):
        M.reversible_lora(bad, num_basis=1)
    out = M.reversible_merge(base, fts, num_basis=1)
    with pytest.raises(ValueError, match="task"):
        M.reversible_task_model(base, out, T_MODELS)
    with pytest.raises(TypeError, match="ReversibleOutput"):
        M.reversible_adapter(tuple(out), 0)
    with pytest.raises(ValueError, match="does not match base"):
        M.reversible_task_model({"w": base["w"]}, out, 0)
