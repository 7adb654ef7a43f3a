"""M2N2 on the digits testbed, over three seeds (the demo suite's "M2N2 (evolutionary)" row).

The row starts from the eight fine-tuned models and evolves an archive of 16 for 100
generations (one child each: 100 forward passes over the fitness set, the whole run one
compiled ``lax.scan``), with the paper's α = 1, attraction and split-point SLERP
crossover, here on task vectors (``base`` = the pretrained encoder). Fitness is the
per-example correctness on the validation slice (the first 200 training examples of
every task, where the data-free rows tune λ); the test data only scores the result.
Measured on 2026-12-03 (2 shared CPU cores), mean test accuracy over the 8 tasks in %:

==================================  =====  =====  =====
method                              s0     s1     s2
==================================  =====  =====  =====
uniform soup                        73.7   71.3   58.2
task arithmetic (λ on val)          76.6   77.6   72.4
TIES (density 0.2, λ on val)        84.5   82.4   75.1
TSV-M                               90.2   91.7   80.7
M2N2 (evolutionary)                 79.9   75.6   66.1
  best fitness-set accuracy         79.0   77.6   68.0
individual fine-tuned (own task)    96.7   96.9   96.2
==================================  =====  =====  =====

M2N2 beats the uniform soup on every seed (+6.2/+4.3/+7.9) but task arithmetic only on
seed 0 (+3.3/-2.0/-6.3): the brief's "above task arithmetic" does not reproduce within
the row's time budget (about 2 s of CPU per seed). It stays far below TIES and TSV-M.
Why: a child is a per-entry interpolation of two archive members, so starting from
eight specialists the archive reaches a multi-task model only by many generations of
children of children; 100 children barely get there (the best fitness-set accuracy
climbs from 50-52% to 68-79%), and the paper runs thousands of evaluations. Scratch
runs with the same key show what each part does (seed 0 at 150 generations, where M2N2
also measured 79.9; seeds 1 and 2 at 100):

- 400 generations (four times the row's): 76.4 on seed 1, 69.5 on seed 2, still below
  task arithmetic (77.6, 72.4): more children help, slowly.
- no competition (α = 0): 72.8/71.6/66.2, below M2N2 on seeds 0 and 1 (-7.1/-4.0/+0.1):
  without fitness sharing the archive fills with near-copies of the current best.
- no attraction (second parent by fitness): 79.7/75.4/65.8 (-0.2/-0.2/-0.3): mate
  selection barely matters at this budget.
- seed 0 only: crossover on the parameters (no ``base``) 75.8; linear interpolation
  instead of SLERP 76.6. Averaging shrinks nearly orthogonal task vectors, as the
  uniform soup does, while SLERP keeps their norm.

Asserted (margins under the smallest measured value): above the uniform soup, and the
archive's best fitness-set accuracy never decreasing (elitism).
"""

import numpy as np
import pytest

from tests._testing import SEEDS

ROW = "M2N2 (evolutionary)"


@pytest.mark.slow
def test_m2n2_beats_the_uniform_soup(suite):
    gains = [100 * (suite[s][ROW].average - suite[s]["uniform soup (average)"].average) for s in SEEDS]
    assert min(gains) > 2.5, f"M2N2 vs uniform soup: {gains} (measured +6.2/+4.3/+7.9)"


@pytest.mark.slow
def test_m2n2_against_the_data_free_rows(suite):
    """Reported, not claimed: task arithmetic (val λ), TIES and TSV-M (see the table)."""
    for s in SEEDS:
        rows = suite[s]
        m2n2 = rows[ROW].average
        print(
            f"seed {s}: M2N2 {100 * m2n2:.1f}, task arithmetic "
            f"{100 * rows['task arithmetic'].average:.1f}, TIES "
            f"{100 * rows['TIES (density 0.2)'].average:.1f}, TSV-M {100 * rows['TSV-M'].average:.1f}"
        )
        # It stays far below the singular-vector merge on every seed (-10 to -16 points).
        assert m2n2 < rows["TSV-M"].average - 0.05


@pytest.mark.slow
def test_m2n2_improves_its_fitness_and_never_loses_its_best(suite):
    for s in SEEDS:
        out = suite[s][ROW].details
        history = np.asarray(out.history)
        assert np.all(np.diff(history) >= 0), f"seed {s}: {history}"
        # The fine-tuned models score 50-53% on the fitness set; the best child 68-79%.
        assert history[-1] > history[0] + 0.1, f"seed {s}: {history[0]} -> {history[-1]}"
        assert bool(np.asarray(out.occupied).all())
