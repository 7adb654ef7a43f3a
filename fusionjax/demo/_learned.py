"""The learned rows of the demo table: AdaMerging, aTLAS, Neural Ligand, WEMoE, M2N2, and more.

AdaMerging and WEMoE adapt at test time: their unlabeled data are the test inputs of each
task (as in the papers), never their labels. aTLAS is supervised with a few labeled
examples per class, drawn from the training split past the validation slice the
data-free methods use; Neural Ligand trains its Portland on the training splits (as its
code does). All run with the library's defaults, which are the papers': AdaMerging
starts every coefficient at 0.3, clips to [0, 1] and takes 500 Adam steps (learning rate
1e-3) of 16 inputs per task. WEMoE routes on inputs, so it merges only the tasks whose
inputs no other task shares (see ``tests/learned/wemoe_test.py`` for all eight). M2N2
evolves an archive of 16 models from the eight fine-tuned ones for 100 generations (one
child each), its fitness the per-example correctness on the validation slice (the first
200 training examples of every task, where the data-free rows tune λ), never the test
data; its crossover interpolates task vectors (``base`` = the pretrained encoder).
Twin-Merging's router also reads inputs only (through the shared expert's features), so
its row merges the same tasks; its router is supervised, trained to tell the tasks apart
on ``TWIN_ROUTER_SIZE`` training inputs per task past the validation slice (the router's
label is the task; the inputs' class labels are not used).
Expert Merging calibrates on unlabeled inputs: each task's training inputs past the
validation slice, without their labels (its paper uses a few unlabeled calibration
examples, not the test set), aligning the merge's features and logits with each expert's.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

import fusionjax as fj

ATLAS_SHOTS = 4
TWIN_RANK = 16
TWIN_ROUTER_SIZE = 100
_TA_PAPER = fj.merging.task_arithmetic(scaling=0.3)  # built once: merge compiles per merger


class Scores(NamedTuple):
    """Per-task test accuracies, returned by methods that are not one parameter tree."""

    accuracies: np.ndarray


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


def _ligand(ctx: Any):
    """Trains Neural Ligand once per context (both of its rows read the same run)."""
    if "ligand" not in ctx.cache:
        tb = ctx.tb
        data = [(t.x_train, t.y_train) for t in tb.tasks]
        res = fj.learned.neural_ligand(
            tb.pretrained, list(tb.finetuned), data, tb.features, tb.head_logits, key=ctx.key
        )
        ctx.cache["ligand"] = res
    return ctx.cache["ligand"]


def ligand_ensemble(ctx: Any):
    """Neural Ligand's per-sample ensemble (features mixed by the Portland's weights)."""
    tb = ctx.tb
    res = _ligand(ctx)
    accs = []
    for t, task in enumerate(tb.tasks):
        feats = fj.learned.expert_features(list(tb.finetuned), task.x_test, tb.features)
        weights = res.weights(list(tb.finetuned), task.x_test, tb.features)
        logits = fj.learned.ensemble_logits(weights, feats, tb.head_logits, t)
        accs.append(float(np.mean(np.asarray(logits).argmax(-1) == task.y_test)))
    return Scores(np.asarray(accs)), "Portland on train, ensemble of features", res


def ligand_merge(ctx: Any):
    """Neural Ligand's merge: one model per input, θ0 + Σ_k w_k(x) τ_k."""
    tb = ctx.tb
    res = _ligand(ctx)
    tvs = fj.learned.stacked_task_vectors(tb.pretrained, list(tb.finetuned))
    accs = []
    for t, task in enumerate(tb.tasks):
        logits = fj.learned.merged_logits(
            tb.pretrained,
            tvs,
            res.weights(list(tb.finetuned), task.x_test, tb.features),
            task.x_test,
            features_fn=tb.features,
            head_fn=tb.head_logits,
            task_index=t,
        )
        accs.append(float(np.mean(np.asarray(logits).argmax(-1) == task.y_test)))
    return Scores(np.asarray(accs)), "per-input merge with the Portland's weights", res


def wemoe_distinct_inputs(ctx: Any):
    """WEMoE on the tasks whose inputs differ (its router sees inputs only), scored there."""
    tb = ctx.tb
    tasks = distinct_input_tasks(tb)
    # A Partial of the testbed's logits (itself a Partial holding the heads): the loop
    # takes the heads as arguments and compiles once for every seed.
    logits_fn = Partial(_subset_logits, tb.logits, tuple(tasks))
    res = fj.learned.wemoe(
        tb.pretrained,
        [tb.finetuned[t] for t in tasks],
        [tb.tasks[t].x_test for t in tasks],
        logits_fn,
        key=ctx.key,
    )
    accs = np.full(tb.num_tasks, np.nan)
    for i, t in enumerate(tasks):
        logits = fj.learned.wemoe_logits(res, logits_fn, i, tb.tasks[t].x_test)
        accs[t] = float(np.mean(np.asarray(logits).argmax(-1) == tb.tasks[t].y_test))
    merged = fj.merge(tb.pretrained, [tb.finetuned[t] for t in tasks], _TA_PAPER)
    ta = float(np.mean(np.asarray(tb.evaluate(merged))[tasks]))
    individual = float(np.mean([np.asarray(tb.evaluate(tb.finetuned[t]))[t] for t in tasks]))
    note = (
        f"{len(tasks)} models: tasks with their own inputs (there: task arithmetic λ=0.3 "
        f"{100 * ta:.1f}, individual {100 * individual:.1f})"
    )
    return Scores(accs), note, res


