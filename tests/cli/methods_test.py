"""mergekit's methods from YAML equal the fusionjax calls they document (no IO)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from fusionjax.cli import _config
from fusionjax.cli import _merge

m = fj.merging


def _tree(seed, scale=1.0):
    """float32 NumPy draws (a ``jax.random`` draw compiles a threefry program per shape)."""
    r = np.random.default_rng(seed)
    return {"model": {"layers": {"0": {"w": (scale * r.normal(size=(3, 5))).astype(np.float32)}},
                      "norm": {"weight": (scale * r.normal(size=(5,))).astype(np.float32)}}}


@pytest.fixture(scope="module")
def trees():
    base = _tree(0)
    a = jax.tree.map(np.add, base, _tree(1, 0.1))
    b = jax.tree.map(np.add, base, _tree(2, 0.1))
    return jax.device_put({"base": base, "a": a, "b": b})


def _run(cfg, trees, torch_layout=True, flip=False):
    plan = _config.parse_config(cfg).for_leaves(torch_layout)
    t = {k: jax.tree.map(jnp.transpose, v) for k, v in trees.items()} if flip else trees
    base = t[plan.base.path]
    if plan.zero_base:
        base = jax.tree.map(jnp.zeros_like, base)
    return fj.merge(base, [t[x.path] for x in plan.models], plan.merger,
                    key=_merge.merge_key(plan))


def _close(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=atol)


def _two(method, params=None, pa=None, pb=None, base="base", **extra):
    cfg = {"merge_method": method, "models": [
        {"model": "a", "parameters": pa or {}}, {"model": "b", "parameters": pb or {}}]}
    if base:
        cfg["base_model"] = base
    if params:
        cfg["parameters"] = params
    cfg.update(extra)
    return cfg


W = {"pa": {"weight": 0.3, "density": 0.6}, "pb": {"weight": 0.9, "density": 0.8}}
WS, DS = [0.3, 0.9], np.array([0.6, 0.8])

CASES = [
    ("ties_weights_sum_l1", _two("ties", {"normalize": False, "rescale": True}, **W),
     lambda: m.ties(density=DS, weights=WS, scaling=1.0, merge="sum", rescale="l1",
                    convention="mergekit"), ["base", "a", "b"]),
    ("breadcrumbs_lambda_1", _two("breadcrumbs", {"gamma": 0.1}, **W),
     lambda: m.breadcrumbs(density=DS, gamma=0.1, weights=WS, scaling=1.0,
                           convention="mergekit"), ["base", "a", "b"]),
    ("della_torch_rank_axis", _two("della", {"epsilon": 0.1}, **W, seed=1),
     lambda: m.della(density=DS, epsilon=0.1, weights=WS, scaling=1.0, merge="mean",
                     rescale="l1", rank_axis=1, convention="mergekit"), ["base", "a", "b"]),
    ("dare_linear_normalize", _two("dare_linear", {"normalize": True}, **W, seed=2),
     lambda: m.dare_linear(drop_rate=1 - DS, weights=WS, normalize=True, rescale="l1"),
     ["base", "a", "b"]),
    ("nuslerp_rows_with_base", _two("nuslerp", {"nuslerp_flatten": False}, {"weight": 1.0},
                                    {"weight": 3.0}),
     lambda: m.nuslerp(weights=[1.0, 3.0], flatten=False, axis=-1, space="task_vectors"),
     ["base", "a", "b"]),
    ("multislerp", _two("multislerp", {"eps": 1e-6}, {"weight": 0.2}, {"weight": 0.6}),
     lambda: m.multislerp(weights=[0.2, 0.6], eps=1e-6, space="task_vectors"),
     ["base", "a", "b"]),
    ("karcher_with_base", _two("karcher", {"max_iter": 5}),
     lambda: m.karcher(max_iter=5), ["base", "base", "a", "b"]),
    ("sce", _two("sce", {"select_topk": 0.5}), lambda: m.sce(density=0.5), ["base", "a", "b"]),
]


@pytest.mark.parametrize("cfg, make, order", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_method_equals_the_fusionjax_call(cfg, make, order, trees):
    got = _run(cfg, trees)
    key = jax.random.key(cfg.get("seed", 0))
    want = fj.merge(trees[order[0]], [trees[n] for n in order[1:]], make(), key=key)
    _close(got, want)


def _one(method, params=None):
    cfg = {"merge_method": method, "base_model": "base", "models": [{"model": "a"}]}
    if params:
        cfg["parameters"] = params
    return cfg


def test_nearswap_is_mergekits_formula(trees):
    got = _run(_one("nearswap", {"t": 0.05}), trees)
    for x, a, b in zip(*(jax.tree.leaves(t) for t in (got, trees["base"], trees["a"])),
                       strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        w = np.clip(0.05 / np.maximum(np.abs(a - b), 1e-6), 0, 1)
        np.testing.assert_allclose(np.asarray(x), w * b + (1 - w) * a, rtol=1e-5, atol=1e-6)


def test_linear_without_normalize_is_the_weighted_sum(trees):
    cfg = _two("linear", {"normalize": False}, {"weight": 0.5}, {"weight": 2.0})
    plan = _config.parse_config(cfg)
    assert plan.zero_base
    got = _run(cfg, trees)
    want = jax.tree.map(lambda a, b: 0.5 * np.asarray(a) + 2.0 * np.asarray(b),
                        trees["a"], trees["b"])
    _close(got, want, atol=1e-5)


def test_flax_layout_axes_follow_the_transpose(trees):
    # the same mergekit config on flax (in, out) leaves gives the transposed result
    for cfg in (_one("arcee_fusion"), _two("model_stock", {"filter_wise": True})):
        torch = _run(cfg, trees, torch_layout=True)
        flax = _run(cfg, trees, torch_layout=False, flip=True)
        _close(jax.tree.map(jnp.transpose, flax), torch)
    # and the torch axis on flax leaves differs: the axis choice matters
    wrong = _run(cfg, trees, torch_layout=True, flip=True)
    w = jax.tree.leaves(wrong)[0]  # model/layers/0/w
    assert not np.allclose(np.asarray(w).T, np.asarray(jax.tree.leaves(torch)[0]))


def test_convention_key():
    plan = _config.parse_config(_two("ties"))
    assert plan.convention == "mergekit"
    assert "mergekit" in plan.merger.parts[0].name
    plan = _config.parse_config(_two("ties", convention="fusionjax"))
    assert plan.convention == "fusionjax" and plan.merger.parts[0].name == "trim"
    assert _config.parse_config(_two("fusionjax.ties")).convention == "fusionjax"
    for cfg, key in [(_two("ties", convention="torch"), "convention"),
                     (_two("fusionjax.ties", convention="mergekit"), "convention"),
                     (_two("ties", layout="lama"), "layout")]:
        with pytest.raises(_config.ConfigError) as e:
            _config.parse_config(cfg)
        assert e.value.key == key
    assert _config.parse_config(_two("ties", layout="llama")).layout == "llama"
