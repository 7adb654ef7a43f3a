"""dense_fisher_diagonal: the Fisher of fisher_diagonal, from Dense inputs and output gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax.interop import _linen_fisher
from fusionjax.interop import dense_fisher_diagonal
from fusionjax.merging import fisher_diagonal
from tests._testing import F32
from tests._testing import assert_trees_close


class Block(nn.Module):
    """A nested Dense (path ``('block', 'proj')``)."""

    @nn.compact
    def __call__(self, x):  # noqa: D102
        return nn.gelu(nn.Dense(6, name="proj")(x))


class Net(nn.Module):
    """Dense_0 -> Block (nested Dense) -> a shared Dense called twice -> a bias-free head."""

    @nn.compact
    def __call__(self, x):  # noqa: D102
        x = nn.tanh(nn.Dense(6)(x))
        x = Block(name="block")(x)
        shared = nn.Dense(6, name="shared")
        x = shared(jnp.tanh(shared(x)))
        return nn.Dense(4, use_bias=False, name="head")(x)


class Tokens(nn.Module):
    """``[n, L, d]`` tokens: a Dense on every token, mean-pooled, then a head."""

    @nn.compact
    def __call__(self, x):  # noqa: D102
        h = nn.relu(nn.Dense(5)(x))
        return nn.Dense(3)(jnp.mean(h, axis=1))


def _normal(seed, shape, scale=1.0):
    """NumPy-drawn float32 normals (no threefry program to compile)."""
    return jax.device_put((scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32))


def _init(module, x, seed):
    """``module``'s params, shapes from ``init`` (traced only), values drawn in NumPy.

    Kernels are LeCun-normal as flax's default initialiser; biases are drawn too (not zero).
    """
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    return treedef.unflatten(
        [
            _normal((seed, i), s.shape, 1 / np.sqrt(s.shape[0]) if s.ndim == 2 else 0.1)
            for i, s in enumerate(leaves)
        ]
    )


def _mlp():
    model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(16), nn.relu, nn.Dense(5)])
    params = _init(model, jnp.ones((1, 7)), 0)
    x = _normal(1, (37, 7), 2.0)
    return model, params, x


@pytest.mark.parametrize("batch_size", [None, 8])
def test_equals_fisher_diagonal_on_an_mlp(batch_size):
    """One row per example: the matrix-product path, with and without a padded last batch."""
    model, params, x = _mlp()
    fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    fast = dense_fisher_diagonal(fn, params, x, batch_size=batch_size)
    slow = fisher_diagonal(fn, params, x, batch_size=batch_size)
    assert_trees_close(fast, slow, **F32)
    assert all(np.min(f) >= 0.0 for f in jax.tree.leaves(fast))
    assert np.max(fast["layers_0"]["kernel"]) > 1e-3  # not trivially zero


@pytest.mark.parametrize("module", [Net(), Tokens()], ids=["shared-and-nested", "tokens"])
def test_equals_fisher_diagonal_with_several_rows_per_example(module):
    """A Dense called twice, nested paths, a bias-free layer, and token inputs (rows > 1)."""
    shape = (11, 3) if isinstance(module, Net) else (11, 4, 3)
    x = _normal(2, shape)
    params = _init(module, x[:1], 3)
    fn = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
    fast = dense_fisher_diagonal(fn, params, x, batch_size=4)
    slow = fisher_diagonal(fn, params, x, batch_size=4)
    assert_trees_close(fast, slow, **F32)


def test_logits_outside_the_model_and_a_partial_share_one_compile():
    """The testbed's shape: model features through fixed heads closed over in a Partial."""
    model, params, x = _mlp()

    def logits(head, p, x):
        f = model.apply({"params": p}, x)
        return 10.0 * (f / jnp.linalg.norm(f, axis=-1, keepdims=True)) @ head

    heads = [_normal(10 + i, (5, 3)) for i in range(2)]
    # The reference differentiates the head too (one compile for both heads); a diagonal
    # Fisher entry of the model's params does not depend on which other leaves are included.
    with_head = lambda p, x: logits(p["head"], p["model"], x)  # noqa: E731
    before = _linen_fisher._accumulate._cache_size()
    for head in heads:
        fn = jax.tree_util.Partial(logits, head)
        fast = dense_fisher_diagonal(fn, params, x, batch_size=16)
        slow = fisher_diagonal(with_head, {"model": params, "head": head}, x, batch_size=16)
        assert_trees_close(fast, slow["model"], **F32)
    assert _linen_fisher._accumulate._cache_size() - before == 1


def test_a_parameter_outside_dense_layers_is_named():
    """A LayerNorm's parameters have no Dense Fisher: the path is named."""

    class WithNorm(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.LayerNorm()(x))

    module = WithNorm()
    params = _init(module, jnp.ones((1, 3)), 0)
    fn = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
    with pytest.raises(ValueError, match=r"params\['LayerNorm_0'\]\['bias'\] is not the kernel"):
        dense_fisher_diagonal(fn, params, jnp.ones((4, 3)))


def test_logits_must_be_batched():
    """Unbatched logits and a zero batch size are rejected."""
    model, params, x = _mlp()
    with pytest.raises(ValueError, match=r"\[n, C\]"):
        dense_fisher_diagonal(lambda p, x: model.apply({"params": p}, x)[0], params, x)
    with pytest.raises(ValueError, match="batch_size"):
        dense_fisher_diagonal(lambda p, x: model.apply({"params": p}, x), params, x, batch_size=0)


def test_non_float_leaves_are_none():
    """As fisher_diagonal: integer leaves get ``None``, float leaves a Fisher."""
    model, params, x = _mlp()
    params = dict(params, step=np.int32(3))

    def fn(p, x):
        return model.apply({"params": {k: v for k, v in p.items() if k != "step"}}, x)

    out = dense_fisher_diagonal(fn, params, x)
    assert out["step"] is None and out["layers_4"]["bias"].shape == (5,)
