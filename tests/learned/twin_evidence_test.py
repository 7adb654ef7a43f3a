"""Twin-Merging on the digits testbed, over three seeds (rows of the demo suite).

Twin-Merging's router reads the input (through the shared expert's features), so, as
WEMoE's row, the demo row merges the four tasks whose inputs no other task shares
(rot90, mirror, invert, shift); the router learns the task of 100 training inputs per task
taken past the 200-example validation slice. Shared expert: task arithmetic, λ = 0.3;
exclusive parts: rank 16 per matrix (of 64x512, 512x512, 512x128), biases whole.
Measured on 2026-11-23 (2 shared CPU cores), mean test accuracy over the four tasks in %:

====================================================  =====  =====  =====
setting                                               s0     s1     s2
====================================================  =====  =====  =====
individual fine-tuned (own task)                      97.2   97.2   96.4
shared expert alone (task arithmetic, λ = 0.3)        84.7   73.5   73.9
Twin-Merging, rank 16 (the demo row)                  96.8   97.0   96.0
test inputs routed to their own task                  99.9   99.6   99.8
scratch runs (key = seed), not asserted:
  Twin-Merging, rank 4                                86.7   83.9   80.1
  Twin-Merging, rank 64                               97.1   97.0   96.4
  Twin-Merging, rank 16, TIES (0.2) shared expert     95.8   95.9   95.5
    (TIES alone                                       89.1   85.1   84.1)
  all 8 tasks, rank 16 (individual 96.7/96.9/96.2)    86.1   87.4   79.3
    (task arithmetic alone, 8 tasks                   75.3   77.4   69.5)
====================================================  =====  =====  =====

The paper's claim holds in kind: Twin-Merging comes within 0.4/0.2/0.4 points of the
individual models (the paper: within a few points of fine-tuned on GLUE and ViT tasks) and
gains +12.1/+23.5/+22.1 over its shared expert. Rank is what matters: at rank 4 the
exclusive parts lose most of the gain; rank 16 already recovers the models (the
exclusive differences are close to low rank). On all eight tasks the router cannot tell
apart the four tasks that share one input set (58% of test inputs routed to their own
task; those tasks mix their exclusive parts), yet Twin-Merging still gains 10 points over
task arithmetic there, while staying 9-17 points below the individual models. Margins
below are under the smallest measured values.
"""

import numpy as np
import pytest

from tests._testing import SEEDS

ROW = "Twin-Merging (distinct inputs)"


@pytest.mark.slow
def test_twin_merging_comes_close_to_the_individual_models(suite):
    """Within 1.5 points of the individual models on the distinct-input tasks (measured
    0.4/0.2/0.4)."""
    for s in SEEDS:
        row, individual = suite[s][ROW], suite[s]["individual (upper bound)"]
        tasks = row.tasks
        assert len(tasks) == 4
        gap = 100 * (individual.average_over(tasks) - row.average)
        assert gap < 1.5, f"seed {s}: Twin-Merging {100 * row.average:.1f}, {gap:.1f} below"


@pytest.mark.slow
def test_twin_merging_beats_its_shared_expert(suite):
    """The exclusive parts add at least 8 points over the shared merge alone (measured
    +12.1/+23.5/+22.1), on every one of the four tasks."""
    for s in SEEDS:
        row = suite[s][ROW]
        shared = row.details.shared
        assert np.array_equal(np.flatnonzero(~np.isnan(shared)), row.tasks)
        gain = 100 * (row.average - np.nanmean(shared))
        assert gain > 8.0, f"seed {s}: Twin-Merging vs shared expert {gain:+.1f}"
        assert np.all(row.accuracies[row.tasks] > shared[row.tasks]), (
            f"seed {s}: per task {row.accuracies[row.tasks]} vs shared {shared[row.tasks]}"
        )


@pytest.mark.slow
def test_router_tells_the_distinct_input_tasks_apart(suite):
    """At least 97% of the test inputs of each task are routed to it (measured >= 99.1%)."""
    for s in SEEDS:
        routed = suite[s][ROW].details.router
        assert np.nanmin(routed) > 0.97, f"seed {s}: routed right {routed}"
