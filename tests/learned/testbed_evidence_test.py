"""AdaMerging, AdaMerging++ and aTLAS on the digits testbed, over three seeds.

The rows come from the demo suite (``suite`` fixture, shared with the data-free methods'
evidence). Measured on 2026-11-23, mean test accuracy over the 8 tasks in %:

==============================  =====  =====  =====
method                          s0     s1     s2
==============================  =====  =====  =====
task arithmetic, λ=0.3          75.3   77.4   69.5
task arithmetic, λ on val       76.6   77.6   72.4
AdaMerging, task-wise           76.3   76.5   74.3
AdaMerging, layer-wise          77.7   81.5   75.0
AdaMerging++, layer-wise        79.4   80.8   71.6
aTLAS, 4 labeled/class          84.3   88.2   81.1
individual fine-tuned           96.7   96.9   96.2
==============================  =====  =====  =====

Layer-wise AdaMerging beats task arithmetic at the paper's λ=0.3 by +2.4/+4.1/+5.5 points
(the paper: 80.1 vs 69.1 on ViT-B/32, a larger gap) and the validation-tuned λ by
+1.1/+3.9/+2.6. AdaMerging++ beats task arithmetic too (+4.1/+3.4/+2.1) but *not*
layer-wise AdaMerging on two of three seeds (the paper's AdaMerging++ ≥ AdaMerging does
not reproduce here). The mechanism visible in the per-task rows: entropy minimisation
drives the coefficients of the binary tasks (parity, at_least_5; entropy at most log 2)
towards 0 in most layers, because the summed entropy is dominated by the 10-class tasks,
and those tasks fall below their task-arithmetic accuracy. Dividing each task's entropy by
log C does not change this (tried: 76.3/81.7/74.7). Margins below are under the smallest
measured gain.
"""

import numpy as np
import pytest

import fusionjax as fj
from fusionjax import testbed
from tests._testing import SEEDS

LAYER = "AdaMerging (layer-wise)"
TASK = "AdaMerging (task-wise)"
PLUS = "AdaMerging++ (layer-wise)"
_TA = fj.merging.task_arithmetic(scaling=0.3)


@pytest.fixture(scope="module")
def ta_paper():
    """Task arithmetic at λ = 0.3 (AdaMerging's baseline), mean accuracy per seed."""
    out = {}
    for s in SEEDS:
        tb = testbed.load(seed=s)
        out[s] = float(np.mean(tb.evaluate(fj.merge(tb.pretrained, list(tb.finetuned), _TA))))
    return out


def _gains(suite, method, baseline):
    return [100 * (suite[s][method].average - baseline(s)) for s in SEEDS]


@pytest.mark.slow
def test_layer_wise_adamerging_beats_task_arithmetic(suite, ta_paper):
    gains = _gains(suite, LAYER, ta_paper.__getitem__)
    assert min(gains) > 1.5, (
        f"layer-wise AdaMerging vs TA(λ=0.3): {gains} (measured +2.4/+4.1/+5.5)"
    )
    tuned = _gains(suite, LAYER, lambda s: suite[s]["task arithmetic"].average)
    assert min(tuned) > 0.0, (
        f"layer-wise AdaMerging vs TA(val λ): {tuned} (measured +1.1/+3.9/+2.6)"
    )


@pytest.mark.slow
def test_layer_wise_beats_task_wise(suite):
    gains = _gains(suite, LAYER, lambda s: suite[s][TASK].average)
    assert min(gains) > 0.0, f"layer-wise vs task-wise: {gains} (measured +1.4/+5.0/+0.7)"


@pytest.mark.slow
def test_adamerging_plus_plus_beats_task_arithmetic(suite, ta_paper):
    gains = _gains(suite, PLUS, ta_paper.__getitem__)
    assert min(gains) > 1.0, f"AdaMerging++ vs TA(λ=0.3): {gains} (measured +4.1/+3.4/+2.1)"


@pytest.mark.slow
def test_learned_coefficients_differ_across_layers(suite):
    for s in SEEDS:
        names, table = fj.learned.coefficient_table(suite[s][LAYER].details)
        assert len(names) == 6 and table.shape == (6, 8)
        # Per task, the range of its coefficient over the six tensors.
        spread = table.max(axis=0) - table.min(axis=0)
        assert np.median(spread) > 0.3, f"seed {s}: per-task spreads {np.round(spread, 2)}"
        assert table.min() >= 0.0 and table.max() <= 1.0


@pytest.mark.slow
def test_entropy_goes_down(suite):
    for s in SEEDS:
        note = suite[s][LAYER].note  # "entropy a->b, ..."
        first, last = (float(v) for v in note.split(",")[0].removeprefix("entropy ").split("->"))
        assert last < 0.7 * first, note


@pytest.mark.slow
def test_atlas_few_shot_beats_every_data_free_merge(suite):
    for s in SEEDS:
        rows = suite[s]
        best_free = max(
            rows[n].average for n in ("task arithmetic", "TIES (density 0.2)", "RegMean")
        )
        print(
            f"seed {s}: aTLAS {100 * rows['aTLAS'].average:.1f}, best data-free {100 * best_free:.1f}"
        )
        assert rows["aTLAS"].average > rows[LAYER].average


@pytest.mark.slow
def test_wemoe_comes_close_to_the_individual_models_where_inputs_tell_tasks_apart(suite):
    """WEMoE's premise: its routers see inputs, so tasks must differ in their inputs.

    On the four tasks with their own input domains (rot90, mirror, invert, shift) WEMoE
    merging those four models measured 95.8/94.9/94.0% against the individual models'
    97.2/97.2/96.4% and task arithmetic's (λ=0.3) 84.7/73.5/73.9% (the paper: 89.2 vs 90.3
    on ViT-B/32 x 8 datasets). On all eight tasks it fails: tasks 4-7 share their inputs,
    the router cannot separate them and entropy minimisation drives some weights negative
    (`tests/learned/wemoe_test.py`).
    """
    for s in SEEDS:
        row, individual = suite[s]["WEMoE (distinct inputs)"], suite[s]["individual (upper bound)"]
        tasks = row.tasks
        assert len(tasks) == 4
        gap = 100 * (individual.average_over(tasks) - row.average)
        assert gap < 4.0, (
            f"seed {s}: WEMoE {100 * row.average:.1f}, {gap:.1f} points below individual"
        )
        tb = testbed.load(seed=s)
        ta = fj.merge(tb.pretrained, [tb.finetuned[t] for t in tasks], _TA)
        ta_acc = float(np.mean(tb.evaluate(ta)[tasks]))
        assert row.average > ta_acc + 0.05, f"seed {s}: WEMoE {row.average:.3f} vs TA {ta_acc:.3f}"
