"""Evidence on real data: digit classifiers trained from different initialisations.

Setting (Git Re-Basin, OTFusion): pairs of networks of one architecture trained on the
same data (sklearn digits, 10 classes) from different random initialisations and batch
orders; the pair of seed ``s`` is trained with seeds ``2s`` and ``2s+1``
(:mod:`fusionjax.demo._alignment`). Every claim is checked on each of SEEDS; the margins
sit below the smallest value measured over seeds 0, 1, 2 (given in each test).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import alignment
from fusionjax import zoo
from fusionjax.demo import _alignment
from fusionjax.testbed import classifiers
from tests._testing import SEEDS
from tests.alignment.hand_specs_test import numpy_permutations
from tests.alignment.hand_specs_test import permute

MATCHERS = ("weight matching", "activation matching")


@pytest.mark.parametrize("seed", SEEDS)
def test_naive_interpolation_has_a_clear_barrier(barriers, seed):
    # Measured loss barriers: width 16: 1.64/1.37/1.40, 64: 0.86/1.03/0.77, 256: 0.56/0.49/0.43.
    for r in barriers[seed]:
        assert r.curves["naive"].loss_barrier > 0.3, r.width
        assert min(r.endpoint_accuracy) > 0.9, r.width


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", MATCHERS)
def test_matching_shrinks_the_barrier(barriers, seed, method):
    # Matched / naive loss barrier, measured: width 16: WM 0.23/0.23/0.26, AM 0.22/0.36/0.26;
    # widths 64 and 256: WM <= 0.17, AM <= 0.10.
    for r in barriers[seed]:
        ratio = r.curves[method].loss_barrier / r.curves["naive"].loss_barrier
        assert ratio < (0.6 if r.width < 64 else 0.25), (r.width, ratio)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", MATCHERS)
def test_matched_barrier_shrinks_with_width(barriers, seed, method):
    # The paper's width effect. Measured WM: 0.38/0.31/0.36 (w=16) > 0.087/0.073/0.133 (64)
    # > 0.022/0.026/0.018 (256); AM: 0.37/0.50/0.36 > 0.064/0.071/0.078 > 0.033/0.028/0.020.
    results = sorted(barriers[seed], key=lambda r: r.width)
    values = [r.curves[method].loss_barrier for r in results]
    assert all(a > b for a, b in zip(values, values[1:], strict=False)), values
    assert values[-1] < 0.05


@pytest.mark.parametrize("seed", SEEDS)
def test_wide_matched_midpoint_is_as_good_as_the_endpoints(barriers, seed):
    # Width 256: midpoint accuracy below the endpoints' mean by 0.2-1.1 points after
    # matching (naive: 17.6/9.1/2.4 points).
    wide = max(barriers[seed], key=lambda r: r.width)
    mean = np.mean(wide.endpoint_accuracy)
    for method in MATCHERS:
        assert wide.curves[method].midpoint_accuracy > mean - 0.025, method
        assert wide.curves[method].accuracy_barrier < wide.curves["naive"].accuracy_barrier


@pytest.mark.parametrize("seed", SEEDS)
def test_ot_fusion_beats_vanilla_averaging(fusions, seed):
    # Equal widths (64 + 64; models 98.0/98.0/98.0 and 97.4/97.6/97.4): vanilla
    # 74.8/61.8/83.3, OT exact 94.2/95.5/93.3, Sinkhorn 94.6/95.7/93.5. Different widths
    # (64 + 128, vanilla keeps the first 64 units of the wider model): vanilla
    # 57.1/80.5/53.1, OT Sinkhorn 95.5/95.9/95.2. Smallest OT gain: +10.0 (seed 2, exact).
    equal, different = fusions[seed]
    assert different.widths[0] != different.widths[1]
    for result in (equal, different):
        acc = result.accuracy
        for row in acc:
            if row.startswith("OT fusion"):
                assert acc[row] > acc["vanilla average"] + 8, (result.widths, row)
                assert acc[row] > acc["model A"] - 6, (result.widths, row)


def test_derived_spec_aligns_as_well_as_the_hand_spec(spec_results):
    # ResNet (BatchNorm, statistics re-estimated at every point) and a transformer: the
    # derived spec has the hand spec's groups, so weight matching reaches the same
    # objective and the same curve.
    for r in spec_results[0]:
        assert r.same_groups, r.architecture
        assert r.objective["derived spec"] == pytest.approx(r.objective["hand spec"], rel=1e-6)
        hand, derived = r.curves["hand spec"], r.curves["derived spec"]
        np.testing.assert_allclose(derived.loss, hand.loss, rtol=1e-5, err_msg=r.architecture)


def test_planted_permutation_of_a_trained_model_is_recovered():
    # A trained MLP, its hidden units permuted at random, plus noise at 1% of each
    # weight's scale. Weight matching returns exactly the inverse permutation; activation
    # matching does on every unit that is alive on the data (6 + 7 of the 128 units are
    # dead ReLUs, zero on every input: interchangeable, and matched among themselves;
    # 6 + 12 with the 200-step model this test trained before reusing the barrier pair).
    model = zoo.MLP((64, 64))
    # The barrier study's first width-64 model (trained once per session, cached).
    ref = _alignment._pairs(model, SEEDS)[0][0]
    spec = alignment.mlp_spec(2)
    # Set up in NumPy: eager JAX ops would compile one small program per leaf shape.
    perms = numpy_permutations(spec, ref)
    r = np.random.default_rng(2)
    noisy = jax.tree.map(
        lambda w: jnp.asarray(w + 0.01 * np.std(w) * r.standard_normal(w.shape, np.float32)),
        ref,
    )
    other = permute(spec, perms, noisy)
    x = classifiers.digits().x_train[:512]
    acts = alignment.group_activations(model.apply, ref, x, spec=spec)
    wm = alignment.weight_matching(spec, ref, other)
    am = alignment.activation_matching(
        spec, (acts, alignment.group_activations(model.apply, other, x, spec=spec))
    )
    for g, p in perms.items():
        truth = np.argsort(np.asarray(p))
        np.testing.assert_array_equal(wm.permutations[g], truth)
        alive = np.asarray(acts[g]).std(0) > 0
        assert 0 < (~alive).sum() < 0.25 * alive.size
        found = np.asarray(am.permutations[g])
        np.testing.assert_array_equal(found[alive], truth[alive])
        assert set(found[~alive]) == set(truth[~alive])
