"""Unit tests of CLAFusion (cross-layer alignment, identity padding or layer merging) and OT
fusion of K models."""

import numpy as np
import pytest

from fusionjax import alignment
from tests._testing import assert_trees_close
from tests._testing import dense_forward
from tests._testing import random_dense_chain


def _mlp(seed, widths, d_in=4, d_out=3):
    return random_dense_chain(seed, widths, d_in, d_out)


X = np.abs(np.random.default_rng(7).normal(size=(128, 4))).astype(np.float32)


def _brute_force(cost, fix_first):
    import itertools

    m, n = cost.shape
    best, arg = np.inf, None
    for combo in itertools.combinations(range(m), n):
        if fix_first and combo[0] != 0:
            continue
        total = sum(cost[i, j] for j, i in enumerate(combo) if not (fix_first and j == 0))
        if total < best - 1e-12:
            best, arg = total, combo
    return np.array(arg), best


@pytest.mark.parametrize("fix_first", [True, False])
def test_align_layers_matches_brute_force(fix_first):
    r = np.random.default_rng(0)
    for m, n in [(3, 2), (5, 3), (6, 6), (7, 1), (6, 4)]:
        cost = r.uniform(size=(m, n))
        got = alignment.align_layers(cost, fix_first=fix_first)
        want, best = _brute_force(cost, fix_first)
        assert np.all(np.diff(got) > 0) and 0 <= got[0] and got[-1] < m
        skip = 1 if fix_first else 0
        total = sum(cost[i, j] for j, i in enumerate(got) if j >= skip)
        assert total == pytest.approx(best), (m, n, got, want)
        if fix_first:
            assert got[0] == 0


def test_align_layers_rejects_bad_costs():
    with pytest.raises(ValueError, match="cost"):
        alignment.align_layers(np.ones((2, 3)))
    with pytest.raises(ValueError, match="cost"):
        alignment.align_layers(np.array([[np.nan]]))


def test_linear_cka_invariances():
    r = np.random.default_rng(0)
    x = r.normal(size=(100, 5))
    q, _ = np.linalg.qr(r.normal(size=(5, 5)))
    assert alignment.linear_cka(x, 2.0 * x @ q) == pytest.approx(1.0)
    assert alignment.linear_cka(x, r.normal(size=(100, 7))) < 0.3
    assert alignment.linear_cka(x, np.ones((100, 2))) == 0.0


