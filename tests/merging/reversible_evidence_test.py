r"""Reversible merging of low-rank weights (RMM) on the digits testbed over three seeds.

The demo row "Reversible low-rank (per-task)": every task vector's matrices are truncated
to rank 16 by SVD (the paper's post-training SVD setting), then each factor is kept as
a mean plus a basis of 4 arrays and per-task coefficients
(:func:`fusionjax.merging.reversible_merge`, ``rank=16, num_basis=4``); each task is
scored with its own recovered model, as EMR's row is. Storage: 0.71 of one model's
numbers (EMR: one model plus ``T`` bit masks, about 1.25 float32 models). Measured on
this branch, mean test accuracy in %:

==============================  =====  =====  =====
method                          s0     s1     s2
==============================  =====  =====  =====
individual (upper bound)        96.7   96.9   96.2
EMR (per-task masks)            91.6   93.9   89.4
Reversible low-rank (per-task)  95.4   96.1   95.8
==============================  =====  =====  =====

(Scratch runs, seed 0: ``num_basis`` 2/3/4/7 gave 83.1/91.3/95.4/96.5 at 0.41/0.56/0.71/
1.17 models; rank-16 truncation alone, ``num_basis=7``, lossless, is 96.5; seed 1 with the
full task vectors, ``rank=None``: ``num_basis=1`` 87.9 at 2.02 models, 3 gives 94.7 at
4.07 models — the low-rank route is what makes RMM cheap here.)

What holds, and is asserted (margins below the smallest measured value): RMM is above
EMR on every seed (+3.8/+2.2/+6.4; asserted > +1.5) at less storage, and within
1.3/0.8/0.4 points of the individual models (asserted < 2.5). The paper's claim in kind
(recovered low-rank models keep their performance at a fraction of the storage of all
models) reproduces. The paper compares with merging methods on LoRA/SVD-compressed
models, not with EMR; the comparison with EMR at stated storage is ours.
"""

import pytest

from tests._testing import SEEDS

RMM = "Reversible low-rank (per-task)"
EMR = "EMR (per-task masks)"


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_reversible_beats_emr_and_is_near_the_individual_models(suite, seed):
    rows = suite[seed]
    rmm = rows[RMM].average
    assert rmm > rows[EMR].average + 0.015, f"seed {seed}: {rmm:.3f} vs EMR"
    assert rows["individual (upper bound)"].average - rmm < 0.025, f"seed {seed}: {rmm:.3f}"
