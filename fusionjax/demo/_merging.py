r"""Every merging method on the digits multi-task testbed, as a table.

Hyperparameters follow the papers. Where a paper tunes the final scaling
:math:`\lambda` on validation data (task arithmetic, TIES, breadcrumbs, DARE,
DELLA), the suite does too: the merged task vector is computed once with
:math:`\lambda=1` and :math:`\lambda` is picked from a grid by the mean accuracy
on a validation slice of each task's *training* split. Test data is used only
for the reported accuracies.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import fusionjax as fj
from fusionjax import interop
from fusionjax import merging
from fusionjax.demo import _learned

SCALING_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.2, 1.5)
VALIDATION_SIZE = 200
FISHER_SIZE = 256


class MethodResult(NamedTuple):
    """One row of the table.

    Attributes:
      name: Method name.
      accuracies: Per-task test accuracy ``[num_tasks]``; NaN for tasks the
        method does not merge (SLERP takes two models).
      note: Chosen hyperparameters, or other remarks.
      seconds: Wall time of the merge (including data statistics and training).
      details: What else the method learned (e.g. AdaMerging's coefficients), or ``None``.
    """

    name: str
    accuracies: np.ndarray
    note: str
    seconds: float
    details: Any = None

    @property
    def tasks(self) -> np.ndarray:
        """Indices of the tasks this row covers."""
        return np.flatnonzero(~np.isnan(self.accuracies))

    @property
    def average(self) -> float:
        """Mean accuracy over the tasks the row covers."""
        return float(np.nanmean(self.accuracies))

    def average_over(self, tasks: Sequence[int]) -> float:
        """Mean accuracy over the given tasks."""
        return float(np.mean(self.accuracies[np.asarray(tasks)]))


class _Context(NamedTuple):
    tb: Any
    key: jax.Array
    validate: Callable[[Any], float]
    cache: dict  # results shared by several rows (one training, two rows)


@functools.partial(jax.jit, static_argnums=2)
def _predict(logits_fn, params, task_index, x):
    # logits_fn is the testbed's Partial: its heads are arguments, so every seed
    # shares one compiled function per task.
    return jnp.argmax(logits_fn(params, task_index, x), -1)


def _validation_accuracy(tb) -> Callable[[Any], float]:
    xs = [jnp.asarray(t.x_train[:VALIDATION_SIZE]) for t in tb.tasks]
    ys = [np.asarray(t.y_train[:VALIDATION_SIZE]) for t in tb.tasks]
    def validate(params) -> float:
        accs = [
            float(np.mean(np.asarray(_predict(tb.logits, params, i, x)) == y))
            for i, (x, y) in enumerate(zip(xs, ys, strict=False))
        ]
        return float(np.mean(accs))

    return validate


def _tuned(ctx: _Context, merger: fj.Step, **extra) -> tuple[Any, str]:
    r"""Merges with :math:`\lambda=1`, then picks :math:`\lambda` on validation data."""
    tb = ctx.tb
    merged = fj.merge(tb.pretrained, list(tb.finetuned), merger, key=ctx.key, **extra)
    tv = fj.task_vector(tb.pretrained, merged)
    best = max(
        SCALING_GRID,
        key=lambda lam: ctx.validate(fj.apply_task_vector(tb.pretrained, tv, lam)),
    )
    return fj.apply_task_vector(tb.pretrained, tv, best), f"λ={best:g} (val)"


def _plain(ctx: _Context, merger: fj.Step, note: str = "", **extra) -> tuple[Any, str]:
    tb = ctx.tb
    return fj.merge(tb.pretrained, list(tb.finetuned), merger, key=ctx.key, **extra), note


def _greedy_soup(ctx: _Context):
    out = merging.greedy_soup(list(ctx.tb.finetuned), ctx.validate)
    return out.params, f"{len(out.selected)} of {len(ctx.tb.finetuned)} models"


SLERP_TASKS = (0, 1)
_SLERP = merging.slerp(t=0.5, space="task_vectors")


def _slerp(ctx: _Context):
    # SLERP merges two models; here the first two tasks', scored on those tasks.
    tb = ctx.tb
    pair = [tb.finetuned[i] for i in SLERP_TASKS]
    params = fj.merge(tb.pretrained, pair, _SLERP)
    return params, "2 models: tasks 1-2 only"


_FISHER = merging.fisher_merging()
_REGMEAN = merging.regmean(alpha=0.9)


def _fisher(ctx: _Context):
    tb = ctx.tb
    fishers = []
    for i, (task, ft) in enumerate(zip(tb.tasks, tb.finetuned, strict=False)):
        x = jnp.asarray(task.x_train[:FISHER_SIZE])
        # fisher_diagonal's Fisher from Dense inputs and output gradients (~40x faster).
        fishers.append(interop.dense_fisher_diagonal(tb.task_logits(i), ft, x, batch_size=32))
    return _plain(ctx, _FISHER, f"{FISHER_SIZE} examples/task", fishers=fj.stack(fishers))


def _regmean(ctx: _Context):
    tb = ctx.tb
    grams = [
        interop.dense_grams(tb.encoder, {"params": ft}, jnp.asarray(task.x_train))
        for task, ft in zip(tb.tasks, tb.finetuned, strict=False)
    ]
    return _plain(ctx, _REGMEAN, "α=0.9, train inputs", grams=fj.stack(grams))


@functools.partial(jax.jit, static_argnums=2)
def _logits_of_every_model(logits_fn, finetuned, task_index, x):
    # [K, n, C]: every fine-tuned encoder through task ``task_index``'s fixed head.
    return jnp.stack([logits_fn(params, task_index, x) for params in finetuned])


def _prediction_fusion(ctx: _Context, combine: Callable[[jax.Array], jax.Array], note: str):
    """A prediction-level ensemble of the fine-tuned models: K forwards per input, no merge."""
    tb = ctx.tb
    accs = []
    for t, task in enumerate(tb.tasks):
        stacked = _logits_of_every_model(tb.logits, tuple(tb.finetuned), t, task.x_test)
        labels = np.asarray(combine(stacked)).reshape(len(task.y_test), -1)[:, 0]
        accs.append(float(np.mean(labels == task.y_test)))
    return _learned.Scores(np.asarray(accs)), note


def _argmax_of(pool):
    return lambda stacked: jnp.argmax(pool(stacked), axis=-1)


# Merger objects are built once: merge compiles one function per merger and leaf
# shape, so reusing them across seeds and calls reuses the compiled code.
_UNIFORM = merging.uniform_soup()
_TASK_ARITHMETIC = merging.task_arithmetic(scaling=1.0)
_TIES = merging.ties(density=0.2, scaling=1.0)
_DARE = merging.dare(drop_rate=0.5, merger=_TASK_ARITHMETIC)
_DARE_TIES = merging.dare_ties(drop_rate=0.5, scaling=1.0)
_BREADCRUMBS = merging.breadcrumbs(scaling=1.0)
_DELLA = merging.della(scaling=1.0)
_MODEL_STOCK = merging.model_stock()
_TSV = merging.tsv_merge(scaling=1.0)
_ISO_C = merging.iso_c(scaling=1.0)
_ISO_CTS = merging.iso_cts(common_fraction=0.8, scaling=1.0)
_MAGMAX = merging.magmax(scaling=1.0)
_PCB = merging.pcb_merging(ratio=0.1, scaling=1.0)
_WIDEN = merging.widen()


def _emr(ctx: _Context):
    # EMR is T models (one unified vector, T masks and rescalers): each task is scored
    # with its own recovered model, as the paper evaluates it; not one merged model.
    tb = ctx.tb
    out = merging.emr_merge(tb.pretrained, list(tb.finetuned))
    accs = [
        float(np.asarray(tb.evaluate(merging.emr_task_model(tb.pretrained, out, t)))[t])
        for t in range(len(tb.finetuned))
    ]
    note = "per task: its own mask and rescaler, not one model"
    return _learned.Scores(np.asarray(accs)), note
# Reversible merging (RMM) of low-rank task vectors: each task vector is truncated to rank
# 16 by SVD (the paper's post-training SVD setting), then a basis of 4 arrays plus the mean
# per factor and per-task coefficients are kept; per task, like EMR.
RMM_RANK, RMM_BASIS = 16, 4


def _reversible(ctx: _Context):
    tb = ctx.tb
    out = merging.reversible_merge(
        tb.pretrained, list(tb.finetuned), num_basis=RMM_BASIS, rank=RMM_RANK
    )
    accs = [
        float(np.asarray(tb.evaluate(merging.reversible_task_model(tb.pretrained, out, t)))[t])
        for t in range(len(tb.finetuned))
    ]
    models = out.size() / sum(np.size(x) for x in jax.tree.leaves(tb.pretrained))
    note = (
        f"per task: rank-{RMM_RANK} SVD, basis {RMM_BASIS} + mean, stores {models:.2f} models"
        " (EMR: 1 + T bit masks)"
    )
    return _learned.Scores(np.asarray(accs)), note


_OPCM = merging.opcm(alpha=0.5)


def _opcm(ctx: _Context):
    # Continual merging: the models arrive one at a time, in task order; the row is the
    # merge after the last. The state holds the base, one running sum and three scalars.
    tb = ctx.tb
    state = _OPCM.init(tb.pretrained)
    for ft in tb.finetuned:
        state = _OPCM.update(state, ft)
    return state.merged, f"α=0.5, {int(state.count)} models in sequence"


LEARNED_METHODS = (
    "AdaMerging (task-wise)",
    "AdaMerging (layer-wise)",
    "AdaMerging++ (layer-wise)",
    "aTLAS",
    "Neural Ligand (ensemble)",
    "Neural Ligand (merge)",
    "WEMoE (distinct inputs)",
    "M2N2 (evolutionary)",
    "Twin-Merging (distinct inputs)",
    "Expert Merging",
)
"""The methods that train (seconds each); ``fusionjax demo --fast`` skips them."""


def default_methods() -> dict[str, Callable[[_Context], tuple[Any, str]]]:
    """The methods of the demo table, in order.

    Returns:
      A dict from method name to ``fn(ctx) -> (params, note)`` or
      ``fn(ctx) -> (params, note, details)``.
    """
    return {
        "uniform soup (average)": lambda c: _plain(c, _UNIFORM),
        "greedy soup": _greedy_soup,
        "task arithmetic": lambda c: _tuned(c, _TASK_ARITHMETIC),
        "TIES (density 0.2)": lambda c: _tuned(c, _TIES),
        "DARE + TA (drop 0.5)": lambda c: _tuned(c, _DARE),
        "DARE-TIES (drop 0.5)": lambda c: _tuned(c, _DARE_TIES),
        "breadcrumbs": lambda c: _tuned(c, _BREADCRUMBS),
        "DELLA": lambda c: _tuned(c, _DELLA),
        "model stock": lambda c: _plain(c, _MODEL_STOCK),
        "SLERP (2 models)": _slerp,
        "Fisher merging": _fisher,
        "RegMean": _regmean,
        # TSV-M: alpha = 1 as in the paper and FusionBench, no validation. Iso-C/Iso-CTS
        # and MagMax pick their scaling on validation data, as their papers do.
        "TSV-M": lambda c: _plain(c, _TSV, "rank 1/T per task, α=1"),
        "Iso-C": lambda c: _tuned(c, _ISO_C),
        "Iso-CTS": lambda c: _tuned(c, _ISO_CTS),
        "MagMax": lambda c: _tuned(c, _MAGMAX),
        "PCB (ratio 0.1)": lambda c: _tuned(c, _PCB),
        "WIDEN": lambda c: _plain(c, _WIDEN),
        "EMR (per-task masks)": _emr,
        "Reversible low-rank (per-task)": _reversible,
        "OPCM (sequential)": _opcm,
        "AdaMerging (task-wise)": lambda c: _learned.adamerging(c, granularity="task"),
        "AdaMerging (layer-wise)": lambda c: _learned.adamerging(c, granularity="layer"),
        "AdaMerging++ (layer-wise)": lambda c: _learned.adamerging(c, plus_plus=True),
        "aTLAS": lambda c: _learned.atlas(c, skip=VALIDATION_SIZE),
        "Neural Ligand (ensemble)": _learned.ligand_ensemble,
        "Neural Ligand (merge)": _learned.ligand_merge,
        "WEMoE (distinct inputs)": _learned.wemoe_distinct_inputs,
        "M2N2 (evolutionary)": lambda c: _learned.m2n2(c, size=VALIDATION_SIZE),
        "Twin-Merging (distinct inputs)": lambda c: _learned.twin_distinct_inputs(
            c, skip=VALIDATION_SIZE
        ),
        "Expert Merging": lambda c: _learned.expert_merging(c, skip=VALIDATION_SIZE),
        "logit ensemble (mean)": lambda c: _prediction_fusion(
            c, _argmax_of(fj.logits.mean_logits), "prediction level: one forward per model"
        ),
        "majority vote": lambda c: _prediction_fusion(
            c, fj.logits.majority_vote, "prediction level: one forward per model"
        ),
    }


def run_merging_suite(
    tb,
    *,
    methods: Sequence[str] | None = None,
    key: jax.Array | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[MethodResult]:
    """Evaluates pretrained, individual models and merging methods on a testbed.

    Args:
      tb: A :class:`fusionjax.testbed.Testbed`.
      methods: Names from :func:`default_methods` (default: all).
      key: PRNG key for the random methods (DARE, DELLA).
      progress: Optional callback, called with each method's name when it is done.

    Returns:
      Rows: ``pretrained``, ``individual`` (each fine-tuned model on its own task:
      the upper bound), then one per method.
    """
    table = default_methods()
    names = list(table) if methods is None else list(methods)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(table)}.")
    ctx = _Context(tb, jax.random.key(0) if key is None else key, _validation_accuracy(tb), {})
    pre = np.asarray(tb.evaluate(tb.pretrained), np.float64)
    rows = [MethodResult("pretrained", pre, "", 0.0)]
    individual = [float(np.asarray(tb.evaluate(ft))[i]) for i, ft in enumerate(tb.finetuned)]
    rows.append(MethodResult("individual (upper bound)", np.asarray(individual), "own task", 0.0))
    for name in names:
        start = time.perf_counter()
        params, note, *details = table[name](ctx)
        params = jax.block_until_ready(params)
        seconds = time.perf_counter() - start
        if isinstance(params, _learned.Scores):  # an ensemble or a per-input merge
            accs = np.asarray(params.accuracies, np.float64)
        else:
            accs = np.asarray(tb.evaluate(params), np.float64)
        if table[name] is _slerp:
            accs[[i for i in range(len(accs)) if i not in SLERP_TASKS]] = np.nan
            on = list(SLERP_TASKS)
            note += (
                f" (there: pretrained {100 * rows[0].average_over(on):.1f},"
                f" individual {100 * rows[1].average_over(on):.1f})"
            )
        rows.append(MethodResult(name, accs, note, seconds, details[0] if details else None))
        if progress is not None:
            progress(name)
    return rows


def format_table(task_names: Sequence[str], rows: Sequence[MethodResult]) -> str:
    """Formats rows as a fixed-width text table of accuracies in percent.

    Args:
      task_names: Column names, one per task.
      rows: Rows from :func:`run_merging_suite`.

    Returns:
      The table as one string.
    """
    width = max(len(r.name) for r in rows) + 2
    cols = [n.removeprefix("digits_")[:10] for n in task_names]
    head = "method".ljust(width) + "".join(c.rjust(11) for c in cols) + "      avg  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        accs = "".join("·".rjust(11) if np.isnan(a) else f"{100 * a:11.1f}" for a in r.accuracies)
        lines.append(f"{r.name.ljust(width)}{accs}{100 * r.average:9.1f}  {r.note}")
    return "\n".join(lines)


def format_coefficients(task_names: Sequence[str], coefficients: Any) -> str:
    """Formats learned merging coefficients as a table: one row per tensor, one column per task.

    Args:
      task_names: Column names, one per task.
      coefficients: Task-, layer- or block-wise coefficients (block-wise are averaged).

    Returns:
      The table as one string.
    """
    names, table = fj.learned.coefficient_table(coefficients)
    names = [n.replace("']['", ".").strip("[]'") for n in names]
    width = max(len(n) for n in names) + 2
    cols = [n.removeprefix("digits_")[:10] for n in task_names]
    lines = ["tensor".ljust(width) + "".join(c.rjust(11) for c in cols)]
    lines += [
        n.ljust(width) + "".join(f"{v:11.2f}" for v in row)
        for n, row in zip(names, table, strict=True)
    ]
    return "\n".join(lines)
