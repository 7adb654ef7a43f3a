"""BatchNorm statistics re-estimation and REPAIR after merging."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax.alignment import repair
from fusionjax.alignment import reset_batch_stats
from tests._testing import assert_trees_close


class ConvBN(nn.Module):
    """Conv -> BN -> relu -> Dense -> BN -> relu -> Dense (BN with momentum 0)."""

    @nn.compact
    def __call__(self, x, train=False):
        """Logits of ``x [B, H, W, C]``."""
        bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.0)  # noqa: E731
        x = nn.relu(bn()(nn.Conv(4, (3, 3))(x)))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.relu(bn()(nn.Dense(5)(x)))
        return nn.Dense(3)(x)


class MLP(nn.Module):
    """A norm-free MLP; ``Dense_2`` is the output layer."""

    bias: bool = True

    @nn.compact
    def __call__(self, x):
        """Logits of ``x [B, 4]``."""
        x = nn.relu(nn.Dense(6, use_bias=self.bias)(x))
        x = nn.relu(nn.Dense(6)(x))
        return nn.Dense(3)(x)


def random_variables(model, x, seed):
    """Variables shaped by ``model.init`` (traced, not compiled), filled from numpy."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree.map(
        lambda s: jax.device_put(np.asarray(0.5 * rng.normal(size=s.shape) + 0.5, s.dtype)), shapes
    )


def intermediates(model, v, x):
    """Every submodule's output (compiled)."""
    run = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True)[1]["intermediates"])
    return jax.tree.map(np.asarray, run(v, x))


@pytest.fixture(scope="module")
def convbn():
    """A ConvBN model, inputs and random variables (a stand-in for a merged model)."""
    net = ConvBN()
    x = jax.device_put(np.random.default_rng(0).normal(size=(24, 6, 6, 2)).astype(np.float32))
    merged = random_variables(net, x, 1)
    return net, x, merged


def test_stats_are_exact_moments_over_all_batches(convbn):
    """Statistics are the exact moments over all batches, not a momentum average."""
    net, x, merged = convbn
    new = reset_batch_stats(net.apply, merged, [x[:12], x[12:]])
    # The first BatchNorm reads the conv output: compare with its moments over all 24 inputs.
    conv = intermediates(net, merged, x)["Conv_0"]["__call__"][0]
    h = np.asarray(conv, np.float64).reshape(-1, 4)
    stats = new["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], h.var(0), rtol=1e-4, atol=1e-6)
    assert new["params"] is merged["params"] or jax.tree.all(
        jax.tree.map(lambda u, v: np.array_equal(u, v), new["params"], merged["params"])
    )


def test_one_batch_matches_flax_train_mode(convbn):
    """On one batch, the new statistics are flax's own train-mode batch statistics."""
    net, x, merged = convbn
    new = reset_batch_stats(net.apply, merged, [x])
    train = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]))
    y_train, upd = train(merged, x)  # momentum 0: the stats are this batch's
    assert_trees_close(new["batch_stats"], upd["batch_stats"], rtol=1e-4, atol=1e-6)
    # so the re-estimated model in eval mode computes what train mode computed.
    np.testing.assert_allclose(jax.jit(net.apply)(new, x), y_train, rtol=1e-4, atol=1e-5)


def test_reset_errors(convbn):
    """Empty batches, a model without BatchNorm, a non-callable apply_fn."""
    net, x, merged = convbn
    with pytest.raises(ValueError, match="batches is empty"):
        reset_batch_stats(net.apply, merged, [])
    mlp = MLP()
    v = random_variables(mlp, x[:4, 0, 0], 0)
    with pytest.raises(ValueError, match="called no nn.BatchNorm"):
        reset_batch_stats(mlp.apply, v, [x[:4, 0, 0]])
    with pytest.raises(TypeError, match="apply_fn must be callable"):
        reset_batch_stats(None, merged, [x])


@pytest.fixture(scope="module")
def mlps():
    """A norm-free MLP, inputs and two random endpoints."""
    mlp = MLP()
    x = jax.device_put(np.random.default_rng(3).normal(size=(32, 4)).astype(np.float32))
    return mlp, x, random_variables(mlp, x, 4), random_variables(mlp, x, 5)


def _layer_stats(mlp, v, x):
    inter = intermediates(mlp, v, x)
    out = {}
    for name in ("Dense_0", "Dense_1", "Dense_2"):
        h = np.asarray(inter[name]["__call__"][0], np.float64)
        out[name] = (h.mean(0), h.std(0))
    return out


def test_repair_gives_interpolated_statistics(mlps):
    """After REPAIR each corrected layer's channels have the interpolated mean and std."""
    mlp, x, a, b = mlps
    w = 0.3
    # On the host (float32, the same arithmetic): no eager op programs per leaf shape.
    merged = jax.tree.map(
        lambda u, v: jax.device_put((1 - w) * np.asarray(u) + w * np.asarray(v)), a, b
    )
    fixed = repair(mlp.apply, merged, [a, b], [x], weights=[1 - w, w])
    sa, sb, sf, s0 = (_layer_stats(mlp, v, x) for v in (a, b, fixed, merged))
    for name in ("Dense_0", "Dense_1"):
        np.testing.assert_allclose(sf[name][0], (1 - w) * sa[name][0] + w * sb[name][0], atol=1e-4)
        np.testing.assert_allclose(sf[name][1], (1 - w) * sa[name][1] + w * sb[name][1], rtol=1e-3)
    # The output layer is left alone by default (its kernel and bias are unchanged).
    np.testing.assert_array_equal(
        fixed["params"]["Dense_2"]["kernel"], merged["params"]["Dense_2"]["kernel"]
    )
    # Variance collapse: the plain average has smaller stds than the interpolated targets.
    target = (1 - w) * sa["Dense_1"][1] + w * sb["Dense_1"][1]
    assert s0["Dense_1"][1].mean() < target.mean()

    only = repair(mlp.apply, merged, [a, b], [x], layers=["Dense_0"])
    np.testing.assert_array_equal(
        only["params"]["Dense_1"]["kernel"], merged["params"]["Dense_1"]["kernel"]
    )


def test_repair_errors(mlps):
    """Unknown layers, wrong weights, no endpoints, layers without bias."""
    mlp, x, a, b = mlps
    with pytest.raises(ValueError, match="'Dense_7' is not an nn.Dense/nn.Conv"):
        repair(mlp.apply, a, [a, b], [x], layers=["Dense_7"])
    with pytest.raises(ValueError, match=r"one entry per endpoint, shape \(2,\)"):
        repair(mlp.apply, a, [a, b], [x], weights=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="endpoints must be a non-empty list"):
        repair(mlp.apply, a, [], [x])
    nobias = MLP(bias=False)
    v = random_variables(nobias, x, 0)
    with pytest.raises(ValueError, match="'Dense_0' has no bias"):
        repair(nobias.apply, v, [v, v], [x])
