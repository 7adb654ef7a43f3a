"""Hand-written permutation specs: permuting every group leaves each zoo model unchanged."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import zoo
from fusionjax.alignment import PermutationSpec
from fusionjax.alignment import apply_permutations
from fusionjax.alignment import mlp_spec
from fusionjax.alignment import random_permutations
from fusionjax.alignment import resnet_spec
from fusionjax.alignment import transformer_spec
from fusionjax.alignment import vgg_spec
from fusionjax.alignment._spec import path_str
from tests._testing import assert_trees_close

IMAGES = jnp.zeros((2, 8, 8, 3))
TOKENS = jnp.zeros((2, 4, 5))
CASES = {
    "mlp": (zoo.MLP(widths=(6, 6), num_classes=3), jnp.zeros((2, 4, 4, 1)), mlp_spec(2)),
    "vgg": (zoo.VGG(features=(4, "M", 6), num_classes=3), IMAGES, vgg_spec((4, "M", 6))),
    "resnet_batch": (zoo.ResNet(blocks=2, num_classes=3), IMAGES, resnet_spec(2)),
    "resnet_layer": (
        zoo.ResNet(blocks=1, num_classes=3, norm="layer"),
        IMAGES,
        resnet_spec(1, norm="layer"),
    ),
    "transformer": (
        zoo.Transformer(dim=8, depth=1, heads=2, mlp_width=12, num_classes=3),
        TOKENS,
        transformer_spec(1),
    ),
}
"""``{name: (linen model, example input, hand spec)}`` with tiny widths."""


def randomize(variables, seed=0):
    """Every leaf redrawn (norm scales and statistics too), so no group is symmetric by chance.

    NumPy draws from shapes only: no compilation per leaf shape, which dominates on CPU.
    """
    rng = np.random.default_rng(seed)
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
    leaves = []
    for path, x in flat:
        y = 0.5 * rng.standard_normal(x.shape, np.float32)
        leaves.append(
            jax.device_put(np.abs(y) + 0.5 if jax.tree_util.keystr(path).endswith("['var']") else y)
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


def compiled(apply_fn):
    """``apply_fn`` under ``jax.jit`` (compiled once per case)."""
    return jax.jit(apply_fn)


@functools.cache
def case(name, seed=0):
    """``(apply_fn, variables, input, hand spec)`` with random variables and a random input."""
    model, x, spec = CASES[name]
    variables = randomize(jax.eval_shape(model.init, jax.random.key(0), x), seed)
    x = jax.device_put(np.random.default_rng(seed + 1).standard_normal(x.shape, np.float32))
    return compiled(model.apply), variables, x, spec


def numpy_permutations(spec, variables, seed=1):
    """One random permutation per group (NumPy, so nothing compiles)."""
    rng = np.random.default_rng(seed)
    return {k: jax.device_put(rng.permutation(n)) for k, n in spec.sizes(variables).items()}


def permute(spec, perms, variables):
    """:func:`apply_permutations` in NumPy: a test oracle that compiles nothing."""
    axes = spec.leaf_axes(variables)

    def move(keypath, x):
        x = np.asarray(x)
        for axis, group in enumerate(axes.get(path_str(keypath), ())):
            if group is not None:
                x = np.take(x, np.asarray(perms[group]), axis=axis)
        return jax.device_put(x)

    return jax.tree_util.tree_map_with_path(move, variables)


def assert_invariant(apply_fn, variables, x, spec, permute_fn=permute):
    """Random permutations of every group change the parameters but not the outputs."""
    perms = numpy_permutations(spec, variables)
    assert any(not np.array_equal(p, np.arange(p.shape[0])) for p in perms.values())
    permuted = permute_fn(spec, perms, variables)
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, permuted, variables)))
    assert_trees_close(apply_fn(permuted, x), apply_fn(variables, x))


@pytest.mark.parametrize("name", CASES)
def test_hand_spec_leaves_outputs_unchanged(name):
    apply_fn, variables, x, spec = case(name)
    assert_invariant(apply_fn, variables, x, spec)


@pytest.mark.parametrize(
    "name,group,entry",
    [
        ("mlp", "P_1", ("params/Dense_2/kernel", 0)),
        ("resnet_batch", "stage1", ("batch_stats/stage1_block0/shortcut_norm/mean", 0)),
        # Not the key bias: q.(k + b) - q.k is the same for every key, so softmax ignores it.
        ("transformer", "block_0/qk", ("params/block_0/attn/query/bias", 1)),
    ],
)
def test_leaving_out_an_axis_changes_outputs(name, group, entry):
    apply_fn, variables, x, spec = case(name)
    groups = dict(spec.groups)
    groups[group] = [e for e in groups[group] if e != entry]
    assert len(groups[group]) == len(spec.groups[group]) - 1
    broken = PermutationSpec(groups)
    permuted = permute(broken, numpy_permutations(broken, variables), variables)
    assert not np.allclose(apply_fn(permuted, x), apply_fn(variables, x), rtol=1e-3)


def test_group_names_are_in_forward_order():
    assert mlp_spec(2).names == ("P_0", "P_1")
    assert vgg_spec((4, "M", 6, 8)).names == ("P_0", "P_1", "P_2")
    assert resnet_spec(1).names == (
        "stage0",
        "stage0_block0",
        "stage1_block0",
        "stage1",
        "stage2_block0",
        "stage2",
    )
    assert transformer_spec(1).names == (
        "residual",
        "block_0/heads",
        "block_0/qk",
        "block_0/vo",
        "block_0/mlp",
    )


def test_resnet_spec_covers_batch_stats_only_with_batch_norm():
    paths = lambda spec: {p.split("/")[0] for axes in spec.groups.values() for p, _ in axes}  # noqa: E731
    assert paths(resnet_spec(1)) == {"params", "batch_stats"}
    assert paths(resnet_spec(1, norm="layer")) == {"params"}
    assert paths(resnet_spec(1, prefix="model")) == {"model"}
    with pytest.raises(ValueError, match="'group'"):
        resnet_spec(1, norm="group")


def test_prefix_none_names_bare_params():
    _, variables, x, _ = case("mlp")
    apply_fn = compiled(lambda p, x: CASES["mlp"][0].apply({"params": p}, x))
    spec = mlp_spec(2, prefix=None)
    assert_invariant(apply_fn, variables["params"], x, spec, permute_fn=apply_permutations)


def test_wrong_sizes_fail_naming_the_path():
    model = zoo.VGG(features=(4, "M", 6, 8), num_classes=3)
    variables = jax.eval_shape(model.init, jax.random.key(0), IMAGES)
    spec = vgg_spec((4, "M", 6))  # one convolution short: Dense_0 reads 8 channels, not 6
    match = (
        r"'P_1'.*'params/Conv_1/kernel' axis 3 has 6 units, 'params/Dense_0/kernel' axis 0 has 8"
    )
    with pytest.raises(ValueError, match=match):
        random_permutations(spec, variables, jax.random.key(0))
    with pytest.raises(ValueError, match="'params/block_1/ln1/scale', not a leaf"):
        transformer_spec(2).sizes(case("transformer")[1])
    _, variables, _, spec = case("mlp")
    with pytest.raises(ValueError, match=r"group 'P_0' has shape \(5,\), expected \(6,\)"):
        apply_permutations(spec, {"P_0": jnp.arange(5), "P_1": jnp.arange(6)}, variables)
