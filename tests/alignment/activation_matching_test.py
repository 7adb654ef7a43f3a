"""Tests for activation matching and its streaming correlation statistics."""

import jax
import numpy as np
import pytest

from fusionjax.alignment import PermutationSpec
from fusionjax.alignment._activation_matching import ActivationStats
from fusionjax.alignment._activation_matching import activation_matching
from fusionjax.alignment._activation_matching import activation_stats_init
from fusionjax.alignment._activation_matching import activation_stats_update

SPEC = PermutationSpec(
    {
        "P0": [("Dense_0/kernel", 1), ("Dense_0/bias", 0), ("Dense_1/kernel", 0)],
        "P1": [("Dense_1/kernel", 1), ("Dense_1/bias", 0), ("Dense_2/kernel", 0)],
    }
)
DIMS = (10, 24, 16, 3)


def mlp(seed):
    r = np.random.default_rng(seed)
    return {
        f"Dense_{i}": {
            "kernel": r.standard_normal((a, b)).astype(np.float32) / np.sqrt(a),
            "bias": 0.1 * r.standard_normal((b,)).astype(np.float32),
        }
        for i, (a, b) in enumerate(zip(DIMS[:-1], DIMS[1:], strict=True))
    }


def hidden(params, x):
    """{group: post-ReLU activations} of the hidden layers, by hand (NumPy)."""
    acts = {}
    for i in range(len(DIMS) - 2):
        x = np.maximum(x @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"], 0)
        acts[f"P{i}"] = x
    return acts


def permute(params, perms):
    out = {k: dict(v) for k, v in params.items()}
    for i in range(len(DIMS) - 2):
        p = perms[f"P{i}"]
        out[f"Dense_{i}"]["kernel"] = out[f"Dense_{i}"]["kernel"][:, p]
        out[f"Dense_{i}"]["bias"] = out[f"Dense_{i}"]["bias"][p]
        out[f"Dense_{i + 1}"]["kernel"] = out[f"Dense_{i + 1}"]["kernel"][p]
    return out


def planted(seed=0, noise=1e-2):
    r = np.random.default_rng(seed + 100)
    ref = mlp(seed)
    perms = {"P0": r.permutation(24), "P1": r.permutation(16)}
    other = jax.tree.map(
        lambda x: x + noise * r.standard_normal(x.shape).astype(np.float32), permute(ref, perms)
    )
    return ref, other, perms


@pytest.mark.parametrize("solver", ["scipy", "hungarian"])
def test_planted_permutation_recovered_from_activations(solver):
    ref, other, perms = planted()
    x = np.random.default_rng(1).standard_normal((512, DIMS[0])).astype(np.float32)
    out = activation_matching(SPEC, (hidden(ref, x), hidden(other, x)), solver=solver)
    for g, p in perms.items():
        np.testing.assert_array_equal(np.asarray(out.permutations[g]), np.argsort(p), err_msg=g)
    aligned = out.apply(jax.tree.map(jax.device_put, other))
    for k in ref:
        np.testing.assert_allclose(aligned[k]["kernel"], ref[k]["kernel"], atol=0.1)
    assert bool(out.converged)
    assert float(out.objective) <= 24 + 16 + 1e-4
    assert float(out.objective) > 0.9 * (24 + 16)


def test_streaming_stats_equal_one_shot():
    r = np.random.default_rng(0)
    # Large mean offsets: the pairwise update must not cancel catastrophically.
    a = {"h": (100 + r.standard_normal((300, 7))).astype(np.float32)}
    b = {"h": (-50 + r.standard_normal((300, 7)) + 0.5 * a["h"]).astype(np.float32)}
    update = jax.jit(activation_stats_update)
    one = update(activation_stats_init({"h": 7}), a, b)
    many = activation_stats_init({"h": 7})
    # A single row first, then equal batches (two shapes to compile, not four).
    for lo, hi in [(0, 1), (1, 100), (100, 199), (199, 298), (298, 299), (299, 300)]:
        many = update(many, {"h": a["h"][lo:hi]}, {"h": b["h"][lo:hi]})
    for f in ActivationStats._fields:
        np.testing.assert_allclose(
            getattr(many, f)["h"], getattr(one, f)["h"], rtol=2e-5, atol=1e-3, err_msg=f
        )
    expected = np.corrcoef(a["h"].astype(np.float64), b["h"].astype(np.float64), rowvar=False)[
        :7, 7:
    ]
    np.testing.assert_allclose(many.correlation()["h"], expected, atol=1e-5)
    np.testing.assert_allclose(one.correlation()["h"], expected, atol=1e-5)


def test_stats_accept_conv_like_activations_and_dead_units():
    r = np.random.default_rng(0)
    a = r.standard_normal((4, 5, 5, 6)).astype(np.float32)
    a[..., 2] = 0.0  # a dead unit
    stats = activation_stats_update(activation_stats_init({"c": 6}), {"c": a}, {"c": a})
    corr = np.asarray(stats.correlation()["c"])
    assert np.isfinite(corr).all()
    np.testing.assert_allclose(np.diag(corr)[[0, 1, 3, 4, 5]], 1.0, rtol=1e-5)
    assert (corr[2] == 0).all() and (corr[:, 2] == 0).all()
    spec = PermutationSpec({"c": [("conv/kernel", -1)]})
    out = activation_matching(spec, stats)
    np.testing.assert_array_equal(
        np.asarray(out.permutations["c"])[[0, 1, 3, 4, 5]], [0, 1, 3, 4, 5]
    )


def test_activation_matching_under_jit():
    ref, other, perms = planted(seed=3)
    x = np.random.default_rng(2).standard_normal((256, DIMS[0])).astype(np.float32)
    acts = (hidden(ref, x), hidden(other, x))
    eager = activation_matching(SPEC, acts, solver="scipy")
    jitted = jax.jit(lambda a, b: activation_matching(SPEC, (a, b)).permutations)(*acts)
    for g in perms:
        np.testing.assert_array_equal(np.asarray(jitted[g]), np.asarray(eager.permutations[g]))


def test_errors():
    x = {"P0": np.zeros((5, 24), np.float32), "P1": np.zeros((5, 16), np.float32)}
    with pytest.raises(ValueError, match="no activations for group 'P1'"):
        activation_matching(SPEC, ({"P0": x["P0"]}, {"P0": x["P0"]}))
    with pytest.raises(ValueError, match="differ in shape"):
        activation_matching(SPEC, (x, {"P0": x["P0"][:3], "P1": x["P1"]}))
    with pytest.raises(ValueError, match=r"must be \[..., 7\]"):
        activation_stats_update(
            activation_stats_init({"h": 7}), {"h": np.zeros((3, 6))}, {"h": np.zeros((3, 6))}
        )
    with pytest.raises(TypeError, match="ActivationStats or a pair"):
        activation_matching(SPEC, x)
