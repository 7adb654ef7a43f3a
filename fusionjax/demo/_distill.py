r"""Knowledge fusion on the knowledge testbed: the table ``fusionjax demo distill`` prints.

The setting of FuseLLM (Wan et al. 2024) on :mod:`fusionjax.testbed.knowledge`: three
teachers of different architectures and tokenizers (a BPE model per domain, a byte-level
general model), a byte-level target initialised from the small base. Every student is
trained from that base on the same distillation set (``windows`` training windows of the
general corpus and of each domain), for the same steps, with the same optimizer and
batches, under :func:`fusionjax.distill.fusellm_loss`,
:math:`\lambda\,\mathrm{CLM} + (1-\lambda)\,\mathrm{CE}(P^\star, q_\theta)`, where the
target :math:`P^\star` is:

* ``CLM only``: none (:math:`\lambda = 1`);
* ``teacher <name>``: one teacher's next-byte distributions;
* ``FuseLLM MinCE`` / ``FuseLLM AvgCE``: :func:`fusionjax.distill.fuse_teachers` over the
  three, weighted per window by each teacher's cross-entropy on it (its own bits per
  byte: the teachers tokenize differently, so per-token scores would not compare);
* ``FuseChat pair[d]``: FuseChat's first stage, MinCE over the pair (BPE teacher of
  domain ``d``, byte teacher) — one target per source, each sharing the pivot;
* ``FuseChat <merge>``: its second stage, the two pair targets merged into one with
  :func:`fusionjax.merging.varm` and :func:`fusionjax.merging.sce` (FuseChat v1 and v2)
  and, for comparison, task arithmetic (the average) and TIES.

The **vocabulary-free** rows need no vocabulary mapping, only positions: at row ``j``
(predicting byte ``j + 1``) each teacher's distribution over *its own* vocabulary at the
token row that predicts the token holding byte ``j + 1`` (the row the byte conversion
uses; the byte teacher's own next-byte distribution),
:meth:`fusionjax.testbed.knowledge.KnowledgeTestbed.token_targets`. Their objective is
:math:`\lambda\,\mathrm{CLM} + (1-\lambda)\,D` with the same :math:`\lambda` (the CLM
term over every position, as in the other rows; :math:`D` over the rows the teachers
hold):

* ``ULD (MinCE teacher)``: Universal Logit Distillation (Boizard et al. 2024) is a
  single-teacher loss; with three teachers, each window is distilled from the one
  FuseLLM's MinCE picks (lowest bits per byte on it). :math:`D` is
  :func:`fusionjax.distill.uld_distance` over the whole sorted vectors; the teacher's
  head keeps its 256 most likely tokens (:attr:`DistillSetup.uld_k`), as many as the
  student has bytes, so the student's gradient is exact (the tail only adds a constant);
* ``InfiFusion``: its unified form (Yan et al. 2025), :func:`fusionjax.distill.infifusion_loss`
  against all three teachers with equal weights, logits standardised (statistics over
  each whole vocabulary), top :math:`K = 64` (:attr:`DistillSetup.infifusion_k`),
  :math:`\tau = 1`; :math:`D` counts the rows every teacher holds;
* ``InfiGFusion``: InfiFusion's loss plus its graph-on-logits term (Wang et al. 2025),
  :math:`D + \gamma\,\mathrm{GLD}`: per window, each model's co-activation graph over
  its own top :math:`k = 32` channels (:func:`fusionjax.distill.coactivation_graph`,
  node activations the probabilities, on the rows every teacher holds), the student's
  compared with each teacher's by :func:`fusionjax.distill.sorted_gw`, averaged over
  teachers and windows. The paper combines GLD with token-level ULD and SFT without a
  weighting we could read, so :math:`\gamma` is set by one rule, not tuned: the two
  terms are equal at the initialisation (:math:`\gamma = D / \mathrm{GLD}` of the base
  over the whole distillation set). The BPE teachers' graphs are built from their
  ``uld_k = 256`` most likely tokens per row (renormalised over those; the rest of
  the vocabulary holds a few percent of the mass).

The teachers' heads are exact (computed from the full logits, normalised over the whole
vocabulary) and precomputed once, passed to the losses as
:class:`fusionjax.distill.TopK` (see :func:`fusionjax.distill.uld_teacher_targets`).

The teachers' distributions are precomputed once (as FuseLLM does): BPE teachers over
their whole vocabulary, converted to next-byte distributions by
:func:`fusionjax.distill.next_byte_distributions`, and the ``k`` most likely bytes kept.
Scores are held-out bits per byte of every corpus.

What costs time, and what is done about it: the students' training, one run per row (the
merges are free). Every run shares one compiled loop (:func:`fusionjax.distill.distill`
with a :class:`jax.tree_util.Partial` loss whose :math:`\lambda` is an array, targets of one
width), so the rows cost their steps only; the teachers' targets are computed once per
seed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

import fusionjax as fj
from fusionjax import distill
from fusionjax import merging
from fusionjax._src import training

_LN2 = float(np.log(2.0))


@dataclasses.dataclass(frozen=True)
class DistillSetup:
    r"""How every student of the table is trained.

    Attributes:
      windows: Training windows per corpus (general and each domain).
      k: Byte slots kept of each teacher distribution.
      steps: Optimizer steps of every student.
      batch_size: Windows per step.
      lam: :math:`\lambda`, the CLM share of the loss (``CLM only`` uses 1).
      learning_rate: Peak learning rate (10 warm-up steps, cosine decay to a tenth).
      uld_k: Slots of each teacher's head kept for ULD (its own vocabulary); at least the
        student's 256 bytes, so the ULD gradient is exact.
      infifusion_k: InfiFusion's :math:`K` (top-K of the standardised distributions).
      graph_k: InfiGFusion's graph size :math:`k` (channels per model and window).
    """

    windows: int = 256
    k: int = 32
    steps: int = 120
    batch_size: int = 16
    lam: float = 0.5
    learning_rate: float = 2e-3
    uld_k: int = 256
    infifusion_k: int = 64
    graph_k: int = 32


class DistillRow(NamedTuple):
    """One row of the table.

    Attributes:
      name: What the target was trained or built with.
      bits: ``{corpus: held-out bits per byte}``.
      losses: The training loss of every step (``None`` for teachers and merges).
      note: A short remark (e.g. the model's role).
    """

    name: str
    bits: dict[str, float]
    losses: np.ndarray | None
    note: str = ""


def mean_bits(row: DistillRow) -> float:
    """The mean of a row's bits per byte over the corpora.

    Args:
      row: A :class:`DistillRow`.

    Returns:
      The unweighted mean over its corpora.
    """
    return float(np.mean(list(row.bits.values())))


@functools.cache
def _optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
    # One object per (rate, steps): the compiled loop is keyed by it.
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, 10, steps, learning_rate / 10
    )
    return training.standard_promotion(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    )


def _apply(module, params, batch):
    return module.apply({"params": params}, batch["windows"])


def _loss(lam, logits, batch):
    # Row j of the logits and of the targets predicts byte j + 1.
    target = distill.TopK(batch["ids"][:, :-1], batch["log_probs"][:, :-1])
    out = distill.fusellm_loss(logits[:, :-1], batch["windows"][:, 1:], target, lam=lam)
    return out.loss, out


def _pad(top: distill.TopK, width: int) -> distill.TopK:
    extra = width - top.ids.shape[-1]
    pad = [(0, 0)] * (top.ids.ndim - 1) + [(0, extra)]
    ids = np.pad(np.asarray(top.ids), pad, constant_values=-1)
    lp = np.pad(np.asarray(top.log_probs), pad, constant_values=-np.inf)
    return distill.TopK(ids.astype(np.int32), lp.astype(np.float32))


def teacher_targets(tb, data: dict[str, np.ndarray]) -> tuple[distill.TopK, np.ndarray]:
    """The teachers' byte targets ``[M, N, L, k]`` (empty where masked) and CE ``[M, N]``.

    Args:
      tb: A :class:`fusionjax.testbed.knowledge.KnowledgeTestbed`.
      data: Its :meth:`distillation_data`.

    Returns:
      ``(TopK, ce)``: ``ce`` in nats per byte, each teacher's own score of each window.
    """
    where = np.moveaxis(data["where"], 1, 0)[..., None]
    ids = np.where(where, np.moveaxis(data["ids"], 1, 0), -1).astype(np.int32)
    lp = np.where(where, np.moveaxis(data["log_probs"], 1, 0), -np.inf).astype(np.float32)
    return distill.TopK(ids, lp), np.asarray(data["bits"].T * _LN2, np.float32)


def fused_targets(tb, data: dict[str, np.ndarray]) -> dict[str, tuple[distill.TopK, float]]:
    """``{row name: (target TopK [N, L, width], lam)}`` of every trained row.

    Args:
      tb: A :class:`fusionjax.testbed.knowledge.KnowledgeTestbed`.
      data: Its :meth:`distillation_data`.

    Returns:
      Targets padded to one width (so every run shares a compilation).
    """
    tops, ce = teacher_targets(tb, data)
    names = tb.teacher_names()
    width = len(names) * tops.ids.shape[-1]

    def fuse(members, method):
        idx = [names.index(n) for n in members]
        sub = distill.TopK(tops.ids[idx], tops.log_probs[idx])
        out = distill.fuse_teachers(sub, ce[idx], method=method)
        return distill.TopK(np.asarray(out.ids), np.asarray(out.log_probs))

    singles = {
        f"teacher {name}": (distill.TopK(tops.ids[m], tops.log_probs[m]), None)
        for m, name in enumerate(names)
    }
    # CLM only: lam = 1 gives the target no weight (any one keeps the shapes shared).
    out = {"CLM only": (singles[f"teacher {names[-1]}"][0], 1.0), **singles}
    out["FuseLLM MinCE"] = (fuse(names, "min_ce"), None)
    out["FuseLLM AvgCE"] = (fuse(names, "avg_ce"), None)
    for d in tb.domains:
        out[f"FuseChat pair[{d}]"] = (fuse([f"bpe[{d}]", "byte"], "min_ce"), None)
    return {n: (_pad(t, width), lam) for n, (t, lam) in out.items()}


def train_student(tb, data, target: distill.TopK, lam: float, setup: DistillSetup, key):
    r"""Trains one student from the target's base on ``data`` and ``target``.

    Args:
      tb: The knowledge testbed.
      data: Its :meth:`distillation_data`.
      target: ``TopK [N, L, width]`` next-byte targets.
      lam: The CLM share :math:`\lambda`.
      setup: The :class:`DistillSetup`.
      key: PRNG key of the batch draws (the same for every row of a seed).

    Returns:
      A :class:`fusionjax.distill.DistillOutput`.
    """
    batch = {"windows": data["windows"], "ids": target.ids, "log_probs": target.log_probs}
    return distill.distill(
        Partial(_apply, tb.target_module),
        tb.base,
        batch,
        Partial(_loss, jnp.float32(lam)),
        optimizer=_optimizer(setup.learning_rate, setup.steps),
        steps=setup.steps,
        batch_size=setup.batch_size,
        key=key,
    )


# ------------------------------------------------------------------ vocabulary-free rows


def _clm_term(logits, windows):
    return distill.clm_loss(logits[:, :-1], windows[:, 1:])


def _uld_loss(lam, logits, batch):
    # ULD (Boizard et al.): the full sorted vectors (the head holds >= 256 = the student's
    # vocabulary, so the student's gradient is exact), the MinCE-selected teacher.
    head = distill.TopK(jnp.zeros((), jnp.int32), batch["uld_lp"][:, :-1])  # ids unused
    d = distill.uld_distance(logits[:, :-1], head, where=batch["uld_where"][:, :-1])
    clm = _clm_term(logits, batch["windows"])
    return lam * clm + (1.0 - lam) * d, (clm, d)


def _infifusion_loss(lam, logits, batch):
    # InfiFusion (unified): ULD against every teacher, equal weights, top-K of the
    # standardised distributions (teachers' heads precomputed with the same settings).
    lp = batch["infi_lp"][:, :, :-1]  # [B, M, L-1, K]
    heads = [distill.TopK(jnp.zeros((), jnp.int32), lp[:, m]) for m in range(lp.shape[1])]
    where = jnp.all(batch["infi_where"][:, :, :-1], axis=1)
    out = distill.infifusion_loss(
        logits[:, :-1], batch["windows"][:, 1:], heads, where=where, k=lp.shape[-1],
        clm_weight=0.0, distill_weight=1.0,
    )
    clm = _clm_term(logits, batch["windows"])
    return lam * clm + (1.0 - lam) * out.distill, (clm, out.distill)


def _graph_term(logits, batch):
    # InfiGFusion's GLD: the student's co-activation graph of each window (its own top-k
    # byte channels) against each teacher's precomputed one, sorted GW, mean over the
    # teachers and the windows with a counted row.
    w = jnp.all(batch["infi_where"][:, :, :-1], axis=1)  # [B, L-1]
    graphs = batch["graphs"]  # [B, M, k, k]
    gs = distill.coactivation_graph(logits[:, :-1], k=graphs.shape[-1], where=w).graph
    per = distill.sorted_gw(jnp.broadcast_to(gs[:, None], graphs.shape), graphs)  # [B, M]
    counted = jnp.any(w, axis=-1).astype(per.dtype)
    return jnp.sum(per.mean(-1) * counted) / jnp.maximum(jnp.sum(counted), 1.0)


def _infigfusion_loss(lam, gamma, logits, batch):
    # InfiGFusion: InfiFusion's loss plus gamma times the graph term.
    _, (clm, d) = _infifusion_loss(lam, logits, batch)
    dist = d + gamma * _graph_term(logits, batch)
    return lam * clm + (1.0 - lam) * dist, (clm, dist)


def teacher_graphs(
    tb, heads: list[distill.TopK], where: np.ndarray, k: int, *, chunk: int = 64
) -> np.ndarray:
    """Every teacher's co-activation graph of every window, over its own vocabulary.

    Args:
      tb: The knowledge testbed.
      heads: Per teacher (order :meth:`teacher_names`), its raw head ``TopK [N, L, K]``
        over its own vocabulary (:meth:`token_targets`), ``-1`` ids on masked rows.
      where: ``[N, L]`` rows that count (every teacher holds them).
      k: Graph size.
      chunk: Windows per call.

    Returns:
      ``[N, M, k, k]`` float32 graphs (:func:`fusionjax.distill.coactivation_graph`, node
      activations the head's probabilities renormalised over its ``K`` tokens).
    """
    out = []
    for name, head in zip(tb.teacher_names(), heads, strict=True):
        vocab = 256 if name == "byte" else tb.teachers[name[4:-1]].module.vocab_size
        ids = np.asarray(head.ids)
        vals = np.where(np.isfinite(head.log_probs), head.log_probs, -1e4).astype(np.float32)
        graphs = []
        for i in range(0, len(ids), chunk):
            dense = np.full(ids[i : i + chunk].shape[:2] + (vocab,), -1e4, np.float32)
            np.put_along_axis(dense, np.maximum(ids[i : i + chunk], 0), vals[i : i + chunk], -1)
            g = distill.coactivation_graph(dense, k=k, where=where[i : i + chunk]).graph
            graphs.append(np.asarray(g))
        out.append(np.concatenate(graphs))
    return np.stack(out, 1)


def vocab_free_data(tb, data: dict[str, np.ndarray], setup: DistillSetup) -> dict[str, Any]:
    """The teachers' heads over their own vocabularies, at the byte positions of ``data``.

    Args:
      tb: The knowledge testbed.
      data: Its :meth:`distillation_data`.
      setup: The :class:`DistillSetup` (``uld_k``, ``infifusion_k``).

    Returns:
      ``{"uld_lp": [N, L, uld_k], "uld_where": [N, L]}`` — the head of each window's
      MinCE teacher (lowest bits per byte on it, as FuseLLM's MinCE picks) — and
      ``{"infi_lp": [N, M, L, K], "infi_where": [N, M, L]}``, every teacher's
      standardised head, and ``{"graphs": [N, M, graph_k, graph_k]}``, every teacher's
      co-activation graph of each window (:func:`teacher_graphs`).
    """
    names = tb.teacher_names()
    heads = [tb.token_targets(n, data["windows"], k=setup.uld_k) for n in names]
    best = np.argmin(data["bits"], axis=1)  # [N]
    n = np.arange(len(best))
    raw = np.stack([h.targets.log_probs for h in heads], 1)
    where = np.stack([h.where for h in heads], 1)
    kk = setup.infifusion_k
    std = np.stack([h.standardized.log_probs[..., :kk] for h in heads], 1)
    graphs = teacher_graphs(tb, [h.targets for h in heads], where.all(1), setup.graph_k)
    return {
        "uld_lp": np.ascontiguousarray(raw[n, best]),
        "uld_where": where[n, best],
        "infi_lp": np.ascontiguousarray(std),
        "infi_where": where,
        "graphs": graphs,
    }


VOCAB_FREE: dict[str, Callable] = {
    "ULD (MinCE teacher)": _uld_loss,
    "InfiFusion": _infifusion_loss,
    "InfiGFusion": _infigfusion_loss,
}
"""The vocabulary-free rows and their losses ``loss(lam, logits, batch)``."""


def train_vocab_free(tb, data, vf, name: str, setup: DistillSetup, key):
    r"""Trains one vocabulary-free student (as :func:`train_student`, its own loss).

    Args:
      tb: The knowledge testbed.
      data: Its :meth:`distillation_data`.
      vf: :func:`vocab_free_data`.
      name: A key of :data:`VOCAB_FREE`.
      setup: The :class:`DistillSetup`.
      key: PRNG key of the batch draws (the same for every row of a seed).

    Returns:
      A :class:`fusionjax.distill.DistillOutput`.
    """
    loss = VOCAB_FREE[name]
    keys = {
        _uld_loss: ("uld_lp", "uld_where"),
        _infifusion_loss: ("infi_lp", "infi_where"),
        _infigfusion_loss: ("infi_lp", "infi_where", "graphs"),
    }
    batch = {"windows": data["windows"], **{k: vf[k] for k in keys[loss]}}
    fn = Partial(loss, jnp.float32(setup.lam))
    if loss is _infigfusion_loss:
        fn = Partial(loss, jnp.float32(setup.lam), jnp.float32(graph_weight(tb, batch)))
    return distill.distill(
        Partial(_apply, tb.target_module),
        tb.base,
        batch,
        fn,
        optimizer=_optimizer(setup.learning_rate, setup.steps),
        steps=setup.steps,
        batch_size=setup.batch_size,
        key=key,
    )


def graph_weight(tb, batch: dict[str, np.ndarray], *, chunk: int = 128) -> float:
    r"""InfiGFusion's :math:`\gamma`: InfiFusion's distance over GLD, both of the base model.

    The rule that makes the two terms equal at the initialisation (see the module
    docstring), over the whole distillation set.

    Args:
      tb: The knowledge testbed.
      batch: ``windows``, ``infi_lp``, ``infi_where`` and ``graphs`` of every window.
      chunk: Windows per forward pass.

    Returns:
      :math:`\gamma`.
    """
    d = g = 0.0
    n = len(batch["windows"])
    for i in range(0, n, chunk):
        part = {k: jax.device_put(v[i : i + chunk]) for k, v in batch.items()}
        di, gi = _base_terms(tb.target_module, tb.base, part)
        share = len(part["windows"]) / n
        d += share * float(di)
        g += share * float(gi)
    return d / g


@functools.partial(jax.jit, static_argnums=0)
def _base_terms(module, params, part):
    """InfiFusion's distance and the graph term of ``params`` on one chunk (one compile)."""
    logits = _apply(module, params, part)
    _, (_, d) = _infifusion_loss(jnp.float32(1.0), logits, part)
    return d, _graph_term(logits, part)


MERGES: dict[str, Callable[[], Any]] = {
    "FuseChat VaRM": merging.varm,
    "FuseChat SCE": merging.sce,
    "task arithmetic (average)": lambda: merging.task_arithmetic(scaling=0.5),
    "TIES": lambda: merging.ties(density=0.2, scaling=1.0),
}
"""The second stage's merges of the pair targets (each a factory of a merger)."""


def distillation_rows(
    tb,
    setup: DistillSetup = DistillSetup(),
    *,
    progress: Callable[[str], None] | None = None,
) -> list[DistillRow]:
    """Every row of the table for one seed: teachers, base, students and merges.

    Args:
      tb: A :class:`fusionjax.testbed.knowledge.KnowledgeTestbed`.
      setup: How the students are trained.
      progress: Called with each row's name before it is computed.

    Returns:
      The rows, teachers first.
    """
    rows = [DistillRow(name, bits, None, "teacher") for name, bits in tb.bits_table().items()]
    rows[-1] = rows[-1]._replace(note="the target's initialisation")
    data = tb.distillation_data(setup.windows, k=setup.k)
    targets = fused_targets(tb, data)
    key = jax.random.key(tb.seed)
    students = {}
    for name, (target, lam) in targets.items():
        if progress is not None:
            progress(name)
        out = train_student(tb, data, target, setup.lam if lam is None else lam, setup, key)
        students[name] = out.params
        rows.append(DistillRow(name, tb.evaluate(out.params), np.asarray(out.losses)))
    vf = vocab_free_data(tb, data, setup)
    for name in VOCAB_FREE:
        if progress is not None:
            progress(name)
        out = train_vocab_free(tb, data, vf, name, setup, key)
        rows.append(DistillRow(name, tb.evaluate(out.params), np.asarray(out.losses),
                               "vocabulary-free"))
    pairs = [students[f"FuseChat pair[{d}]"] for d in tb.domains]
    for name, factory in MERGES.items():
        if progress is not None:
            progress(name)
        merged = fj.merge(tb.base, pairs, factory())
        rows.append(DistillRow(name, tb.evaluate(merged), None, "merge of the pair targets"))
    return rows


def format_distill_table(rows: list[DistillRow]) -> str:
    """The rows as a text table of bits per byte, with the mean over the corpora.

    Args:
      rows: :class:`DistillRow` s (one seed).

    Returns:
      The table.
    """
    corpora = list(rows[0].bits)
    head = f"{'model':<28}" + "".join(f"{c:>9}" for c in corpora) + f"{'mean':>9}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r.bits[c]:>9.3f}" for c in corpora)
        lines.append(f"{r.name:<28}{cells}{mean_bits(r):>9.3f}  {r.note}")
    return "\n".join(lines)
