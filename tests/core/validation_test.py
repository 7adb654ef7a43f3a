"""Every bad input gets an error that names the model and the parameter path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from tests import _testing as T

K = jax.random.key
KERNEL = r"\['dense'\]\['kernel'\]"


@pytest.fixture
def models():
    base = T.random_model(K(0))
    return base, T.finetune_like(base, K(1), 3)


def replace(tree, path, value):
    tree = jax.tree.map(lambda x: x, tree)
    d = tree
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value
    return tree


def test_empty_model_list(models):
    base, _ = models
    with pytest.raises(ValueError, match="finetuned is empty"):
        fj.merge(base, [], fj.merging.mean())


def test_not_a_list(models):
    base, fts = models
    with pytest.raises(TypeError, match="finetuned must be a list or tuple"):
        fj.merge(base, fts[0], fj.merging.mean())


def test_shape_mismatch_names_model_and_path(models):
    base, fts = models
    fts[2] = replace(fts[2], ["dense", "kernel"], jnp.zeros((4, 8)))
    with pytest.raises(ValueError, match=rf"finetuned\[2\] differs from base at {KERNEL}: shape \(4, 8\) != \(8, 4\)"):
        fj.merge(base, fts, fj.merging.mean())


def test_dtype_mismatch(models):
    base, fts = models
    fts[1] = replace(fts[1], ["dense", "kernel"], fts[1]["dense"]["kernel"].astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=rf"finetuned\[1\] differs from base at {KERNEL}: dtype bfloat16 != float32"):
        fj.merge(base, fts, fj.merging.mean())


def test_missing_key(models):
    base, fts = models
    del fts[0]["dense"]["bias"]
    with pytest.raises(ValueError, match=r"finetuned\[0\] differs from base: it is missing \['dense'\]\['bias'\]"):
        fj.merge(base, fts, fj.merging.mean())


def test_extra_key(models):
    base, fts = models
    fts[1]["dense"]["extra"] = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"finetuned\[1\] differs from base: it has an extra leaf \['dense'\]\['extra'\]"):
        fj.merge(base, fts, fj.merging.mean())


def test_container_type_mismatch(models):
    base, fts = models
    fts[0]["dense"] = (fts[0]["dense"]["bias"], fts[0]["dense"]["kernel"])
    with pytest.raises(ValueError, match=r"finetuned\[0\] differs from base"):
        fj.merge(base, fts, fj.merging.mean())


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_nonfinite_finetuned(models, bad):
    base, fts = models
    fts[2] = replace(fts[2], ["dense", "kernel"], fts[2]["dense"]["kernel"].at[1, 1].set(bad))
    with pytest.raises(ValueError, match=rf"finetuned\[2\] has NaN or Inf values at {KERNEL}"):
        fj.merge(base, fts, fj.merging.ties())


def test_nonfinite_base_global_path(models):
    base, fts = models
    base = replace(base, ["dense", "kernel"], base["dense"]["kernel"].at[0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match=rf"base has NaN or Inf values at {KERNEL}"):
        fj.merge(base, fts, fj.merging.ties(scope="model"))


def test_nonfinite_check_can_be_disabled(models):
    base, fts = models
    fts[0] = replace(fts[0], ["dense", "bias"], fts[0]["dense"]["bias"].at[0].set(jnp.nan))
    out = fj.merge(base, fts, fj.merging.mean(), check_finite=False)
    assert np.isnan(out["dense"]["bias"][0])


def test_integer_leaf_must_match(models):
    base, fts = models
    fts[1]["step"] = jnp.array(8, jnp.int32)
    with pytest.raises(ValueError, match=r"finetuned\[1\] differs from base at \['step'\]: .*not a floating-point array"):
        fj.merge(base, fts, fj.merging.mean())


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: fj.merging.ties(density=0.0), r"density must lie in \(0.0, 1.0\], got 0.0"),
        (lambda: fj.merging.ties(density=1.5), r"density must lie in \(0.0, 1.0\], got 1.5"),
        (lambda: fj.merging.trim(density=float("nan")), "density must lie"),
        (lambda: fj.merging.dare(drop_rate=1.0), r"drop_rate must lie in \[0.0, 1.0\)"),
        (lambda: fj.merging.dare(drop_rate=-0.1), "drop_rate must lie"),
        (lambda: fj.merging.task_arithmetic(scaling=float("nan")), "scaling must lie"),
        (lambda: fj.merging.slerp(t=1.5), r"t must lie in \[0.0, 1.0\]"),
        (lambda: fj.merging.breadcrumbs(gamma=1.0), "gamma must lie"),
        (lambda: fj.merging.della(density=0.5, epsilon=0.6), "density ± epsilon must lie"),
        (lambda: fj.merging.weighted_average(jnp.array([1.0, -1.0])), "weights must lie"),
        (lambda: fj.merging.weighted_average(jnp.zeros(2)), "weights must not all be zero"),
        (lambda: fj.merging.ties(merge="median"), "merge must be one of 'mean', 'sum', 'max'"),
        (lambda: fj.merging.trim(scope="layer"), "scope must be one of 'leaf', 'model'"),
        (lambda: fj.merging.elect_sign(method="vote"), "method must be one of 'mass', 'count'"),
        (lambda: fj.merging.slerp(space="angles"), "space must be"),
    ],
)
def test_bad_hyperparameters(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_weights_length_must_match_models(models):
    base, fts = models
    with pytest.raises(ValueError, match=r"mean at \['conv'\]\['kernel'\]: weights takes one value, or one per model \(shape \(3,\) for 3 models\), got shape \(2,\)"):
        fj.merge(base, fts, fj.merging.weighted_average(jnp.array([1.0, 2.0])))


def test_slerp_needs_two_models(models):
    base, fts = models
    with pytest.raises(ValueError, match="slerp merges exactly 2 models, got 3"):
        fj.merge(base, fts, fj.merging.slerp())


def test_model_stock_needs_two_models(models):
    base, fts = models
    with pytest.raises(ValueError, match="model_stock needs at least 2 models, got 1"):
        fj.merge(base, fts[:1], fj.merging.model_stock())


def test_random_merger_needs_key(models):
    base, fts = models
    with pytest.raises(ValueError, match="is random and needs a PRNG key"):
        fj.merge(base, fts, fj.merging.dare())
    with pytest.raises(ValueError, match="is random and needs a PRNG key"):
        fj.merging.drop_and_rescale()(fj.stack(fj.task_vectors(base, fts)))


def test_task_vector_checks_structure(models):
    base, fts = models
    with pytest.raises(ValueError, match=r"finetuned\[0\] differs from base at \['scale'\]"):
        fj.task_vector(base, replace(fts[0], ["scale"], jnp.zeros(2)))


def test_traced_values_skip_value_checks(models):
    base, fts = models
    fts[0] = replace(fts[0], ["dense", "bias"], fts[0]["dense"]["bias"].at[0].set(jnp.nan))
    out = jax.jit(lambda b, f: fj.merge(b, f, fj.merging.mean()))(base, fts)
    assert np.isnan(out["dense"]["bias"][0])
