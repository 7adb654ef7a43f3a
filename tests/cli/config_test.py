"""The merge config: parsing, mergekit's semantics, and errors that name the key (no IO)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from fusionjax.cli import _config
from fusionjax.cli import _merge

L = 3  # layers


def _model(key, scale=1.0):
    ks = jax.random.split(key, 2 * L + 2)
    layers = {
        str(i): {
            "self_attn": {"q_proj": {"weight": scale * jax.random.normal(ks[2 * i], (4, 4))}},
            "mlp": {"up_proj": {"weight": scale * jax.random.normal(ks[2 * i + 1], (6, 4))}},
        }
        for i in range(L)
    }
    return {
        "model": {
            "embed_tokens": {"weight": scale * jax.random.normal(ks[-2], (8, 4))},
            "layers": layers,
            "norm": {"weight": scale * jax.random.normal(ks[-1], (4,))},
        }
    }


@pytest.fixture(scope="module")
def models():
    base = _model(jax.random.key(0))
    fts = [
        jax.tree.map(jnp.add, base, _model(jax.random.key(i + 1), 0.1)) for i in range(2)
    ]
    return base, fts


def _cfg(method, **extra):
    cfg = {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": "a"}, {"model": "b"}],
    }
    cfg.update(extra)
    return cfg


def _merged(plan, models, key=None):
    base, fts = models
    by_path = {"base": base, "a": fts[0], "b": fts[1]}
    return fj.merge(
        by_path[plan.base.path], [by_path[m.path] for m in plan.models], plan.merger,
        key=_merge.merge_key(plan) if key is None else key,
    )


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def _close(a, b, rtol=1e-6, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_task_arithmetic_weights_and_lambda(models):
    cfg = _cfg("task_arithmetic", parameters={"lambda": 0.5})
    cfg["models"][0]["parameters"] = {"weight": 0.25}
    cfg["models"][1]["parameters"] = {"weight": 0.75}
    out = _merged(_config.parse_config(cfg), models)
    base, (a, b) = models
    want = jax.tree.map(lambda x, p, q: x + 0.5 * (0.25 * (p - x) + 0.75 * (q - x)), base, a, b)
    _close(out, want)


def test_equal_weights_give_fusionjax_task_arithmetic(models):
    cfg = _cfg("task_arithmetic", parameters={"weight": 0.4})
    plan = _config.parse_config(cfg)
    base, fts = models
    want = fj.merge(base, fts, fj.merging.task_arithmetic(scaling=0.4))
    _close(_merged(plan, models), want)


def test_linear_is_the_weighted_average_of_the_models(models):
    cfg = {"merge_method": "linear",
           "models": [{"model": "a", "parameters": {"weight": 1.0}},
                      {"model": "b", "parameters": {"weight": 3.0}}]}
    plan = _config.parse_config(cfg)
    assert plan.base.path == "a" and [m.path for m in plan.models] == ["a", "b"]
    _, (a, b) = models
    _close(_merged(plan, models), jax.tree.map(lambda p, q: 0.25 * p + 0.75 * q, a, b))


def test_ties_per_model_density_is_fusionjax_ties(models):
    cfg = _cfg("ties")
    cfg["models"][0]["parameters"] = {"density": 0.5, "weight": 1.0}
    cfg["models"][1]["parameters"] = {"density": 0.75, "weight": 1.0}
    base, fts = models
    want = fj.merge(base, fts, fj.merging.ties(density=jnp.array([0.5, 0.75])))
    _close(_merged(_config.parse_config(cfg), models), want)


def test_dare_ties_defaults_follow_the_convention(models):
    cfg = _cfg("dare_ties", parameters={"density": 0.6}, seed=3)
    base, fts = models
    key = jax.random.key(3)
    # mergekit: normalize false (sum), rescale true (L1), sign ties -> +
    expect = fj.merging.dare_ties(drop_rate=0.4, weights=[1.0, 1.0], scaling=1.0, merge="sum",
                                  rescale="l1", convention="mergekit")
    _close(_merged(_config.parse_config(cfg), models), fj.merge(base, fts, expect, key=key))
    # convention: fusionjax: the factory's own defaults (mean, 1/q rescale)
    plan = _config.parse_config({**cfg, "convention": "fusionjax"})
    expect = fj.merging.dare_ties(drop_rate=0.4, weights=[1.0, 1.0], scaling=1.0)
    fj_out = _merged(plan, models)
    _close(fj_out, fj.merge(base, fts, expect, key=key))
    # random: another seed draws another mask
    other = _merged(_config.parse_config({**cfg, "convention": "fusionjax", "seed": 4}), models)
    assert not np.allclose(np.asarray(jax.tree.leaves(other)[0]),
                           np.asarray(jax.tree.leaves(fj_out)[0]))


def test_slerp_gradient_t_interpolates_over_layers(models):
    cfg = {"merge_method": "slerp", "base_model": "base",
           "models": [{"model": "base"}, {"model": "b"}],
           "parameters": {"t": [0.0, 1.0]}}
    plan = _config.parse_config(cfg)
    assert [m.path for m in plan.models] == ["base", "b"]
    out = _merged(plan, models)
    base, (_, b) = models
    lay = out["model"]["layers"]
    w = ("self_attn", "q_proj", "weight")
    get = lambda t, i: t["model"]["layers"][str(i)][w[0]][w[1]][w[2]]  # noqa: E731
    np.testing.assert_allclose(lay["0"]["self_attn"]["q_proj"]["weight"], get(base, 0), atol=1e-6)
    np.testing.assert_allclose(lay["2"]["self_attn"]["q_proj"]["weight"], get(b, 2), atol=1e-6)
    mid = fj.merging.slerp_arrays(get(base, 1), get(b, 1), 0.5)
    np.testing.assert_allclose(lay["1"]["self_attn"]["q_proj"]["weight"], mid, atol=1e-6)
    # outside the layers mergekit evaluates the gradient at t = 0: the base
    np.testing.assert_allclose(out["model"]["norm"]["weight"], base["model"]["norm"]["weight"],
                               atol=1e-6)


def test_filter_rules_choose_per_tensor(models):
    cfg = _cfg("task_arithmetic", parameters={
        "lambda": [{"filter": "self_attn.q_proj", "value": 0.5}, {"value": 1.0}]})
    out = _merged(_config.parse_config(cfg), models)
    base, (a, b) = models
    for path, x in jax.tree_util.tree_flatten_with_path(out)[0]:
        name = fj.LeafInfo(path, (), None, 2).name
        lam = 0.5 if "self_attn/q_proj" in name else 1.0
        x0, xa, xb = (_at(t, path) for t in (base, a, b))
        want = x0 + lam * (xa - x0 + xb - x0)
        np.testing.assert_allclose(x, want, rtol=1e-6, atol=1e-6, err_msg=name)


def test_per_model_gradient_stacks_per_leaf(models):
    cfg = _cfg("ties")
    cfg["models"][0]["parameters"] = {"density": [0.2, 1.0]}
    cfg["models"][1]["parameters"] = {"density": 0.6}
    plan = _config.parse_config(cfg)
    info = fj.LeafInfo(
        (jax.tree_util.DictKey("model"), jax.tree_util.DictKey("layers"),
         jax.tree_util.DictKey("1"), jax.tree_util.DictKey("mlp")), (4,), jnp.float32, 2, 3, 100)
    trim = plan.merger.resolve(info).parts[0]
    assert trim.name == "trim(mergekit)"
    # density 0.6 at layer 1 of 3 for model 0, 0.6 for model 1; mergekit keeps
    # max(1, floor(0.6 * 4)) = 2 entries
    np.testing.assert_array_equal(np.asarray(trim.hparams["k"]), [2, 2])


def test_native_method_kwargs(models):
    cfg = _cfg("fusionjax.breadcrumbs", parameters={"density": 0.5, "scope": "leaf",
                                                     "scaling": 0.7})
    base, fts = models
    want = fj.merge(base, fts, fj.merging.breadcrumbs(density=0.5, scope="leaf", scaling=0.7))
    _close(_merged(_config.parse_config(cfg), models), want)


@pytest.mark.parametrize(
    "cfg, key, words",
    [
        (_cfg("tie"), "merge_method", "did you mean 'ties'"),
        (_cfg("fusionjax.tiez"), "merge_method", "fusionjax.ties"),
        (_cfg("ties", parameters={"densty": 0.5}), "parameters.densty", "'density'"),
        ({**_cfg("ties"), "models": [{"model": "a", "parameters": {"wieght": 1}}]},
         "models[0].parameters.wieght", "'weight'"),
        ({**_cfg("ties"), "models": [{"model": "a"}, {"model": "b", "parameters": {"density": 1.5}}]},
         "models[1].parameters.density", "(0, 1]"),
        (_cfg("ties", parameters={"density": []}), "parameters.density", "at least one"),
        (_cfg("ties", parameters={"density": [0.5, "x"]}), "parameters.density", "list of numbers"),
        (_cfg("ties", parameters={"normalize": 1}), "parameters.normalize", "true or false"),
        (_cfg("ties", out_dtype="bf32"), "out_dtype", "bfloat16"),
        (_cfg("ties", dtype="float8"), "dtype", "float32"),
        (_cfg("ties", output={"format": "pt"}), "output.format", "safetensors"),
        (_cfg("ties", output={"shards": 3}), "output.shards", "max_shard_bytes"),
        (_cfg("ties", tokenizer_source="union"), "tokenizer_source", "tokenizer"),
        (_cfg("ties", slices=[{"sources": []}]), "merge_method", "passthrough"),
        (_cfg("ties", merge_methd="ties"), "merge_methd", "'merge_method'"),
        ({"merge_method": "ties", "models": [{"model": "a"}]}, "base_model", "needs a base_model"),
        ({**_cfg("slerp", parameters={"t": 0.5}), "models": [{"model": "a"}, {"model": "b"}]},
         "models", "exactly 1"),
        ({**_cfg("slerp"), "models": [{"model": "b"}]}, "parameters.t", "needs `t`"),
        (_cfg("dare_ties", parameters={"rescale": 0}), "parameters.rescale", "true or false"),
        (_cfg("ties", parameters={"lambda": [{"value": 1.0}, {"filter": "mlp", "value": 2.0}]}),
         "parameters.lambda[1]", "never used"),
        (_cfg("ties", seed=-1), "seed", "non-negative"),
        ({**_cfg("ties"), "models": [{"model": "a", "format": "onnx"}]}, "models[0].format",
         "orbax"),
    ],
)
def test_bad_configs_name_the_key(cfg, key, words):
    with pytest.raises(_config.ConfigError) as e:
        _config.parse_config(cfg)
    assert e.value.key == key
    assert str(e.value).startswith(key + ":")
    assert words in str(e.value)
    assert "\n" not in str(e.value)