def test_identity_padding_preserves_a_relu_network():
    shallow = _mlp(0, (5, 6))
    padded = alignment.pad_with_identities(shallow, np.array([0, 2]), 4)
    widths = [layer["kernel"].shape[1] for layer in padded]
    assert widths == [5, 5, 6, 6, 3]
    np.testing.assert_allclose(dense_forward(padded, X), dense_forward(shallow, X), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mapping"):
        alignment.pad_with_identities(shallow, np.array([2, 1]), 4)


def test_clafusion_of_a_network_with_its_padded_permuted_self_is_the_network():
    # A deep network whose layer 1 is an identity: the shallower one is the deep one
    # without it, units permuted. The alignment puts the layers back, OT undoes the
    # permutations, and the fused network is the deep one.
    r = np.random.default_rng(3)
    shallow = _mlp(0, (6, 6))
    deep = alignment.pad_with_identities(shallow, np.array([0, 2]), 3)
    p0, p1 = r.permutation(6), r.permutation(6)
    other = [dict(layer) for layer in shallow]
    other[0] = {"kernel": other[0]["kernel"][:, p0], "bias": other[0]["bias"][p0]}
    other[1] = {"kernel": other[1]["kernel"][p0][:, p1], "bias": other[1]["bias"][p1]}
    other[2] = {"kernel": other[2]["kernel"][p1], "bias": other[2]["bias"]}
    out = alignment.clafusion(deep, other, X)
    np.testing.assert_array_equal(out.mapping, [0, 2])
    assert out.cost.shape == (3, 2)
    assert len(out.fused) == 4
    np.testing.assert_allclose(dense_forward(out.fused, X), dense_forward(deep, X), rtol=1e-4, atol=1e-4)


def test_clafusion_checks_inputs():
    deep, shallow = _mlp(0, (6, 6, 6)), _mlp(1, (6, 6))
    with pytest.raises(ValueError, match="swap"):
        alignment.clafusion(shallow, deep, X)
    with pytest.raises(ValueError, match="outputs"):
        alignment.clafusion(deep, _mlp(1, (6, 6), d_out=2), X)
    with pytest.raises(ValueError, match="inputs"):
        alignment.clafusion(deep, _mlp(1, (6, 6), d_in=5), X)
    with pytest.raises(ValueError, match="weight"):
        alignment.clafusion(deep, shallow, X, weight=1.5)
    with pytest.raises(ValueError, match="balance"):
        alignment.clafusion(deep, shallow, X, balance="drop")
    with pytest.raises(ValueError, match="relu_approx"):
        alignment.clafusion(deep, shallow, X, balance="merge", relu_approx="max")
    with pytest.raises(ValueError, match="mapping"):
        alignment.merge_layers(deep, [2, 1], X)
    with pytest.raises(ValueError, match="mapping"):
        alignment.merge_layers(deep, [0, 3], X)


def _paper_merge(deep, mapping, x, method):
    """NumPy reference of CLAFusion's layer merging as its code does it: bias-free layers,
    torch [out, in] weights, A the 1-based deeper layer of each shallower hidden layer."""
    ws = [np.asarray(layer["kernel"], np.float64).T for layer in deep]  # [out, in]
    acts, h = [], np.asarray(x, np.float64)
    for w in ws[:-1]:
        acts.append(h @ w.T)  # pre-activations [M, out]
        h = np.maximum(acts[-1], 0)
    m, n = len(ws) - 1, len(mapping)
    a = np.asarray(mapping) + 1
    new, pre, l1 = [], np.eye(ws[0].shape[1]), 0
    for l0, w in enumerate(ws):
        if l1 < n and l0 + 1 < a[l1] or l1 >= n and l0 < m:
            z = acts[l0]
            gate = {"sum": z.sum(0) >= 0, "majority": (z > 0).mean(0) >= 0.5,
                    "avg": (z > 0).mean(0)}[method]  # fmt: skip
            pre = (w * np.tile(gate, (w.shape[1], 1)).T) @ pre
        else:
            pre = w @ pre
            new.append(pre.T)
            pre = np.eye(w.shape[0])
            l1 += 1
    return new


@pytest.mark.parametrize("method", ["sum", "majority", "avg"])
def test_merge_layers_matches_the_papers_merging(method):
    deep = [dict(layer, bias=np.zeros_like(layer["bias"])) for layer in _mlp(3, (6, 5, 7, 6))]
    x = np.random.default_rng(4).normal(size=(64, 4)).astype(np.float32)  # mixed signs
    for mapping in ([0, 2], [1, 3], [0, 1, 3], [2]):
        got = alignment.merge_layers(deep, mapping, x, relu_approx=method)
        want = _paper_merge(deep, mapping, x, method)
        assert len(got) == len(mapping) + 1
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g["kernel"]), w, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(np.asarray(g["bias"]), 0.0, atol=0)


def test_merge_layers_is_exact_where_the_merged_units_stay_positive():
    # Large positive biases on the merged layers keep their pre-activations positive on X:
    # the ReLU there is the identity, every gate is 1 and the merged chain is the network.
    deep = _mlp(5, (6, 6, 6, 6))
    for i in (1, 2):
        deep[i] = dict(kernel=np.abs(deep[i]["kernel"]), bias=np.full(6, 50.0, np.float32))
    for method in ("sum", "majority", "avg"):
        merged = alignment.merge_layers(deep, [0, 3], X, relu_approx=method)
        assert [layer["kernel"].shape for layer in merged] == [(4, 6), (6, 6), (6, 3)]
        np.testing.assert_allclose(dense_forward(merged, X), dense_forward(deep, X), rtol=1e-4)
    # The last mapped layer is not the last hidden one: what follows joins the output layer.
    merged = alignment.merge_layers(deep, [0, 1], X)
    np.testing.assert_allclose(dense_forward(merged, X), dense_forward(deep, X), rtol=1e-4)


