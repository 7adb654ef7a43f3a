r"""PCB-merging, WIDEN and EMR-merging on the digits testbed over three seeds: what holds.

Measured on the demo suite's rows (8 tasks, seeds 0, 1, 2; mean test accuracy in %),
with the comparison rows of :mod:`tests.merging.testbed_evidence_test`:

==============================  =====  =====  =====
method                          s0     s1     s2
==============================  =====  =====  =====
pretrained                      49.1   51.6   47.6
individual (upper bound)        96.7   96.9   96.2
uniform soup (average)          73.7   71.3   58.2
task arithmetic (val λ)         76.6   77.6   72.4
TIES (density 0.2, val λ)       84.5   82.8   75.1
RegMean (α=0.9)                 83.6   85.4   78.0
PCB (ratio 0.1, val λ)          81.4   79.5   71.8
PCB + per-task λ search (*)     81.3   80.0   74.3
WIDEN (κ = s = 1)               60.9   65.4   59.3
EMR (per-task masks) (**)       91.6   93.9   89.4
==============================  =====  =====  =====

(*) :func:`fusionjax.merging.pcb_scaling_search` with the suite's λ grid and 20
(1+1)-ES steps on the validation slice; measured in a scratch run, not a demo row.
(**) Each task scored with its own recovered model (unified vector, its mask and
rescaler): T models, not one.

What holds, and is asserted (margins below the smallest measured value):

* EMR is near the individual models: 5.1/3.0/6.8 points below them (asserted < 8), and
  above every single-model merge of the suite: +7.1/+11.1/+14.3 over TIES and
  +8.0/+8.5/+11.4 over RegMean (asserted > +5 over both). The paper's claim in kind
  (EMR close to the individual models, far above one merged model) reproduces.
* PCB beats plain averaging by +7.7/+8.2/+13.6 (asserted > +5) and task arithmetic on
  the mean over seeds, 77.6 vs 75.5 (asserted > +1); on seed 2 it is 0.6 below it.
* WIDEN beats the pretrained encoder by +11.8/+13.8/+11.7 (asserted > +8).

What does not reproduce:

* **PCB above TIES** (the paper's Table 1 claim): PCB is 3.1/3.3/3.3 points *below*
  TIES on every seed; searching per-task λ (the paper's evolutionary step) closes only
  part of it on seed 2 (74.3 vs 75.1). Not tuned further. Differences from the paper's
  setting that may explain it (hypotheses, not tested here): the balancing here is per
  leaf (the reference ranks the whole flattened model at once); PCB keeps 10% of the
  entries where TIES keeps 20% (but ratio 0.2 on seed 0 measured 82.4, 0.05 78.7, 0.3
  81.7: still below TIES' 84.5); the task vectors of a small MLP encoder are far from
  ViT-B/32's, and with :math:`T=8` the intra term :math:`\exp(T\,\mathcal N^2)` puts
  most of the weight on the few largest entries of each task.
* **WIDEN** is below task arithmetic and, on seeds 0 and 1, below plain averaging.
  Its weights are not normalised over the models (above-average columns get score 1 in
  every model), so with eight models it behaves like task arithmetic at a large
  :math:`\lambda`, with no scaling to tune; the paper targets merging a few LLMs
  (fine-tuned with continually pre-trained), not eight task vectors. It is reported,
  not asserted against the other merges.
"""

import numpy as np
import pytest

from tests._testing import SEEDS

PCB = "PCB (ratio 0.1)"
EMR = "EMR (per-task masks)"
WIDEN = "WIDEN"


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_emr_is_near_the_individual_models(suite, seed):
    rows = suite[seed]
    emr = rows[EMR].average
    assert rows["individual (upper bound)"].average - emr < 0.08, f"seed {seed}: {emr:.3f}"
    for other in ("TIES (density 0.2)", "RegMean"):
        assert emr > rows[other].average + 0.05, f"seed {seed}: EMR {emr:.3f} vs {other}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_pcb_beats_averaging(suite, seed):
    rows = suite[seed]
    assert rows[PCB].average > rows["uniform soup (average)"].average + 0.05


@pytest.mark.slow
def test_pcb_beats_task_arithmetic_on_average(suite):
    pcb = np.mean([suite[s][PCB].average for s in SEEDS])
    ta = np.mean([suite[s]["task arithmetic"].average for s in SEEDS])
    assert pcb > ta + 0.01, f"PCB {pcb:.3f} vs task arithmetic {ta:.3f}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_widen_moves_the_model_towards_the_tasks(suite, seed):
    rows = suite[seed]
    assert rows[WIDEN].average > rows["pretrained"].average + 0.08
