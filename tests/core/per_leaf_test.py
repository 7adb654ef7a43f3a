"""Per-leaf control: values by path pattern, per-layer gradients, a merger per subtree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from fusionjax._src import paths

K = jax.random.key


def layered(n_layers=5):
    base = {f"layers_{i}": {"attn": jnp.zeros(4), "mlp": jnp.zeros(4)} for i in range(n_layers)}
    base["embed"] = jnp.zeros(4)
    ft = jax.tree.map(lambda x: x + 1.0, base)
    return base, [ft]


def test_by_path_first_match_wins_and_default():
    base, fts = layered()
    scaling = fj.by_path([("layers_0/attn", 0.1), ("attn", 0.5)], default=1.0)
    out = fj.merge(base, fts, fj.merging.task_arithmetic(scaling=scaling))
    assert float(out["layers_0"]["attn"][0]) == pytest.approx(0.1)
    assert float(out["layers_3"]["attn"][0]) == pytest.approx(0.5)
    assert float(out["layers_3"]["mlp"][0]) == pytest.approx(1.0)
    assert float(out["embed"][0]) == pytest.approx(1.0)


def test_by_path_without_default_names_the_unmatched_leaf():
    base, fts = layered()
    m = fj.merging.task_arithmetic(scaling=fj.by_path({"attn": 0.5}))
    with pytest.raises(ValueError, match=r"no rule of by_path matches the leaf \['embed'\]"):
        fj.merge(base, fts, m)


def test_gradient_interpolates_over_layers_like_mergekit():
    base, fts = layered(5)
    m = fj.merging.task_arithmetic(scaling=fj.gradient([0.0, 1.0, 0.0], outside=0.25))
    out = fj.merge(base, fts, m)
    got = [float(out[f"layers_{i}"]["mlp"][0]) for i in range(5)]
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-7)
    assert float(out["embed"][0]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"gradient: the leaf \['embed'\] has no layer number"):
        fj.merge(base, fts, fj.merging.task_arithmetic(scaling=fj.gradient([0.0, 1.0])))


def test_gradient_inside_by_path_and_per_leaf_density():
    base, fts = layered(3)
    density = fj.by_path({"attn": fj.gradient([0.25, 1.0])}, default=0.5)
    tvs = fj.stack(fj.task_vectors(base, fts))
    tvs = jax.tree.map(lambda x: x * jnp.arange(1.0, 5.0)[None], tvs)
    out = fj.merging.trim(density=density)(tvs)
    kept = lambda x: int((np.asarray(x) != 0).sum())  # noqa: E731
    assert [kept(out[f"layers_{i}"]["attn"]) for i in range(3)] == [1, 3, 4]
    assert kept(out["layers_1"]["mlp"]) == 2


@pytest.mark.parametrize(
    "name,index",
    [("layers_3/mlp/kernel", 3), ("model/layers/12/attn", 12), ("h.7.attn", 7), ("block_2/x", 2),
     ("encoder/3/w", 3), ("embed/w", None)],
)
def test_layer_index(name, index):
    assert paths.layer_index(name) == index


def test_partition_chooses_the_merger_per_subtree():
    base, fts2 = layered(2)
    ft_b = jax.tree.map(lambda x: x - 3.0, base)
    fts = [fts2[0], ft_b]
    m = fj.partition(
        {"avg": fj.merging.mean(), "ties": fj.merging.ties(density=1.0)},
        lambda name: "avg" if name.endswith("mlp") else "ties",
    )
    out = fj.merge(base, fts, m)
    assert float(out["layers_0"]["mlp"][0]) == pytest.approx(-1.0)  # mean of +1 and -3
    assert float(out["layers_0"]["attn"][0]) == pytest.approx(-3.0)  # sign election: -3 wins
    with pytest.raises(ValueError, match=r"has label 'nope', which names no step"):
        fj.merge(base, fts, fj.partition({"a": fj.merging.mean()}, lambda name: "nope"))


def test_partition_construction_errors():
    with pytest.raises(TypeError, match="all be mergers or all task-vector steps"):
        fj.partition({"a": fj.merging.mean(), "b": fj.merging.trim()}, lambda n: "a")
    with pytest.raises(ValueError, match="model-wide statistic"):
        fj.partition({"a": fj.merging.ties(scope="model")}, lambda n: "a")
    with pytest.raises(ValueError, match="label 'c' names no step"):
        fj.partition({"a": fj.merging.mean()}, fj.by_path({"x": "c"}, default="a"))


def test_random_partition_draws_what_the_branch_draws():
    base, fts = layered(2)
    dare = fj.merging.dare(drop_rate=0.5, merger=fj.merging.sum())
    both = fj.partition({"d": dare, "m": fj.merging.mean()}, fj.by_path({"attn": "d"}, default="m"))
    a = fj.merge(base, fts, both, key=K(4))
    b = fj.merge(base, fts, dare, key=K(4))
    np.testing.assert_array_equal(a["layers_1"]["attn"], b["layers_1"]["attn"])


def test_per_model_weights_per_leaf_in_weighted_mean():
    base, _ = layered(2)
    fts = [jax.tree.map(lambda x: x + 1.0, base), jax.tree.map(lambda x: x + 4.0, base)]
    weights = fj.by_path({"attn": jnp.array([1.0, 2.0])}, default=jnp.array([1.0, 1.0]))
    out = fj.merge(base, fts, fj.merging.mean(weights=weights))
    assert float(out["layers_1"]["attn"][0]) == pytest.approx(3.0)  # (1*1 + 2*4) / 3
    assert float(out["layers_1"]["mlp"][0]) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="weights must not all be zero"):
        fj.merging.mean(weights=fj.by_path({"attn": jnp.zeros(2)}, default=jnp.ones(2)))
