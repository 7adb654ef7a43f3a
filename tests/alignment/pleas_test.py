"""Unit tests of PLeaS: partial matching and the per-layer least-squares merge."""

import jax
import numpy as np
import pytest

from fusionjax import alignment
from tests._testing import dense_forward
from tests._testing import random_dense_chain


def _mlp(seed, widths=(6, 6)):
    return random_dense_chain(seed, widths)


def _permuted(layers, perms):
    """``layers`` with hidden layer ``i``'s units reordered by ``perms[i]``."""
    out = [dict(layer) for layer in layers]
    for i, p in enumerate(perms):
        out[i]["kernel"] = out[i]["kernel"][:, p]
        out[i]["bias"] = out[i]["bias"][p]
        out[i + 1]["kernel"] = out[i + 1]["kernel"][p, :]
    return out


X = np.abs(np.random.default_rng(7).normal(size=(256, 4))).astype(np.float32)


def test_partial_matching_merges_the_most_correlated_pairs():
    r = np.random.default_rng(0)
    z = r.normal(size=(200, 5))
    noisy = z + np.array([0.01, 3.0, 0.01, 3.0, 0.01]) * r.normal(size=(200, 5))
    perm = np.array([3, 0, 4, 1, 2])
    m = alignment.partial_matching(z, noisy[:, perm], width=7)  # k = 3 pairs merged
    assert m.merged == 3 and m.width == 7
    # The clean units 0, 2, 4 are the most correlated: merged with their copies.
    assert sorted(m.ref_index[:3].tolist()) == [0, 2, 4]
    for a, b in zip(m.ref_index[:3], m.other_index[:3], strict=True):
        assert perm[b] == a
    # Each model's units appear exactly once.
    assert sorted(i for i in m.ref_index if i >= 0) == list(range(5))
    assert sorted(i for i in m.other_index if i >= 0) == list(range(5))
    assert np.all(np.diff(m.correlation[:3]) <= 0)


def test_partial_matching_rejects_bad_widths():
    z = np.ones((8, 4))
    with pytest.raises(ValueError, match="width"):
        alignment.partial_matching(z, z, width=9)
    with pytest.raises(ValueError, match="width"):
        alignment.partial_matching(z, z, width=3)
    with pytest.raises(ValueError, match="acts_ref"):
        alignment.partial_matching(z, z[:, :3], width=4)


def test_merging_a_model_with_a_permuted_copy_gives_the_model_back():
    a = _mlp(0)
    b = _permuted(a, [np.random.default_rng(1).permutation(6), np.random.default_rng(2).permutation(6)])
    for ls in (True, False):
        out = alignment.pleas(a, b, X, least_squares=ls, ridge=1e-8)
        assert out.widths == (6, 6)
        np.testing.assert_allclose(dense_forward(out.layers, X), dense_forward(a, X), rtol=1e-3, atol=1e-3)


def test_width_two_reproduces_the_ensemble_of_logits():
    a, b = _mlp(0), _mlp(1)
    out = alignment.pleas(a, b, X, width_ratio=2.0, ridge=1e-8)
    assert out.widths == (12, 12)
    expected = (dense_forward(a, X) + dense_forward(b, X)) / 2
    np.testing.assert_allclose(dense_forward(out.layers, X), expected, rtol=1e-3, atol=1e-3)
    assert float(np.max(out.residual)) < 1e-3


def test_least_squares_fits_better_than_the_partial_average():
    a, b = _mlp(0), _mlp(1)
    for ratio in (1.0, 1.5):
        solved = alignment.pleas(a, b, X, width_ratio=ratio)
        plain = alignment.pleas(a, b, X, width_ratio=ratio, least_squares=False)
        assert solved.widths == plain.widths
        # The first layer's partial average is exact (a shared input); deeper layers are
        # fitted to the merged features, which the plain average cannot do.
        assert float(plain.residual[0]) < 1e-5
        assert float(solved.residual[-1]) < float(plain.residual[-1])
        target = (dense_forward(a, X) + dense_forward(b, X)) / 2
        err = [np.mean((dense_forward(o.layers, X) - target) ** 2) for o in (solved, plain)]
        assert err[0] < err[1]


def test_width_ratio_per_layer_and_apply():
    a, b = _mlp(0), _mlp(1)
    out = alignment.pleas(a, b, X, width_ratio=[1.0, 1.5])
    assert out.widths == (6, 9)
    assert [m.merged for m in out.matchings] == [6, 3]
    np.testing.assert_allclose(np.asarray(out.apply(X)), dense_forward(out.layers, X), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(jax.jit(alignment.dense_apply)(out.layers, X)), dense_forward(out.layers, X),
        rtol=1e-4, atol=1e-4,
    )


def test_bad_inputs_raise_before_work():
    a, b = _mlp(0), _mlp(1)
    with pytest.raises(ValueError, match="width_ratio"):
        alignment.pleas(a, b, X, width_ratio=2.5)
    with pytest.raises(ValueError, match="width_ratio"):
        alignment.pleas(a, b, X, width_ratio=[1.0])
    with pytest.raises(ValueError, match="ridge"):
        alignment.pleas(a, b, X, ridge=-1.0)
    with pytest.raises(ValueError, match="x must be"):
        alignment.pleas(a, b, X[:, :3])
    with pytest.raises(ValueError, match="other"):
        alignment.pleas(a, _mlp(1, widths=(6, 5)), X)
    with pytest.raises(ValueError, match="layers"):
        alignment.pleas(a, b[:2], X)
    with pytest.raises(TypeError, match="ref"):
        alignment.pleas({"kernel": 1}, b, X)
    with pytest.raises(TypeError, match="floating"):
        alignment.pleas(a, b, X.astype(np.int32))
