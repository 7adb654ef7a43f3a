"""The learned merging methods of the demo table: AdaMerging (task-wise, layer-wise, ++) and aTLAS.

AdaMerging adapts at test time: its unlabeled data are the test inputs of each task (as
in the paper), never their labels. aTLAS is supervised with a few labeled examples per
class, drawn from the training split past the validation slice the data-free methods use.
All use the libraries' defaults (the papers'): AdaMerging starts every coefficient at 0.3,
clips to [0, 1] and takes 500 Adam steps (learning rate 1e-3) of 16 inputs per task.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import fusionjax as fj

ATLAS_SHOTS = 4


def unlabeled_inputs(tb) -> list[np.ndarray]:
    """Each task's test inputs, without labels: AdaMerging's test-time data."""
    return [t.x_test for t in tb.tasks]


def few_shot(tb, shots: int, *, skip: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``shots`` labeled training examples per class of every task, past the first ``skip``."""
    rng = np.random.default_rng([seed, 7])
    out = []
    for task in tb.tasks:
        pool = np.flatnonzero(np.arange(len(task.y_train)) >= skip)
        idx = np.concatenate(
            [
                rng.choice(pool[task.y_train[pool] == c], shots, replace=False)
                for c in range(task.num_classes)
            ]
        )
        out.append((task.x_train[idx], task.y_train[idx]))
    return out


def adamerging(ctx: Any, *, plus_plus: bool = False, **kwargs) -> tuple[Any, str, Any]:
    """Runs (task- or layer-wise) AdaMerging or AdaMerging++ on the testbed."""
    tb = ctx.tb
    fn = fj.learned.adamerging_plus_plus if plus_plus else fj.learned.adamerging
    res = fn(
        tb.pretrained, list(tb.finetuned), unlabeled_inputs(tb), tb.logits, key=ctx.key, **kwargs
    )
    lam = fj.learned.effective(res.coefficients, (0.0, 1.0))
    _, table = fj.learned.coefficient_table(lam)
    entropy = f"entropy {res.losses[0]:.2f}->{res.losses[-1]:.2f}"
    note = f"{entropy}, λ in [{table.min():.2f}, {table.max():.2f}]"
    return res.params, note, lam


def atlas(ctx: Any, *, skip: int) -> tuple[Any, str, Any]:
    """Runs aTLAS with a few labeled training examples per class."""
    tb = ctx.tb
    labeled = few_shot(tb, ATLAS_SHOTS, skip=skip, seed=tb.seed)
    res = fj.learned.atlas(tb.pretrained, list(tb.finetuned), labeled, tb.logits, key=ctx.key)
    return res.params, f"{ATLAS_SHOTS} labeled/class (train)", res.coefficients
