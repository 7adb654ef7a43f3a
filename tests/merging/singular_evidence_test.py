"""TSV-M, Iso-C, Iso-CTS and MagMax on the digits testbed, over three seeds.

The rows of the demo suite (8 tasks, 64-512-512-128 MLP encoder, fixed heads; see
:mod:`fusionjax.testbed`). TSV-M runs with :math:`\\alpha = 1` as in its paper and
FusionBench (rank :math:`1/T` of each matrix per task); Iso-C, Iso-CTS (common fraction
0.8, FusionBench's default) and MagMax pick their scaling on validation data, as their
papers do (the suite's grid, :math:`0.1..1.5`). Measured 2026-11-22, mean test accuracy
in %:

=========================  =====  =====  =====  ==========================
method                     s0     s1     s2     chosen scaling (s0/s1/s2)
=========================  =====  =====  =====  ==========================
task arithmetic (val λ)    76.6   77.6   72.4   0.2 / 0.4 / 0.4
TIES (density 0.2)         84.5   82.4   75.1   1.0 / 1.2 / 1.5
RegMean (α=0.9)            83.6   85.4   78.0
TSV-M (α=1)                90.2   91.7   80.7   1 (fixed)
Iso-C                      88.2   88.4   82.0   1.5 / 1.5 / 1.5
Iso-CTS                    87.0   86.9   80.8   1.5 / 1.5 / 1.5
MagMax                     83.4   82.4   74.9   0.8 / 0.8 / 1.0
=========================  =====  =====  =====  ==========================

(TSV-M with α picked on validation too: 89.6/91.8/81.8, α = 1.2 on every seed; not a
row.) Over task arithmetic TSV-M gains +13.6/+14.1/+8.3 points, Iso-C +11.6/+10.8/+9.6,
Iso-CTS +10.4/+9.3/+8.4 and MagMax +6.8/+4.8/+2.5 — the papers' claim (TSV-M and Iso-C
above task arithmetic) holds with room. TSV-M and Iso-C are also above TIES on every seed
(+5.7/+9.3/+5.6 and +3.7/+6.0/+6.9), as both papers report.

What does not reproduce: Iso-CTS is *below* Iso-C here (-1.2/-1.5/-1.2), while the paper
finds it equal or better, increasingly so with more tasks. The first layer's kernel has
rank :math:`p = 64`, so with 8 tasks each task keeps only :math:`d = 2` directions of its
own (:math:`k_c = 48`; the 512-wide layer: 13 of 512 per task, :math:`k_c = 408`). A
plausible reason (not isolated here): on this small encoder the common subspace already
spans most of each task's update, so the few task-specific directions, orthogonalised
against it, add little, while they take rank from the common subspace whose flat
spectrum (Iso-C) is what helps. Not asserted.
The scaling of Iso-C/Iso-CTS was picked at the top of the grid (1.5) on every seed: a
larger grid might raise them further; the assertions below hold without it.

Margins asserted are below half the smallest gain measured, on every seed.
"""

import pytest

from tests._testing import SEEDS

TA = "task arithmetic"
TIES = "TIES (density 0.2)"

# minimum gain over task arithmetic, in points, on every seed
BEATS_TASK_ARITHMETIC = {"TSV-M": 4.0, "Iso-C": 4.0, "Iso-CTS": 4.0, "MagMax": 1.0}
# minimum gain over TIES, in points, on every seed
BEATS_TIES = {"TSV-M": 2.5, "Iso-C": 1.5}


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(BEATS_TASK_ARITHMETIC))
def test_beats_task_arithmetic(suite, seed, name):
    rows = suite[seed]
    gain = 100 * (rows[name].average - rows[TA].average)
    assert gain > BEATS_TASK_ARITHMETIC[name], f"seed {seed}: {name} {gain:+.2f} points over TA"


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(BEATS_TIES))
def test_beats_ties(suite, seed, name):
    rows = suite[seed]
    gain = 100 * (rows[name].average - rows[TIES].average)
    assert gain > BEATS_TIES[name], f"seed {seed}: {name} {gain:+.2f} points over TIES"


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_singular_merges_stay_below_the_individual_models(suite, seed):
    rows = suite[seed]
    top = rows["individual (upper bound)"].average
    for name in BEATS_TASK_ARITHMETIC:
        assert rows[name].average < top, f"seed {seed}: {name} above the individual models"
