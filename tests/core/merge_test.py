"""Properties every merger must satisfy, and the merge/chain plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from tests import _testing as T

K = jax.random.key


def mergers_any_count():
    """Mergers that accept any number of models (name, merger, needs key)."""
    m = fj.merging
    return [
        ("sum", m.sum()),
        ("mean", m.mean()),
        ("uniform_soup", m.uniform_soup()),
        ("task_arithmetic", m.task_arithmetic(scaling=0.4)),
        ("ties", m.ties(density=0.3)),
        ("ties_model", m.ties(density=0.3, scope="model")),
        ("ties_sum", m.ties(density=0.3, merge="sum")),
        ("breadcrumbs", m.breadcrumbs(density=0.5, gamma=0.1)),
        ("dare", m.dare(drop_rate=0.5)),
        ("dare_ties", m.dare_ties(drop_rate=0.5)),
        ("della", m.della(density=0.5, epsilon=0.2)),
        ("model_stock", m.model_stock()),
    ]


ALL = mergers_any_count() + [("slerp", fj.merging.slerp(t=0.3))]
IDS = [n for n, _ in ALL]


def n_models(name):
    return 2 if name == "slerp" else 3


@pytest.mark.parametrize("name,merger", ALL, ids=IDS)
def test_identical_to_base_returns_base(name, merger):
    base = T.random_model(K(0))
    out = fj.merge(base, [base] * n_models(name), merger, key=K(1))
    T.assert_trees_close(out, base, rtol=0, atol=0)


AVERAGING = ["mean", "uniform_soup", "ties", "ties_model", "model_stock", "slerp"]


@pytest.mark.parametrize("name,merger", [(n, m) for n, m in ALL if n in AVERAGING], ids=AVERAGING)
def test_identical_finetuned_returns_that_model(name, merger):
    base = T.random_model(K(0))
    theta = T.finetune_like(base, K(1), 1)[0]
    if name.startswith("ties"):
        merger = fj.merging.ties(density=1.0, scope="model" if name == "ties_model" else "leaf")
    out = fj.merge(base, [theta] * n_models(name), merger)
    T.assert_trees_close(out, theta)


SYMMETRIC = [
    "sum", "mean", "task_arithmetic", "ties", "ties_model", "ties_sum", "breadcrumbs",
    "model_stock",
]


@pytest.mark.parametrize("name,merger", [(n, m) for n, m in ALL if n in SYMMETRIC], ids=SYMMETRIC)
def test_order_invariance(name, merger):
    base = T.random_model(K(0))
    fts = T.finetune_like(base, K(1), 3)
    a = fj.merge(base, fts, merger)
    b = fj.merge(base, [fts[2], fts[0], fts[1]], merger)
    T.assert_trees_close(a, b)


def test_slerp_is_symmetric_in_t():
    base = T.random_model(K(0))
    f0, f1 = T.finetune_like(base, K(1), 2)
    a = fj.merge(base, [f0, f1], fj.merging.slerp(t=0.3))
    b = fj.merge(base, [f1, f0], fj.merging.slerp(t=0.7))
    T.assert_trees_close(a, b)


@pytest.mark.parametrize("name,merger", ALL, ids=IDS)
def test_jit_matches_eager(name, merger):
    base = T.random_model(K(0))
    fts = T.finetune_like(base, K(1), n_models(name))
    eager = fj.merge(base, fts, merger, key=K(2))
    jitted = jax.jit(lambda b, f, k: fj.merge(b, f, merger, key=k))(base, fts, K(2))
    T.assert_trees_close(eager, jitted)


def test_task_arithmetic_is_linear_in_scaling():
    base = T.random_model(K(0))
    fts = T.finetune_like(base, K(1), 3)
    tvs = fj.task_vectors(base, fts)
    total = jax.tree.map(lambda *x: x[0] + x[1] + x[2], *tvs)
    for lam in (0.0, 0.3, 1.0, -0.5):
        out = fj.merge(base, fts, fj.merging.task_arithmetic(scaling=lam))
        T.assert_trees_close(out, fj.apply_task_vector(base, total, lam))


def test_scaling_sweep_under_vmap_traces_once():
    base = T.random_model(K(0))
    fts = T.finetune_like(base, K(1), 3)  # T = 3 as elsewhere in this file: the kernels are shared
    lams = np.linspace(0.0, 1.0, 5, dtype=np.float32)  # host values: no linspace program
    sweep = jax.vmap(lambda lam: fj.merge(base, fts, fj.merging.task_arithmetic(scaling=lam)))
    out = jax.device_get(sweep(lams))  # rows indexed on the host: no slice program per shape
    for i, lam in enumerate(lams):
        one = fj.merge(base, fts, fj.merging.task_arithmetic(scaling=float(lam)))
        T.assert_trees_close(jax.tree.map(lambda x, i=i: x[i], out), one)


def test_scaling_sweep_under_jit_traces_once():
    base = T.random_model(K(0))
    fts = T.finetune_like(base, K(1), 3)
    traces = []

    @jax.jit
    def merged(lam):
        traces.append(lam)
        return fj.merge(base, fts, fj.merging.ties(density=0.5, scaling=lam))

    for lam in (0.1, 0.5, 1.0):
        T.assert_trees_close(merged(lam), fj.merge(base, fts, fj.merging.ties(density=0.5, scaling=lam)))
    assert len(traces) == 1


def test_integer_leaves_pass_through_and_inputs_unchanged():
    base = T.random_model(K(0))
    fts = T.finetune_like(base, K(1), 3)
    before = [jax.tree.map(np.array, m) for m in [base, *fts]]
    out = fj.merge(base, fts, fj.merging.mean())
    assert out["step"].dtype == jnp.int32 and int(out["step"]) == 7
    for m, b in zip([base, *fts], before, strict=False):
        T.assert_trees_close(m, b, rtol=0, atol=0)


def test_bfloat16_computed_in_float32_and_cast_back():
    base = T.random_model(K(0), dtype=jnp.bfloat16)
    fts = T.finetune_like(base, K(1), 3)
    out = fj.merge(base, fts, fj.merging.mean())
    assert out["dense"]["kernel"].dtype == jnp.bfloat16
    def ref(b, *fs):  # in NumPy (float32 arithmetic, bfloat16 from ml_dtypes): no programs
        b, fs = np.asarray(b), [np.asarray(f) for f in fs]
        if b.dtype != jnp.bfloat16:
            return b
        b32, f32 = b.astype(np.float32), [f.astype(np.float32) for f in fs]
        return (b32 + ((f32[0] - b32) + (f32[1] - b32) + (f32[2] - b32)) / np.float32(3)).astype(b.dtype)

    T.assert_trees_close(out, jax.tree.map(ref, base, *fts), rtol=0, atol=0)


def test_global_path_matches_leafwise_path():
    base = T.random_model(K(0))
    fts = T.finetune_like(base, K(1), 3)
    leafwise = fj.merging.ties(density=0.3)
    as_global = fj.chain(fj.merging.trim(density=1.0, scope="model"), leafwise)
    assert leafwise.leafwise and not as_global.leafwise
    T.assert_trees_close(fj.merge(base, fts, leafwise), fj.merge(base, fts, as_global))


def test_random_merger_is_deterministic_per_key():
    base = T.random_model(K(0))
    fts = T.finetune_like(base, K(1), 3)
    m = fj.merging.dare(drop_rate=0.5)
    a = fj.merge(base, fts, m, key=K(5))
    b = fj.merge(base, fts, m, key=K(5))
    c = fj.merge(base, fts, m, key=K(6))
    T.assert_trees_close(a, b, rtol=0, atol=0)
    assert not np.allclose(a["dense"]["kernel"], c["dense"]["kernel"])


def test_steps_called_directly_on_stacked_task_vectors():
    base = T.random_model(K(0))
    fts = T.finetune_like(base, K(1), 3)
    tvs = fj.stack(fj.task_vectors(base, fts))
    merged_tv = fj.merging.ties(density=0.4)(tvs, base=base)
    T.assert_trees_close(
        fj.apply_task_vector(base, merged_tv), fj.merge(base, fts, fj.merging.ties(density=0.4))
    )
    assert fj.unstack(tvs)[1]["dense"]["kernel"].shape == (8, 4)


def test_chain_flattens_and_reports_structure():
    c = fj.chain(fj.merging.trim(density=0.5), fj.merging.ties())
    assert [s.name for s in c.parts][:2] == ["trim", "trim"]
    assert c.reduces and c.leafwise and not c.needs_key
    assert fj.chain(fj.merging.drop_and_rescale(drop_rate=0.1), fj.merging.mean()).needs_key


@pytest.mark.parametrize(
    "steps,match",
    [
        ((fj.merging.mean(), fj.merging.trim()), "cannot follow the merger mean"),
        ((fj.merging.mean(), fj.merging.sum()), "can merge only once"),
        ((fj.merging.ties,), "Did you forget to call the factory"),
        ((), "at least one step"),
    ],
)
def test_chain_errors(steps, match):
    with pytest.raises(TypeError, match=match):
        fj.chain(*steps)


def test_merge_rejects_non_merger():
    base = T.random_model(K(0))
    with pytest.raises(TypeError, match="end it with a merger"):
        fj.merge(base, [base], fj.merging.trim())
    with pytest.raises(TypeError, match="must be a fusionjax step"):
        fj.merge(base, [base], lambda tvs: tvs)
