"""Steps as data: hyperparameters are pytree children, methods compile once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from fusionjax._src import merge as merge_lib
from tests import _testing as T

K = jax.random.key


@pytest.fixture
def models():
    base = T.random_model(K(0))
    return base, T.finetune_like(base, K(1), 3)


def _compiles():
    return merge_lib._merge_leaf._cache_size() + merge_lib._merge_group._cache_size()


@pytest.mark.parametrize(
    "make",
    [
        lambda v: fj.merging.task_arithmetic(scaling=v),
        lambda v: fj.merging.ties(density=v, scaling=1.0 - v),
        lambda v: fj.merging.dare(drop_rate=v),
        lambda v: fj.merging.breadcrumbs(density=v, gamma=v / 10),
    ],
    ids=["task_arithmetic", "ties", "dare", "breadcrumbs"],
)
def test_new_step_objects_and_values_compile_nothing(models, make):
    base, fts = models
    first = fj.merge(base, fts, make(0.3), key=K(0))
    before = _compiles()
    outs = [fj.merge(base, fts, make(v), key=K(0)) for v in (0.3, 0.5, 0.7)]
    assert _compiles() == before
    T.assert_trees_close(outs[0], first, rtol=0, atol=0)
    assert not np.allclose(outs[0]["dense"]["kernel"], outs[2]["dense"]["kernel"])


def test_per_model_values_share_the_compiled_kernel(models):
    base, fts = models
    fj.merge(base, fts, fj.merging.ties(density=0.4))
    before = _compiles()
    fj.merge(base, fts, fj.merging.ties(density=np.array([0.2, 0.4, 0.6])))
    fj.merge(base, fts, fj.merging.ties(density=fj.by_path({"conv": 0.9}, default=0.1)))
    assert _compiles() == before


def test_equal_factories_give_equal_steps():
    assert fj.merging.ties(density=0.3) == fj.merging.ties(density=0.3)
    assert fj.merging.ties(density=0.3) != fj.merging.ties(density=0.4)
    assert fj.merging.ties(density=0.3) != fj.merging.ties(density=0.3, merge="sum")
    a, b = fj.merging.ties(density=0.3), fj.merging.ties(density=0.5)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert [float(x) for x in jax.tree.leaves(b)] == [0.5, 1.0]


def test_steps_cross_jit_and_vmap():
    step = jax.jit(lambda s: s)(fj.merging.ties(density=0.3))
    assert isinstance(step, fj.Step) and step.name.startswith("chain(trim")
    assert float(step.parts[0].hparams["density"]) == pytest.approx(0.3)
    batched = jax.vmap(lambda d: fj.merging.trim(density=d))(jnp.array([0.1, 0.2]))
    assert batched.hparams["density"].shape == (2,)


def test_per_model_drop_rate_applies_per_model_not_per_column():
    # The last axis has length 3 = the number of models: the rates must not be
    # applied per column (the bug this guards against).
    base = {"w": jnp.zeros((64, 3))}
    fts = [{"w": jnp.full((64, 3), float(t + 1))} for t in range(3)]
    rates = np.array([0.0, 0.5, 0.9])
    m = fj.merging.dare(drop_rate=rates, merger=fj.merging.sum())
    out = fj.merge(base, fts, m, key=K(3))
    tv = fj.chain(fj.merging.drop_and_rescale(drop_rate=rates))(
        fj.stack(fj.task_vectors(base, fts)), key=K(3)
    )
    w = np.asarray(tv["w"])
    np.testing.assert_array_equal(w[0], 1.0)  # rate 0: every entry kept, not rescaled
    np.testing.assert_allclose(np.unique(w[1]), [0.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(np.unique(w[2]), [0.0, 30.0], rtol=1e-6)
    assert 0.3 < (w[1] != 0).mean() < 0.7 and (w[2] != 0).mean() < 0.25
    assert out["w"].shape == (64, 3)


def test_per_model_density_and_breadcrumbs_arrays(models):
    base, fts = models
    tvs = fj.stack(fj.task_vectors(base, fts))
    out = fj.merging.trim(density=np.array([1.0, 0.5, 0.25]))(tvs)
    kept = [(np.asarray(out["dense"]["kernel"][t]) != 0).sum() for t in range(3)]
    assert kept == [32, 16, 8]
    bc = fj.merging.breadcrumbs(density=np.array([0.5, 0.5, 0.25]), gamma=np.array([0.0, 0.1, 0.1]))
    merged = fj.merge(base, fts, bc)
    assert np.isfinite(np.asarray(merged["dense"]["kernel"])).all()


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: fj.merging.ties(density="0.2"), TypeError, "density must be a number"),
        (lambda: fj.merging.dare(drop_rate=True), TypeError, "drop_rate must be a number"),
        (lambda: fj.merging.trim(density=np.array([0.5, 1.5])), ValueError, r"density must lie in \(0"),
        (lambda: fj.merging.ties(density=fj.by_path({"a": 2.0})), ValueError, "density must lie"),
        (lambda: fj.merging.della(density=np.array([0.5, 0.1]), epsilon=0.2), ValueError, "density ± epsilon"),
    ],
)
def test_bad_hyperparameters_fail_when_built(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_per_model_values_must_match_the_number_of_models(models):
    base, fts = models
    with pytest.raises(ValueError, match=r"drop_rate takes one value, or one per model \(shape \(3,\)"):
        fj.merge(base, fts, fj.merging.dare(drop_rate=[0.1, 0.2]), key=K(0))
    with pytest.raises(ValueError, match=r"scaling takes a single value, got shape \(3,\)"):
        fj.merge(base, fts, fj.merging.task_arithmetic(scaling=np.ones(3)))


def test_unknown_and_missing_extras_are_errors(models):
    base, fts = models
    fishers = fj.stack([jax.tree.map(jnp.ones_like, base)] * 3)
    with pytest.raises(TypeError, match="unexpected extra 'fisher'.*Did you mean 'fishers'"):
        fj.merge(base, fts, fj.merging.fisher_merging(), fisher=fishers)
    with pytest.raises(TypeError, match="needs the extra fishers"):
        fj.merge(base, fts, fj.merging.fisher_merging())
    with pytest.raises(TypeError, match="mean got an unexpected extra 'grams'.*takes no extras"):
        fj.merge(base, fts, fj.merging.mean(), grams=None)


def test_exact_kept_count_for_concrete_density():
    # 0.3 of 90 entries is 27; a float32 product would give 28.
    base = {"w": jnp.zeros(90)}
    fts = [{"w": jnp.arange(1.0, 91.0)}]
    out = fj.merge(base, fts, fj.merging.ties(density=0.3))
    assert int((np.asarray(out["w"]) != 0).sum()) == 27


def test_model_wide_kept_count_is_exact_too():
    # 0.2 of 10^6 is 200000; a float32 density (0.2000000030) would keep 200001.
    n = 1_000_000
    base = {"w": np.zeros(n, np.float32)}
    fts = [{"w": np.arange(1, n + 1, dtype=np.float32)}]
    m = fj.chain(fj.merging.trim(density=0.2, scope="model"), fj.merging.sum())
    assert int((np.asarray(fj.merge(base, fts, m)["w"]) != 0).sum()) == 200_000
