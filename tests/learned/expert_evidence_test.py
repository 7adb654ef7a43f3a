"""Expert Merging on the digits testbed, over three seeds (the demo suite's rows).

The rows come from the ``suite`` fixture (shared with the other methods' evidence; no
training here). Expert Merging calibrates on each task's *training* inputs past the
validation slice, without labels; AdaMerging adapts on the unlabeled *test* inputs (as
its paper). Measured on 2026-12-03, mean test accuracy over the 8 tasks in % (and the
worst task):

================================  ===========  ===========  ===========
method                            s0           s1           s2
================================  ===========  ===========  ===========
task arithmetic, λ on val         76.6 (58.3)  77.6 (63.1)  72.4 (39.7)
AdaMerging, layer-wise            77.7 (49.4)  81.5 (55.7)  75.0 (38.2)
Expert Merging (features+logits)  83.6 (73.5)  87.9 (85.0)  79.5 (72.4)
individual fine-tuned             96.7         96.9         96.2
================================  ===========  ===========  ===========

Expert Merging beats task arithmetic with its validated λ by +7.0/+10.3/+7.1 points and
layer-wise AdaMerging by +5.9/+6.4/+4.5 (the paper: 58.11 vs 56.85 for AdaMerging and 56.17
for task arithmetic on InternVL, a smaller gap). The mechanism in the per-task rows:
entropy minimisation has no signal for *which* prediction to be confident in and drives
the binary tasks' coefficients towards 0 (AdaMerging's worst task 49.4/55.7/38.2), while
distilling each expert's own logits keeps every task near its expert (Expert Merging's
worst task 73.5/85.0/72.4), the balance across domains the paper reports.

Expert Merging++ (not a demo row; run once in a scratch script, same data and defaults):
with the paper's budget B = 1 (6 coefficients per task, as layer-wise; the chunks go to the
two large kernels, the biases freeze) it scores 83.0/88.0/80.6, i.e. -0.6/+0.1/+1.1 against
Expert Merging: the paper's ++ gain does not reproduce at that budget on a 6-tensor
encoder, where there are few layers to reallocate between. With B = 2 it scores
84.7/89.6/82.2 (+1.1/+1.7/+2.7), more coefficients rather than better-placed ones.

Margins below are under the smallest measured value.
"""

import numpy as np
import pytest

from tests._testing import SEEDS

ROW = "Expert Merging"
ADA = "AdaMerging (layer-wise)"
TA = "task arithmetic"


def _gains(suite, method, baseline):
    return [100 * (suite[s][method].average - suite[s][baseline].average) for s in SEEDS]


@pytest.mark.slow
def test_expert_merging_beats_task_arithmetic_with_validated_lambda(suite):
    gains = _gains(suite, ROW, TA)
    assert min(gains) > 5.0, f"Expert Merging vs TA(val λ): {gains} (measured +7.0/+10.3/+7.1)"


@pytest.mark.slow
def test_expert_merging_beats_layer_wise_adamerging(suite):
    gains = _gains(suite, ROW, ADA)
    assert min(gains) > 3.0, f"Expert Merging vs AdaMerging: {gains} (measured +5.9/+6.4/+4.5)"


@pytest.mark.slow
def test_expert_merging_keeps_every_task_near_its_expert(suite):
    """Its worst task is far above AdaMerging's and task arithmetic's worst task."""
    worst = {
        m: [100 * float(np.min(suite[s][m].accuracies)) for s in SEEDS] for m in (ROW, ADA, TA)
    }
    over_ada = [a - b for a, b in zip(worst[ROW], worst[ADA], strict=True)]
    over_ta = [a - b for a, b in zip(worst[ROW], worst[TA], strict=True)]
    assert min(over_ada) > 15.0, f"worst task vs AdaMerging: {over_ada} (measured +24/+29/+34)"
    assert min(over_ta) > 10.0, f"worst task vs TA: {over_ta} (measured +15/+22/+33)"
    assert min(worst[ROW]) > 65.0, worst[ROW]


@pytest.mark.slow
def test_expert_merging_stays_below_the_experts(suite):
    gaps = _gains(suite, "individual (upper bound)", ROW)
    assert min(gaps) > 5.0, f"individual - Expert Merging: {gaps} (measured 13.1/9.0/16.7)"