def test_clafusion_merge_has_the_shallower_shape_and_its_weight_ends():
    deep, shallow = _mlp(0, (6, 7, 6)), _mlp(1, (5, 6))
    both = alignment.clafusion(deep, shallow, X, balance="merge", weight=1.0)
    assert both.padded is None and len(both.merged) == 3
    assert [layer["kernel"].shape for layer in both.fused] == [(4, 5), (5, 6), (6, 3)]
    assert_trees_close(both.fused, shallow, rtol=1e-6, atol=1e-6)  # w = 1: the shallower one
    # w = 0: the merged deeper network moved onto the shallower one's units (equal widths:
    # a permutation), so the same function.
    deep, shallow = _mlp(0, (6, 6, 6)), _mlp(1, (6, 6))
    only = alignment.clafusion(deep, shallow, X, balance="merge", weight=0.0)
    np.testing.assert_allclose(
        dense_forward(only.fused, X), dense_forward(only.merged, X), rtol=1e-4, atol=1e-4
    )
    added = alignment.clafusion(deep, shallow, X)
    assert added.merged is None and len(added.fused) == 4
    np.testing.assert_array_equal(only.mapping, added.mapping)


def _as_dict(layers):
    return {f"Dense_{i}": layer for i, layer in enumerate(layers)}


def test_ot_fusion_many_of_permuted_copies_is_the_reference():
    spec = alignment.mlp_spec(2, prefix=None)
    ref = _as_dict(_mlp(0, (6, 6)))
    models = [ref]
    for s in (1, 2):
        perms = {g: np.random.default_rng(s + 10 * i).permutation(6) for i, g in enumerate(spec.names)}
        models.append(alignment.apply_permutations(spec, perms, ref))
    out = alignment.ot_fusion_many(spec, models, reference=0)
    assert_trees_close(out.fused, ref, rtol=1e-5, atol=1e-5)
    assert out.transports[0] is None and len(out.aligned) == 3


def test_ot_fusion_many_of_two_is_ot_fusion_and_widths_may_differ():
    spec = alignment.mlp_spec(2, prefix=None)
    a, b, c = (_as_dict(_mlp(s, w)) for s, w in [(0, (4, 4)), (1, (8, 8)), (2, (4, 4))])
    pair = alignment.ot_fusion(spec, a, b, weight=0.25)
    many = alignment.ot_fusion_many(spec, [a, b], weights=[3.0, 1.0])
    assert_trees_close(many.fused, pair.fused, rtol=1e-5, atol=1e-5)
    out = alignment.ot_fusion_many(spec, [a, b, c], reference=-1)
    assert out.reference == 2
    assert out.fused["Dense_0"]["kernel"].shape == (4, 4)
    assert out.transports[1]["P_0"].shape == (8, 4)


def test_ot_fusion_many_checks_inputs():
    spec = alignment.mlp_spec(2, prefix=None)
    a = _as_dict(_mlp(0, (4, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        alignment.ot_fusion_many(spec, [a])
    with pytest.raises(ValueError, match="reference"):
        alignment.ot_fusion_many(spec, [a, a], reference=2)
    with pytest.raises(ValueError, match="weights"):
        alignment.ot_fusion_many(spec, [a, a], weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="weights"):
        alignment.ot_fusion_many(spec, [a, a], weights=[1.0])
    with pytest.raises(TypeError, match="models"):
        alignment.ot_fusion_many(spec, a)
