"""One policy for leaves that are not parameters: running stats, keys, ints, scalars."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from tests import _testing as T

K = jax.random.key


def linen_like(key, var_scale=1.0):
    k1, k2 = jax.random.split(key)
    return {
        "params": {"Dense_0": {"kernel": jax.random.normal(k1, (4, 3))}},
        "batch_stats": {"BatchNorm_0": {"mean": jax.random.normal(k2, (3,)),
                                        "var": var_scale * jnp.ones(3)}},
    }


def test_running_stats_are_averaged_not_extrapolated():
    base = linen_like(K(0), var_scale=4.0)
    fts = [linen_like(K(1), var_scale=1.0), linen_like(K(2), var_scale=2.0)]
    for m in (fj.merging.task_arithmetic(scaling=1.0), fj.merging.dare(drop_rate=0.9)):
        out = fj.merge(base, fts, m, key=K(0))
        np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["var"], 1.5)
        np.testing.assert_allclose(
            out["batch_stats"]["BatchNorm_0"]["mean"],
            (fts[0]["batch_stats"]["BatchNorm_0"]["mean"] + fts[1]["batch_stats"]["BatchNorm_0"]["mean"]) / 2,
            rtol=1e-6,
        )
    kept = fj.merge(base, fts, fj.merging.mean(), running_stats="base")
    np.testing.assert_array_equal(kept["batch_stats"]["BatchNorm_0"]["var"], 4.0)
    with pytest.raises(ValueError, match="running_stats must be"):
        fj.merge(base, fts, fj.merging.mean(), running_stats="merge")


def test_nnx_state_with_rngs_and_batch_stats():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(3, 4, rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.bn(self.lin(x)))

    models = [Net(nnx.Rngs(i, dropout=7)) for i in range(3)]
    graphdef, base = nnx.split(models[0])
    fts = [nnx.split(m)[1] for m in models[1:]]
    # training-like running variances, so averaging is visible
    fts[0]["bn"]["var"][...] = jnp.full(4, 0.5)
    fts[1]["bn"]["var"][...] = jnp.full(4, 1.5)
    out = fj.merge(base, fts, fj.merging.task_arithmetic(scaling=2.0))
    np.testing.assert_allclose(out["bn"]["var"][...], 1.0)
    model = nnx.merge(graphdef, out)
    assert model(jnp.ones((2, 3))).shape == (2, 4)
    other = nnx.split(Net(nnx.Rngs(3, dropout=8)))[1]
    with pytest.raises(ValueError, match=r"finetuned\[1\] differs from base at \['drop'\]\['rngs'\]\['key'\].*PRNG key"):
        fj.merge(base, [fts[0], other], fj.merging.mean())


def test_outputs_never_alias_inputs():
    base = {"w": np.ones(3, np.float32), "step": np.array([1, 2], np.int32)}
    fts = [{"w": np.full(3, 2.0, np.float32), "step": np.array([1, 2], np.int32)}]
    out = fj.merge(base, fts, fj.merging.mean())
    assert out["step"] is not base["step"]
    out["step"][0] = 99
    assert base["step"][0] == 1


def test_complex_and_scalar_leaves():
    base = {"w": jnp.zeros(2), "z": jnp.zeros(2, jnp.complex64)}
    with pytest.raises(ValueError, match=r"complex leaf at \['z'\].*not supported"):
        fj.merge(base, [base], fj.merging.mean())
    base = {"w": jnp.zeros(2), "lr": 0.1, "c": np.float32(3.0)}
    ft = {"w": jnp.ones(2), "lr": 0.2, "c": np.float32(5.0)}
    with pytest.raises(ValueError, match=r"at \['lr'\]: this float leaf is not an array.*got 0.2, base has 0.1"):
        fj.merge(base, [ft], fj.merging.mean())
    ft["lr"] = 0.1
    out = fj.merge(base, [ft], fj.merging.mean())
    assert out["lr"] == 0.1 and float(out["c"]) == 5.0  # a 0-d NumPy float is a parameter


def test_integer_leaves_of_nnx_rng_count_must_match():
    base = T.random_model(K(0))
    ft = dict(T.finetune_like(base, K(1), 1)[0])
    ft["step"] = jnp.array(8, jnp.int32)
    with pytest.raises(ValueError, match=r"finetuned\[0\] differs from base at \['step'\]: .*not a floating-point array"):
        fj.merge(base, [ft], fj.merging.mean())
