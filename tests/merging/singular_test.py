"""TSV-M, Iso-C and Iso-CTS: against NumPy versions of FusionBench's rules, and their properties."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from tests import _testing as T

M = fj.merging
# a tall and a wide matrix, a bias (not a matrix: averaged) and a scalar. Few small
# shapes and the same three models throughout: each shape and merger compiles once.
SHAPES = {"a": (7, 5), "b": (4, 6), "bias": (5,), "s": ()}
TOL = dict(rtol=2e-4, atol=2e-5)


def models(seed, n=3, shapes=SHAPES):  # noqa: D103
    rng = np.random.default_rng(seed)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    fts = [
        {k: np.asarray(v + (0.1 + 0.05 * t) * rng.normal(size=v.shape), np.float32)
         for k, v in base.items()}
        for t in range(n)
    ]
    return base, fts


def task_vectors(base, fts, k):
    return [f[k].astype(np.float32).astype(np.float64) - base[k].astype(np.float64) for f in fts]


def reference(base, fts, matrix_fn, scaling=1.0):
    """FusionBench's layout of a merge: ``matrix_fn`` on 2-D leaves, the mean elsewhere."""
    out = {}
    for k in base:
        tvs = task_vectors(base, fts, k)
        tv = matrix_fn(tvs) if tvs[0].ndim == 2 else sum(tvs) / len(tvs)
        out[k] = base[k].astype(np.float64) + scaling * tv
    return out


def np_polar(a):
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return u @ vt


def np_tsv(tvs, rank_fraction=None):
    # FusionBench's compute_and_sum_svd_mem_reduction: the kept vectors of task i fill
    # columns i*k..(i+1)*k of [m, p] / [p, n] zero matrices, which are orthogonalised.
    n = len(tvs)
    frac = 1 / n if rank_fraction is None else rank_fraction
    m, c = tvs[0].shape
    p = min(m, c)
    k = int(p * frac)
    su, ss, svt = np.zeros((m, p)), np.zeros(p), np.zeros((p, c))
    for i, tv in enumerate(tvs):
        u, s, vt = np.linalg.svd(tv, full_matrices=False)
        su[:, i * k:(i + 1) * k] = u[:, :k]
        ss[i * k:(i + 1) * k] = s[:k]
        svt[i * k:(i + 1) * k] = vt[:k]
    return np_polar(su) @ np.diag(ss) @ np_polar(svt)


def np_iso_c(tvs):
    u, s, vt = np.linalg.svd(sum(tvs), full_matrices=False)
    return s.mean() * u @ vt


def np_iso_cts(tvs, common_fraction):
    # FusionBench's iso_cts, on torch-layout [out, in] matrices.
    n = len(tvs)
    p = min(tvs[0].shape)
    kc = int(p * common_fraction)
    kc = p - round((p - kc) / n) * n
    d = int((p - kc) / n)
    u, s, vt = np.linalg.svd(sum(tvs), full_matrices=False)
    cu, cs, cvt = np.zeros_like(u), np.zeros_like(s), np.zeros_like(vt)
    for i, w in enumerate(tvs):
        ut, st, vtt = np.linalg.svd(w - u[:, :kc] @ u[:, :kc].T @ w, full_matrices=False)
        cu[:, i * d:(i + 1) * d] = ut[:, :d]
        cs[i * d:(i + 1) * d] = st[:d]
        cvt[i * d:(i + 1) * d] = vtt[:d]
    cu[:, n * d:n * d + kc] = u[:, :kc]
    cs[n * d:n * d + kc] = s[:kc]
    cvt[n * d:n * d + kc] = vt[:kc]
    return cs.mean() * np_polar(cu) @ np_polar(cvt)


def close(out, ref, **tol):
    for k in ref:
        np.testing.assert_allclose(np.asarray(out[k], np.float64), ref[k], err_msg=k, **(tol or TOL))


TSV, ISO_C, ISO_CTS = M.tsv_merge(), M.iso_c(), M.iso_cts()


def test_tsv_matches_fusionbench_semantics():
    # T = 3: k = 1 of p = 5 and of p = 4, so FusionBench's zero-padded columns are exercised
    base, fts = models(3)
    close(fj.merge(base, fts, TSV), reference(base, fts, np_tsv))
    # the scaling is the last step: alpha times the same merged task vector
    out = fj.merge(base, fts, M.tsv_merge(scaling=0.7))
    close(out, reference(base, fts, np_tsv, 0.7))


def test_iso_c_matches_fusionbench_semantics():
    base, fts = models(10)
    close(fj.merge(base, fts, M.iso_c(scaling=1.3)), reference(base, fts, np_iso_c, 1.3))


@pytest.mark.parametrize("common_fraction", [0.4])
def test_iso_cts_matches_fusionbench_semantics(common_fraction):
    # p = 5, f = 0.4: k_c = 2, then 3 = T task-specific directions, d = 1; p = 4: k_c = 1
    base, fts = models(11)
    # torch layout: the leaves are FusionBench's [out, in] weights as they are
    out = fj.merge(base, fts, M.iso_cts(common_fraction=common_fraction, output_axis=0))
    close(out, reference(base, fts, lambda tvs: np_iso_cts(tvs, common_fraction)))
    # flax layout [in, out]: the same weights transposed give the transposed merge
    flax = [{k: (v.T if v.ndim == 2 else v) for k, v in m.items()} for m in (base, *fts)]
    out = fj.merge(flax[0], flax[1:], M.iso_cts(common_fraction=common_fraction))
    ref = reference(base, fts, lambda tvs: np_iso_cts(tvs, common_fraction))
    close(out, {k: (v.T if v.ndim == 2 else v) for k, v in ref.items()})


