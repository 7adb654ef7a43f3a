"""OPCM continual merging: against a NumPy re-implementation of FusionBench's semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from tests import _testing as T

M = fj.merging
# Matrices wide enough that every tested alpha keeps a top block (k >= 1), not only the diagonal.
SHAPES = {"lin": (24, 16), "wide": (12, 30), "bias": (5,), "conv": (2, 3, 4), "s": ()}


def models(seed, n=5):
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    base["step"] = np.int32(3)
    fts = []
    for t in range(n):
        ft = {
            k: np.asarray(v + (0.2 + 0.1 * t) * rng.normal(size=np.shape(v)), np.float32)
            for k, v in base.items()
            if k != "step"
        }
        ft["step"] = np.int32(3)
        fts.append(ft)
    return base, fts


def np_opcm(base, fts, alpha, linear=("lin", "wide")):
    """FusionBench's OPCMForCLIP.run, in plain NumPy float64 (order as given, no shuffle).

    The merged model starts as the first model; each next model's linear weights are
    projected in the full SVD basis of the previous merged task vector (diagonal and the
    top-left ``split_rank`` block zeroed), other leaves are added, and the sum is scaled
    so the merged task vector has the average task vector norm.
    """
    keys = [k for k in base if k != "step"]
    pre = {k: np.asarray(base[k], np.float64) for k in keys}

    def tv_norm(model):
        return np.sqrt(sum(np.sum((model[k] - pre[k]) ** 2) for k in keys))

    merged = {k: np.asarray(fts[0][k], np.float64) for k in keys}
    norms = [tv_norm(merged)]
    prev_lambda = 1.0
    for ft in fts[1:]:
        task = {k: np.asarray(ft[k], np.float64) for k in keys}
        norms.append(tv_norm(task))
        avg = np.mean(norms)
        lam = 1.0
        new = {}
        for k in keys:
            prev_tv = merged[k] - pre[k]
            task_tv = task[k] - pre[k]
            if k in linear:
                u, s, vh = np.linalg.svd(prev_tv, full_matrices=True)
                v = vh.T
                split = int(np.argmax(np.cumsum(s) / s.sum() > alpha))
                p = u.T @ task_tv @ v
                for i in range(min(p.shape)):
                    p[i, i] = 0.0
                p[:split, :split] = 0.0
                task_tv = u @ p @ v.T
            new[k] = pre[k] + (prev_lambda * prev_tv + task_tv) / lam
        merged = new
        norm = tv_norm(merged)
        lam *= norm / avg
        merged = {k: pre[k] + (merged[k] - pre[k]) * (avg / norm) for k in keys}
        prev_lambda = lam
    merged["step"] = base["step"]
    return merged


def run(merger, base, fts, jit=False):
    update = jax.jit(merger.update) if jit else merger.update
    state = merger.init(base)
    for ft in fts:
        state = update(state, ft)
    return state


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_matches_numpy_fusionbench_semantics(alpha, jit):
    base, fts = models(0)
    state = run(M.opcm(alpha=alpha), base, fts, jit=jit)
    T.assert_trees_close(state.merged, np_opcm(base, fts, alpha), rtol=2e-4, atol=2e-5)


def test_each_step_matches_reference():
    base, fts = models(1)
    merger = M.opcm(alpha=0.5)
    update = jax.jit(merger.update)
    state = merger.init(base)
    for t, ft in enumerate(fts):
        state = update(state, ft)
        T.assert_trees_close(state.merged, np_opcm(base, fts[: t + 1], 0.5), rtol=2e-4, atol=2e-5)


def test_first_model_in_gives_it_back():
    base, fts = models(2)
    merger = M.opcm()
    state = merger.update(merger.init(base), fts[0])
    T.assert_trees_close(state.merged, fts[0])
    assert float(state.scaling) == pytest.approx(1.0, rel=1e-6)
    # before any model, the base
    T.assert_trees_close(merger.init(base).merged, base)


def test_projection_removes_the_top_block_and_diagonal():
    rng = np.random.default_rng(3)
    s_mat = rng.normal(size=(12, 10)).astype(np.float32)
    tv = rng.normal(size=(12, 10)).astype(np.float32)
    out = np.asarray(M._opcm.project(jnp.asarray(s_mat), jnp.asarray(tv), 0.5), np.float64)
    u, s, vh = np.linalg.svd(s_mat.astype(np.float64), full_matrices=False)
    k = int(np.argmax(np.cumsum(s) / s.sum() > 0.5))
    assert k >= 1
    p = u.T @ out @ vh.T
    np.testing.assert_allclose(np.diag(p), 0.0, atol=1e-5)
    np.testing.assert_allclose(p[:k, :k], 0.0, atol=1e-5)
    # the rest of tv is untouched
    p_tv = u.T @ tv @ vh.T
    keep = np.ones_like(p, bool)
    keep[:k, :k] = False
    np.fill_diagonal(keep, False)
    np.testing.assert_allclose(p[keep], p_tv[keep], atol=1e-5)


def test_merged_norm_is_the_average_task_vector_norm():
    base, fts = models(4)
    state = run(M.opcm(), base, fts)
    keys = [k for k in base if k != "step"]

    def norm(m):
        return np.sqrt(sum(np.sum((np.float64(m[k]) - base[k]) ** 2) for k in keys))

    expected = np.mean([norm(ft) for ft in fts])
    assert norm(state.merged) == pytest.approx(expected, rel=1e-4)


def test_state_size_is_constant_and_update_compiles_once():
    base, fts = models(5, n=6)
    merger = M.opcm()
    state = merger.init(base)
    sizes, structures = [], []
    traces = []

    def update(s, f):
        traces.append(1)
        return merger.update(s, f)

    jitted = jax.jit(update)
    for ft in fts:
        state = jitted(state, ft)
        sizes.append(sum(x.nbytes for x in jax.tree.leaves(state)))
        structures.append(jax.tree.structure(state))
    assert len(set(sizes)) == 1, sizes
    assert len(set(structures)) == 1
    assert len(traces) == 1  # one compile for the whole sequence


def test_models_equal_to_base_keep_base_finite():
    base, _ = models(6)
    state = run(M.opcm(), base, [base, base])
    T.assert_trees_close(state.merged, base)


def test_mask_leaves_a_matrix_unprojected():
    base, fts = models(7, n=3)
    mask = {k: k == "lin" for k in base}
    state = run(M.opcm(alpha=0.5, mask=mask), base, fts)
    T.assert_trees_close(
        state.merged, np_opcm(base, fts, 0.5, linear=("lin",)), rtol=2e-4, atol=2e-5
    )


def test_bfloat16_leaves_keep_their_dtype():
    base, fts = models(8, n=3)
    cast = lambda m: {k: (v.astype(jnp.bfloat16) if k != "step" else v) for k, v in m.items()}  # noqa: E731
    state = run(M.opcm(), cast(base), [cast(f) for f in fts])
    assert state.merged["lin"].dtype == jnp.bfloat16
    assert state.total["lin"].dtype == jnp.float32


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        M.opcm(alpha=alpha)


def test_bad_inputs():
    base, fts = models(9, n=2)
    merger = M.opcm()
    state = merger.init(base)
    bad = dict(fts[0], lin=fts[0]["lin"][:, :4])
    with pytest.raises(ValueError, match=r"finetuned differs from base at \['lin'\]"):
        merger.update(state, bad)
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        merger.update(state, {k: v for k, v in fts[0].items() if k != "bias"})
    with pytest.raises(ValueError, match=r"\['step'\]"):
        merger.update(state, dict(fts[0], step=np.int32(4)))
    with pytest.raises(ValueError, match=r"NaN or Inf values at \['bias'\]"):
        merger.update(state, dict(fts[0], bias=np.full(5, np.nan, np.float32)))
    with pytest.raises(TypeError, match="state"):
        merger.update(base, fts[0])
    with pytest.raises(ValueError, match=r"mask is True at \['bias'\]"):
        M.opcm(mask={k: k == "bias" for k in base}).init(base)
    with pytest.raises(TypeError, match="mask must hold Python booleans"):
        M.opcm(mask={k: 1 for k in base})
    with pytest.raises(TypeError, match="drop_diagonal"):
        M.opcm(drop_diagonal="yes")
