"""OPCM's claim on the digits testbed: accuracy holds as models arrive, in constant memory.

The eight fine-tuned models arrive one at a time in task order. After each, the merge
is scored on the tasks seen so far (mean test accuracy, %). OPCM (α=0.5, FusionBench's
default) against the two continual baselines of the paper: task arithmetic with a fixed
λ=0.3 (FusionBench's continual task arithmetic) and averaging of the models seen so far.
Measured on 2026-12-03:

====  ======  =====  =====  =====  =====  =====  =====  =====  =====
seed  method  1      2      3      4      5      6      7      8
====  ======  =====  =====  =====  =====  =====  =====  =====  =====
0     OPCM    96.1   94.4   93.1   88.1   85.2   84.4   84.2   84.0
0     TA 0.3  93.7   90.7   91.7   84.7   82.4   79.7   77.9   75.3
0     avg     96.1   92.2   91.9   83.4   80.2   75.9   74.6   73.7
1     OPCM    97.0   92.0   86.6   82.0   80.4   80.1   80.6   81.4
1     TA 0.3  83.3   75.7   76.0   73.5   77.0   76.9   78.1   77.4
1     avg     97.0   89.1   78.7   70.1   71.1   70.4   70.3   71.3
2     OPCM    96.3   92.6   86.5   81.0   74.7   75.4   74.3   70.5
2     TA 0.3  66.8   70.4   74.9   73.9   75.1   75.4   74.5   69.5
2     avg     96.3   85.7   77.6   71.3   67.0   67.0   62.9   58.2
====  ======  =====  =====  =====  =====  =====  =====  =====  =====

What reproduces (the paper, CLIP ViT-B/32 on 8 tasks, ends at OPCM 75.5 vs continual
task arithmetic 67.5 and averaging 65.8): OPCM is above averaging at every step after
the first on every seed (+1.2 at least, +10.1 to +12.3 at the end) and loses about half as
much as averaging over the sequence (96 -> 84/81/71 vs 96/97/96 -> 74/71/58); its mean
accuracy over the eight steps is above fixed-λ task arithmetic's by +4.2/+7.8/+8.8, and
it ends above it on every seed (+8.7/+4.0/+1.0).

What does not, or only barely: on seed 2 fixed-λ task arithmetic catches up in the
middle of the sequence (steps 5-7: 75.1/75.4/74.5 vs OPCM 74.7/75.4/74.3) and ends only
1.0 below. Against task arithmetic with λ *tuned on validation data* (the demo suite's
row, all 8 models at once, not a continual method) OPCM's final merge is ahead on seeds 0
and 1 but behind on seed 2: 84.0/81.4/70.5 vs 76.6/77.6/72.4 (uniform soup
73.7/71.3/58.2, TIES 84.5/82.4/75.1). OPCM tunes nothing: its scale is fixed by keeping
the merged task vector at the average task vector norm, and seed 2 is the seed with the
most interference (averaging falls to 58.2), where a tuned λ helps task arithmetic most.
Not asserted.

The state (base, running sum, three scalars) keeps one size after every model: 2,892,812
bytes, twice the 1,446,400 of the model plus 12.

Margins below are under the smallest measured value on any seed.
"""

import jax
import numpy as np
import pytest

import fusionjax as fj
from fusionjax import testbed
from tests._testing import SEEDS

_OPCM = fj.merging.opcm(alpha=0.5)


def running_accuracies(tb):
    """{method: [mean acc over tasks seen, after each model]}, and the state's sizes."""
    state = _OPCM.init(tb.pretrained)
    tvs = fj.task_vectors(tb.pretrained, list(tb.finetuned))
    total = None
    out = {"OPCM": [], "TA 0.3": [], "avg": []}
    sizes = []
    for k, ft in enumerate(tb.finetuned):
        state = _OPCM.update(state, ft)
        sizes.append(sum(x.nbytes for x in jax.tree.leaves(state)))
        total = tvs[k] if total is None else jax.tree.map(lambda a, b: a + b, total, tvs[k])
        seen = np.arange(k + 1)
        for name, params in (
            ("OPCM", state.merged),
            ("TA 0.3", fj.apply_task_vector(tb.pretrained, total, 0.3)),
            ("avg", fj.apply_task_vector(tb.pretrained, total, 1.0 / (k + 1))),
        ):
            out[name].append(100 * float(np.mean(tb.evaluate(params)[seen])))
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(tb.pretrained))
    return out, sizes, model_bytes


@pytest.fixture(scope="session")
def continual_runs(suite):  # noqa: ARG001  (after the suite: same xdist group, warm caches)
    return {seed: running_accuracies(testbed.load(seed=seed)) for seed in SEEDS}


@pytest.mark.slow
def test_opcm_final_merge_beats_averaging(suite):
    for s in SEEDS:
        rows = suite[s]
        opcm = 100 * rows["OPCM (sequential)"].average
        avg = 100 * rows["uniform soup (average)"].average
        # measured +10.3/+10.1/+12.3
        assert opcm - avg > 7.0, f"seed {s}: OPCM {opcm:.1f} vs averaging {avg:.1f}"


@pytest.mark.slow
def test_opcm_running_accuracy_holds_up(continual_runs):
    for s in SEEDS:
        runs = continual_runs[s][0]
        opcm, ta, avg = (np.asarray(runs[k]) for k in ("OPCM", "TA 0.3", "avg"))
        # one model in: that model, scored on its own task
        assert opcm[0] == pytest.approx(avg[0])
        # above averaging at every later step: smallest gap +1.2/+2.9/+6.9
        assert np.all(opcm[1:] - avg[1:] > 0.8), (s, opcm, avg)
        # mean over the sequence above fixed-λ task arithmetic: +4.2/+7.8/+8.8
        assert opcm.mean() - ta.mean() > 3.0, (s, opcm, ta)
        # and ends above it: +8.7/+4.0/+1.0
        assert opcm[-1] - ta[-1] > 0.5, (s, opcm, ta)
        # loses less over the sequence than averaging: 12.1/15.6/25.8 vs 22.4/25.7/38.1
        assert (opcm[0] - opcm[-1]) < 0.8 * (avg[0] - avg[-1]), (s, opcm, avg)
        assert opcm.min() > 65.0, (s, opcm)  # measured 84.0/80.1/70.5


@pytest.mark.slow
def test_opcm_state_memory_is_constant(continual_runs):
    for s in SEEDS:
        _, sizes, model_bytes = continual_runs[s]
        assert len(set(sizes)) == 1, sizes
        assert sizes[0] <= 2 * model_bytes + 64, (sizes[0], model_bytes)