def test_tsv_of_one_model_at_full_rank_is_that_model():
    base, fts = models(12, 1)
    out = fj.merge(base, fts, M.tsv_merge(rank_fraction=1.0))
    close(out, {k: v.astype(np.float64) for k, v in fts[0].items()})


def test_tsv_of_orthogonal_low_rank_tasks_is_their_sum():
    # rank-2 task matrices whose singular vectors are orthogonal across tasks: nothing to
    # decorrelate, and TSV-M (k = 2 of p = 6 per task) keeps every task whole: it is
    # task arithmetic. (With rank-1 tasks the second kept vector would be arbitrary.)
    rng = np.random.default_rng(13)
    q1, _ = np.linalg.qr(rng.normal(size=(8, 6)))
    q2, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    base = {"w": np.zeros((8, 6), np.float32)}
    fts = [
        {"w": (q1[:, 2 * t:2 * t + 2] * [3.0 + t, 1.0 + t] @ q2[:, 2 * t:2 * t + 2].T)
         .astype(np.float32)}
        for t in range(3)
    ]
    out = fj.merge(base, fts, TSV)
    np.testing.assert_allclose(np.asarray(out["w"]), sum(f["w"] for f in fts), atol=1e-5)


def test_tsv_drops_matrices_too_small_for_the_rank():
    # p = 2 < T = 3: k = int(2/3) = 0, FusionBench's merge of that matrix is zero
    base, fts = models(14, 3, {"w": (5, 2), "bias": (5,)})
    out = fj.merge(base, fts, M.tsv_merge())
    np.testing.assert_array_equal(np.asarray(out["w"]), base["w"])
    close(out, reference(base, fts, lambda tvs: np.zeros_like(tvs[0])))


def test_iso_c_flattens_the_spectrum_of_the_sum():
    base, fts = models(15)
    out = fj.merge(base, fts, ISO_C)
    tv = np.asarray(out["a"], np.float64) - base["a"]
    s_sum = np.linalg.svd(sum(task_vectors(base, fts, "a")), compute_uv=False)
    np.testing.assert_allclose(np.linalg.svd(tv, compute_uv=False), s_sum.mean(), rtol=1e-4)


def test_iso_cts_with_all_common_directions_is_iso_c():
    base, fts = models(16)
    a = fj.merge(base, fts, M.iso_cts(common_fraction=1.0))
    b = fj.merge(base, fts, ISO_C)
    T.assert_trees_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("merger", [TSV, ISO_C, ISO_CTS], ids=["tsv", "iso_c", "iso_cts"])
def test_order_invariance(merger):
    base, fts = models(17)
    a = fj.merge(base, fts, merger)
    for perm in itertools.islice(itertools.permutations(range(3)), 1, 3):
        b = fj.merge(base, [fts[i] for i in perm], merger)
        T.assert_trees_close(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_leaves_stay_bfloat16():
    # computed in float32 from the bf16 task vectors, rounded once to bf16
    base, fts = models(18, 3, {"a": (7, 5), "bias": (5,)})
    bf = [{k: jnp.asarray(v, jnp.bfloat16) for k, v in m.items()} for m in (base, *fts)]
    out = fj.merge(bf[0], bf[1:], TSV)
    assert all(v.dtype == jnp.bfloat16 for v in out.values())
    f32 = [{k: np.asarray(v, np.float32) for k, v in m.items()} for m in bf]
    ref = reference(f32[0], f32[1:], np_tsv)
    close(out, ref, **T.BF16)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: M.tsv_merge(rank_fraction=0.0), "rank_fraction"),
        (lambda: M.tsv_merge(rank_fraction=1.5), "rank_fraction"),
        (lambda: M.iso_cts(common_fraction=-0.1), "common_fraction"),
        (lambda: M.iso_cts(output_axis=2), "output_axis"),
        (lambda: M.iso_c(scaling=float("nan")), "scaling"),
        (lambda: M.tsv_merge(scaling=float("nan")), "scaling"),
    ],
)
def test_bad_hyperparameters_name_the_parameter(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("value", [True, "0.5", np.float32(0.5)])
def test_fractions_must_be_python_numbers(value):
    with pytest.raises(TypeError, match="rank_fraction"):
        M.tsv_merge(rank_fraction=value)
    with pytest.raises(TypeError, match="common_fraction"):
        M.iso_cts(common_fraction=value)


@pytest.mark.parametrize("merger", [TSV, ISO_CTS], ids=["tsv", "iso_cts"])
def test_streamed_merge_equals_in_memory(tmp_path, merger):
    base, fts = models(19)
    T.assert_streamed_merge_equals_in_memory(tmp_path, base, fts, merger)


def test_bad_models_name_the_model():
    base, fts = models(20)
    bad = {**fts[1], "a": np.zeros((5, 7), np.float32)}
    with pytest.raises(ValueError, match=r"finetuned\[1\] differs from base at \['a'\]"):
        fj.merge(base, [fts[0], bad, fts[2]], TSV)
