"""LoRA adapters: the factored merges equal the full-delta merges and never form [out, in]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import merging as M
from tests import _testing as T

N_IN, N_OUT = 37, 23  # distinct primes: any [in, out]-sized intermediate is recognisable


def adapters(seed, ranks=(2, 3, 4), layout="torch", dtype=np.float32):
    rng = np.random.default_rng(seed)
    out = []
    for r in ranks:
        tree = {}
        for name, (n_in, n_out) in {"q": (N_IN, N_OUT), "v": (N_OUT, N_IN)}.items():
            a = rng.normal(size=(r, n_in)).astype(dtype)
            b = rng.normal(size=(n_out, r)).astype(dtype)
            tree[name] = M.LoRA(a, b) if layout == "torch" else M.LoRA(a.T, b.T)
        out.append(tree)
    return out


def full(ad, layout):
    return M.lora_delta(ad, layout=layout)


def np_tsv(deltas, keep):
    """TSV-M on full torch-layout updates, plain NumPy (FusionBench's task_singular_vector)."""
    us, ss, vs = [], [], []
    for d, k in zip(deltas, keep, strict=True):
        u, s, vh = np.linalg.svd(np.float64(d), full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    pu, _, qu = np.linalg.svd(np.concatenate(us, 1), full_matrices=False)
    pv, _, qv = np.linalg.svd(np.concatenate(vs, 1), full_matrices=False)
    return (pu @ qu) @ np.diag(np.concatenate(ss)) @ (pv @ qv).T


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_task_arithmetic_factors_equal_full_sum(layout):
    ads = adapters(0, layout=layout)
    w = [0.5, -1.0, 2.0]
    merged = M.lora_task_arithmetic(ads, weights=w, scaling=0.7, layout=layout)
    assert merged["q"].a.shape == ((9, N_IN) if layout == "torch" else (N_IN, 9))
    ref = jax.tree.map(
        lambda *d: 0.7 * sum(wt * np.float64(x) for wt, x in zip(w, d, strict=True)),
        *[full(a, layout) for a in ads],
    )
    T.assert_trees_close(full(merged, layout), ref, rtol=1e-5, atol=1e-5)
    T.assert_trees_close(
        M.lora_task_arithmetic(ads, weights=w, scaling=0.7, layout=layout, output="delta"),
        ref,
        rtol=1e-5,
        atol=1e-5,
    )


def test_task_arithmetic_equals_lora_merge_reference():
    ads = adapters(1)
    T.assert_trees_close(
        M.lora_task_arithmetic(ads, scaling=0.3, output="delta"),
        M.lora_merge(ads, M.task_arithmetic(scaling=0.3)),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_lora_svd_matches_svd_of_the_full_delta(layout):
    ad = adapters(2, ranks=(4,), layout=layout)[0]["q"]
    d = np.float64(M.lora_delta({"x": ad}, layout=layout)["x"])
    out = M.lora_svd(ad, layout=layout)
    s_ref = np.linalg.svd(d, compute_uv=False)[:4]
    np.testing.assert_allclose(out.s, s_ref, rtol=1e-5)
    np.testing.assert_allclose(
        np.float64(out.u) * np.float64(out.s) @ np.float64(out.v).T, d, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(np.float64(out.u).T @ np.float64(out.u), np.eye(4), atol=1e-5)


@pytest.mark.parametrize(("layout", "keep"), [("torch", None), ("flax", 2)])
def test_tsv_factors_equal_full_delta_tsv(layout, keep):
    ads = adapters(3, layout=layout)
    ranks = (2, 3, 4)
    factors = M.lora_tsv(ads, keep=keep, scaling=0.9, layout=layout)
    got = full(factors, layout)
    if layout == "torch":  # output="delta" is the same product, formed inside
        T.assert_trees_close(
            M.lora_tsv(ads, keep=keep, scaling=0.9, output="delta"), got, rtol=1e-5, atol=1e-5
        )
    for name in ("q", "v"):
        deltas = [np.float64(full(a, layout)[name]) for a in ads]
        if layout == "flax":
            deltas = [d.T for d in deltas]
        k0 = min(deltas[0].shape) // 3 if keep is None else keep
        ref = 0.9 * np_tsv(deltas, [min(k0, r) for r in ranks])
        if layout == "flax":
            ref = ref.T
        np.testing.assert_allclose(np.float64(got[name]), ref, rtol=1e-4, atol=1e-4)


def _shapes_in_jaxpr(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    seen = []

    def walk(j):
        for eqn in j.eqns:
            for v in eqn.outvars:
                seen.append(tuple(getattr(v.aval, "shape", ())))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    if hasattr(sub, "eqns"):  # a Jaxpr
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):  # a ClosedJaxpr
                        walk(sub.jaxpr)

    walk(jaxpr.jaxpr)
    return seen


@pytest.mark.parametrize("layout", ["torch", "flax"])
def test_factored_paths_never_form_an_out_by_in_matrix(layout):
    ads = adapters(4, layout=layout)
    big = {(N_IN, N_OUT), (N_OUT, N_IN)}
    for fn in (
        lambda a: M.lora_task_arithmetic(a, scaling=0.5, layout=layout),
        lambda a: M.lora_tsv(a, layout=layout),
    ):
        shapes = _shapes_in_jaxpr(fn, ads)
        assert shapes, "empty jaxpr"
        assert not big & set(shapes), sorted(set(shapes))
        assert max(np.prod(s) for s in shapes) < N_IN * N_OUT
    # while the reference path does form them (the check can fail)
    shapes = _shapes_in_jaxpr(lambda a: M.lora_tsv(a, layout=layout, output="delta"), ads)
    assert big & set(shapes)


def test_ties_runs_on_full_deltas():
    ads = adapters(5)
    merged = M.lora_merge(ads, M.ties(density=0.3))
    deltas = [full(a, "torch") for a in ads]
    zero = jax.tree.map(jnp.zeros_like, deltas[0])
    import fusionjax as fj

    T.assert_trees_close(merged, fj.merge(zero, deltas, M.ties(density=0.3)))
    assert merged["q"].shape == (N_OUT, N_IN)


def test_bfloat16_factors_keep_dtype():
    ads = adapters(6, dtype=jnp.bfloat16)
    out = M.lora_task_arithmetic(ads)
    assert out["q"].a.dtype == jnp.bfloat16


def test_bad_inputs():
    ads = adapters(7)
    with pytest.raises(ValueError, match="layout"):
        M.lora_task_arithmetic(ads, layout="jax")
    with pytest.raises(ValueError, match="adapters is empty"):
        M.lora_task_arithmetic([])
    with pytest.raises(ValueError, match="output"):
        M.lora_tsv(ads, output="matrix")
    with pytest.raises(ValueError, match="weights must have one entry per adapter"):
        M.lora_task_arithmetic(ads, weights=[1.0, 2.0])
    bad = dict(ads[1], q=M.LoRA(ads[1]["q"].a[:, :5], ads[1]["q"].b))
    with pytest.raises(ValueError, match=r"adapters\[1\] at \['q'\]: \(in, out\)"):
        M.lora_task_arithmetic([ads[0], bad])
    bad = dict(ads[1], q=M.LoRA(ads[1]["q"].a, ads[1]["q"].b[:, :1]))
    with pytest.raises(ValueError, match=r"ranks of a"):
        M.lora_task_arithmetic([ads[0], bad])
    with pytest.raises(ValueError, match=r"adapters\[1\] differs in tree structure"):
        M.lora_task_arithmetic([ads[0], {"q": ads[1]["q"]}])
    with pytest.raises(TypeError, match="expected a LoRA"):
        M.lora_task_arithmetic([{"q": np.ones((3, 3), np.float32)}])
    with pytest.raises(ValueError, match="keep"):
        M.lora_tsv(ads, keep=0)
    with pytest.raises(TypeError, match="adapter must be a LoRA"):
        M.lora_svd((1, 2))


# --- TIES / DARE with PEFT's add_weighted_adapter semantics ----------------------------


def np_prune_magnitude(x, density):
    if density >= 1:
        return x
    k = int(density * x.size)
    flat = x.reshape(-1).copy()
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
    flat[~keep] = 0.0
    return flat.reshape(x.shape)


def np_peft(tensors, weights, method, density, masks=None, sign="total"):
    """peft.utils.merge_utils.{ties, dare_linear, dare_ties}, in NumPy float64."""
    x = np.stack([np.float64(t) for t in tensors])
    if method == "ties":
        x = np.stack([np_prune_magnitude(t, density) for t in x])
    elif density < 1:
        x = x * masks / density
    w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (x.ndim - 1))
    if method == "dare_linear":
        return (x * w).sum(0)
    votes = x.sum(0) if sign == "total" else np.sign(x).sum(0)
    agree = np.sign(x) == np.where(votes >= 0, 1.0, -1.0)
    return (x * w * agree).sum(0) / np.maximum(agree.sum(0), 1.0)


def np_svd_factors(delta, rank, clamp=None):
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    u, vh = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:
        hi = np.quantile(np.concatenate([u.ravel(), vh.ravel()]), clamp)
        u, vh = np.clip(u, -hi, hi), np.clip(vh, -hi, hi)
    return u, vh  # lora_B, lora_A


def q_only(seed, ranks, layout="torch"):
    """One layer per adapter: each compiled case costs one compile."""
    return [{"q": a["q"]} for a in adapters(seed, ranks=ranks, layout=layout)]


def _peft_fn(method):
    return {"ties": M.lora_ties, "dare_linear": M.lora_dare_linear, "dare_ties": M.lora_dare_ties}[
        method
    ]


def _peft_kwargs(method, density, sign, key):
    kw = {"density": density}
    if method != "dare_linear":
        kw["majority_sign"] = sign
    if method != "ties":
        kw["key"] = key
    return kw


@pytest.mark.parametrize(
    ("method", "density", "sign"),
    [("ties", 0.3, "total"), ("dare_linear", 0.6, "total"), ("dare_ties", 0.4, "frequency")],
)
def test_peft_factor_merges_match_numpy_reference(method, density, sign):
    ads = q_only(8, ranks=(3, 3, 3))
    w = [0.5, 1.0, 2.0]
    key = jax.random.key(3)
    got = _peft_fn(method)(ads, weights=w, **_peft_kwargs(method, density, sign, key))
    for name in ("q",):
        path = (jax.tree_util.DictKey(name),)
        for part, field in ((0, "a"), (1, "b")):
            xs = [getattr(a[name], field) for a in ads]
            masks = None
            if method != "ties":
                masks = np.asarray(M._lora.dare_masks(key, path, part, 3, xs[0].shape, density))
            ref = np_peft(xs, np.sqrt(w), method, density, masks, sign)
            np.testing.assert_allclose(getattr(got[name], field), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "density", "sign"), [("ties", 0.5, "frequency"), ("dare_ties", 0.4, "total")]
)
def test_peft_svd_merges_match_numpy_reference(method, density, sign):
    ads = q_only(9, ranks=(2, 3, 4))
    w = [0.5, -1.0, 2.0]  # the svd path allows any sign
    key = jax.random.key(4)
    kw = _peft_kwargs(method, density, sign, key)
    got = _peft_fn(method)(ads, weights=w, reconstruction="svd", rank=5, clamp=0.95, **kw)
    full_got = _peft_fn(method)(ads, weights=w, reconstruction="svd", output="delta", **kw)
    for name in ("q",):
        deltas = [np.float64(full(a, "torch")[name]) for a in ads]
        masks = None
        if method != "ties":
            path = (jax.tree_util.DictKey(name),)
            masks = np.asarray(M._lora.dare_masks(key, path, 2, 3, deltas[0].shape, density))
        merged = np_peft(deltas, w, method, density, masks, sign)
        np.testing.assert_allclose(full_got[name], merged, rtol=1e-5, atol=1e-5)
        b_ref, a_ref = np_svd_factors(merged, 5, clamp=0.95)
        # singular vectors have a sign each: compare the products, and the clamp bound
        np.testing.assert_allclose(
            np.float64(got[name].b) @ np.float64(got[name].a), b_ref @ a_ref, rtol=1e-4, atol=1e-4
        )
        assert got[name].a.shape == (5, deltas[0].shape[1])


def test_peft_factor_merges_never_form_an_out_by_in_matrix():
    ads = q_only(10, ranks=(3, 3, 3))
    big = {(N_IN, N_OUT), (N_OUT, N_IN)}
    key = jax.random.key(0)
    for fn in (
        lambda a: M.lora_ties(a, density=0.3),
        lambda a: M.lora_dare_ties(a, density=0.5, key=key),
    ):
        assert not big & set(_shapes_in_jaxpr(fn, ads))
    assert big & set(_shapes_in_jaxpr(lambda a: M.lora_ties(a, density=0.3, reconstruction="svd"), ads))


def test_peft_full_density_dare_is_linear_and_flax_layout_agrees():
    ads = q_only(11, ranks=(2, 2, 2))
    lin = M.lora_dare_linear(ads, density=1.0, weights=[1.0, 4.0, 0.25])
    # sum_t sqrt(w_t) a_t, as PEFT's "linear"
    ref = sum(s * np.float64(a["q"].a) for s, a in zip([1.0, 2.0, 0.5], ads, strict=True))
    np.testing.assert_allclose(lin["q"].a, ref, rtol=1e-5, atol=1e-6)
    flax = q_only(11, ranks=(2, 2, 2), layout="flax")
    np.testing.assert_allclose(
        np.float64(full(M.lora_ties(flax, density=0.4, layout="flax"), "flax")["q"]).T,
        np.float64(full(M.lora_ties(ads, density=0.4), "torch")["q"]),
        rtol=1e-5, atol=1e-5,
    )


def test_peft_dare_masks_keep_density_and_depend_on_key_and_path():
    path = (jax.tree_util.DictKey("q"),)
    m = np.asarray(M._lora.dare_masks(jax.random.key(0), path, 0, 4, (64, 64), 0.3))
    assert abs(m.mean() - 0.3) < 0.02
    other_key = np.asarray(M._lora.dare_masks(jax.random.key(1), path, 0, 4, (64, 64), 0.3))
    other_path = np.asarray(
        M._lora.dare_masks(jax.random.key(0), (jax.tree_util.DictKey("v"),), 0, 4, (64, 64), 0.3)
    )
    assert (m != other_key).mean() > 0.3 and (m != other_path).mean() > 0.3


def test_peft_bad_inputs():
    ads = adapters(13, ranks=(2, 2, 2))
    mixed = adapters(13, ranks=(2, 3, 2))
    with pytest.raises(ValueError, match="needs one rank"):
        M.lora_ties(mixed, density=0.5)
    with pytest.raises(ValueError, match="density must lie in"):
        M.lora_dare_ties(ads, density=0.0, key=jax.random.key(0))
    with pytest.raises(TypeError, match="density must be a Python number"):
        M.lora_ties(ads, density=jnp.float32(0.5))
    with pytest.raises(ValueError, match="pass key"):
        M.lora_dare_linear(ads, density=0.5)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        M.lora_ties(ads, density=0.5, weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="reconstruction='svd'"):
        M.lora_ties(ads, density=0.5, rank=2)
    with pytest.raises(ValueError, match="reconstruction must be"):
        M.lora_ties(ads, density=0.5, reconstruction="full")
    with pytest.raises(ValueError, match="majority_sign"):
        M.lora_ties(ads, density=0.5, majority_sign="mean")