def _subset_logits(logits, tasks, params, i, x):
    """The logits of task ``tasks[i]``: models merged on a subset of the tasks."""
    return logits(params, tasks[i], x)


def distinct_input_tasks(tb) -> list[int]:
    """Tasks whose test inputs no other task shares (a router on inputs can tell them apart)."""
    keys = [t.x_test.tobytes() for t in tb.tasks]
    return [i for i, k in enumerate(keys) if keys.count(k) == 1]


M2N2_GENERATIONS = 100
M2N2_ARCHIVE = 16


def validation_scores(tb, size: int) -> Partial:
    """``score(params) -> [T * size]``: correctness on the first ``size`` train examples per task.

    The validation slice the data-free rows tune λ on (never the test data). Tasks that
    share their inputs share their features: the distinct inputs go through the encoder
    in one batch. The inputs, labels and heads are the Partial's arrays, so the compiled
    M2N2 loop serves every seed.
    """
    xs, groups = [], []
    seen: dict[bytes, int] = {}
    for task in tb.tasks:
        x = np.asarray(task.x_train[:size], np.float32)
        groups.append(seen.setdefault(x.tobytes(), len(xs)))
        if groups[-1] == len(xs):
            xs.append(x)
    ys = tuple(np.asarray(t.y_train[:size], np.int32) for t in tb.tasks)
    return Partial(_correct, tb.features, tb.head_logits, tuple(groups), np.concatenate(xs), ys)


def _correct(features_fn, head_fn, groups, x, ys, params):
    feats = features_fn(params, x)
    feats = feats.reshape(-1, ys[0].shape[0], feats.shape[-1])  # [distinct inputs, size, d]
    hits = [
        (jnp.argmax(head_fn(t, feats[g]), axis=-1) == y).astype(jnp.float32)
        for t, (g, y) in enumerate(zip(groups, ys, strict=True))
    ]
    return jnp.concatenate(hits)


def m2n2(ctx: Any, *, size: int) -> tuple[Any, str, Any]:
    """M2N2 from the fine-tuned models, fitness = correctness on the validation slice."""
    tb = ctx.tb
    res = fj.learned.m2n2(
        list(tb.finetuned),
        validation_scores(tb, size),
        generations=M2N2_GENERATIONS,
        archive_size=M2N2_ARCHIVE,
        key=ctx.key,
        base=tb.pretrained,
    )
    history = np.asarray(res.history)
    note = (
        f"{M2N2_GENERATIONS} children, archive {M2N2_ARCHIVE}, fitness on val: best "
        f"{100 * history[0]:.1f}->{100 * history[-1]:.1f}"
    )
    return res.params, note, res


class TwinDetails(NamedTuple):
    """What the Twin-Merging row measured besides its accuracies (NaN off its tasks)."""

    shared: np.ndarray
    router: np.ndarray
    result: Any


def twin_distinct_inputs(ctx: Any, *, skip: int):
    """Twin-Merging on the tasks whose inputs differ (its router sees inputs), scored there.

    The shared expert is task arithmetic (λ=0.3) of those models; the exclusive parts keep
    rank ``TWIN_RANK`` per matrix; the router learns the task of ``TWIN_ROUTER_SIZE``
    training inputs per task taken past the first ``skip`` (the validation slice).
    """
    tb = ctx.tb
    tasks = distinct_input_tasks(tb)
    data = [tb.tasks[t].x_train[skip : skip + TWIN_ROUTER_SIZE] for t in tasks]
    res = fj.learned.twin_merging(
        tb.pretrained,
        [tb.finetuned[t] for t in tasks],
        data,
        tb.features,
        shared=_TA_PAPER,
        rank=TWIN_RANK,
        key=ctx.key,
    )
    accs = np.full(tb.num_tasks, np.nan)
    routed = np.full(tb.num_tasks, np.nan)
    for i, t in enumerate(tasks):
        x, y = tb.tasks[t].x_test, tb.tasks[t].y_test
        feats = fj.learned.twin_features(res, tb.features, x)
        accs[t] = float(np.mean(np.asarray(tb.head_logits(t, feats)).argmax(-1) == y))
        weights = fj.learned.twin_weights(res, tb.features, x)
        routed[t] = float(np.mean(np.asarray(weights).argmax(-1) == i))
    shared = np.full(tb.num_tasks, np.nan)
    shared[tasks] = np.asarray(tb.evaluate(res.shared))[tasks]
    note = (
        f"{len(tasks)} models, rank {TWIN_RANK}, router on {TWIN_ROUTER_SIZE} train inputs/task"
        f" ({100 * np.nanmean(routed):.1f}% routed right; shared TA λ=0.3 alone "
        f"{100 * np.nanmean(shared):.1f})"
    )
    return Scores(accs), note, TwinDetails(shared, routed, res)


def expert_merging(ctx: Any, *, skip: int) -> tuple[Any, str, Any]:
    """Expert Merging on each task's unlabeled training inputs past the validation slice."""
    tb = ctx.tb
    pools = [t.x_train[skip:] for t in tb.tasks]
    # tb.logits and tb.features are Partials of functions cached per testbed shape: the
    # loop compiles once for every seed.
    res = fj.learned.expert_merging(
        tb.pretrained, list(tb.finetuned), pools, tb.logits, hidden_fn=tb.features, key=ctx.key
    )
    _, table = fj.learned.coefficient_table(res.coefficients)
    note = (
        f"unlabeled train inputs, features+logits, loss {res.losses[:10].mean():.2f}->"
        f"{res.losses[-10:].mean():.2f}, α in [{table.min():.2f}, {table.max():.2f}]"
    )
    return res.params, note, res.coefficients
