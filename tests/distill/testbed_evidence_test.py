"""Evidence on the knowledge testbed: the target distilled from fused teachers (FuseLLM).

Per seed, the byte-level target (the language testbed's small base) is trained on the
same distillation set (256 windows of general, code and docs training text each) for the
same steps with the same optimizer, under one loss, ``lam * CLM + (1 - lam) * fusion``,
where the fusion term is the cross-entropy to a mixture of the teachers' next-byte top-8
distributions with per-window weights:

* ``clm``: ``lam = 1`` (plain causal LM training);
* ``bpe[code]``, ``bpe[docs]``, ``byte``: one teacher (weight 1 on it);
* ``minCE``: the teacher with the lowest bits per byte on the window (FuseLLM's MinCE);
* ``avgCE``: teachers weighted by ``exp(-CE)`` (CE in nats per byte), FuseLLM's AvgCE.

Every run shares one compilation (the weights and ``lam`` are arrays of the data and of
the loss ``Partial``). Scored on held-out windows of every corpus in bits per byte.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.tree_util import Partial

from fusionjax import distill
from fusionjax.testbed import knowledge

LAM = 0.5
STEPS = 120
BATCH = 16
WINDOWS = 256
METHODS = ("clm", "bpe[code]", "bpe[docs]", "byte", "minCE", "avgCE")
_OPTIMIZER = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adam(optax.warmup_cosine_decay_schedule(0.0, 2e-3, 10, STEPS, 2e-4)),
)


def _apply(module, params, batch):
    return module.apply({"params": params}, batch["windows"])


def fusion_loss(logits, batch, *, lam):
    """``lam * CLM + (1 - lam) * CE(fused teachers, student)`` over counted positions."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, :-1]  # [B, L-1, V]
    gold = batch["windows"][:, 1:]
    clm = -jnp.mean(jnp.take_along_axis(lp, gold[..., None], axis=-1))
    where = batch["where"][:, :, :-1]  # [B, M, L-1]
    ids = batch["ids"][:, :, :-1]  # [B, M, L-1, k]
    q = jax.nn.softmax(batch["log_probs"][:, :, :-1], axis=-1)  # renormalised top-k
    q = jnp.where(ids >= 0, q, 0.0)
    w = batch["weights"][:, :, None] * where.astype(jnp.float32)  # [B, M, L-1]
    total = jnp.sum(w, axis=1)  # [B, L-1]
    full = jnp.broadcast_to(lp[:, None], (*ids.shape[:3], lp.shape[-1]))
    student = jnp.take_along_axis(full, jnp.maximum(ids, 0), axis=-1)  # [B, M, L-1, k]
    ce = -jnp.sum(q * student, axis=-1)  # [B, M, L-1]
    fused = jnp.sum(w * ce, axis=1) / jnp.where(total > 0, total, 1.0)
    counted = total > 0
    count = jnp.maximum(jnp.sum(counted), 1).astype(jnp.float32)
    fusion = jnp.sum(jnp.where(counted, fused, 0.0)) / count
    return lam * clm + (1.0 - lam) * fusion, (clm, fusion)


def method_weights(bits, method, names):
    """``[N, M]`` per-window teacher weights of a method."""
    n, m = bits.shape
    if method == "minCE":
        return np.eye(m, dtype=np.float32)[np.argmin(bits, axis=1)]
    if method == "avgCE":
        nats = bits * np.log(2.0)
        w = np.exp(-(nats - nats.min(1, keepdims=True)))
        return (w / w.sum(1, keepdims=True)).astype(np.float32)
    if method == "clm":
        return np.full((n, m), 1.0 / m, np.float32)
    return np.tile(np.eye(m, dtype=np.float32)[names.index(method)], (n, 1))


@pytest.fixture(scope="session")
def knowledge_runs(knowledge_testbeds):
    """``{seed: {method: {corpus: bits per byte}}}`` plus ``"teachers"`` rows and timings."""
    out = {}
    for seed, tb in knowledge_testbeds.items():
        t0 = time.perf_counter()
        data = tb.distillation_data(WINDOWS)
        names = tb.teacher_names()
        apply = Partial(_apply, tb.target_module)
        base = {c: float(np.mean(b)) for c, b in _base_bits(tb).items()}
        rows = {"base": base}
        timings = {"data": time.perf_counter() - t0}
        for method in METHODS:
            t0 = time.perf_counter()
            batch_data = {
                "windows": data["windows"],
                "ids": data["ids"],
                "log_probs": data["log_probs"],
                "where": data["where"],
                "weights": method_weights(data["bits"], method, names),
            }
            lam = 1.0 if method == "clm" else LAM
            res = distill.distill(
                apply,
                tb.base,
                batch_data,
                Partial(fusion_loss, lam=jnp.float32(lam)),
                optimizer=_OPTIMIZER,
                steps=STEPS,
                batch_size=BATCH,
                key=jax.random.key(seed),
            )
            rows[method] = tb.evaluate(res.params)
            timings[method] = time.perf_counter() - t0
        rows["_timings"] = timings
        out[seed] = rows
    return out


def _base_bits(tb):
    return {c: knowledge.window_bits_bytes(tb.target_module, tb.base, w) for c, w in tb.heldout.items()}


def _mean(row):
    return float(np.mean([row[c] for c in ("general", "code", "docs")]))


def test_print_table(knowledge_runs):
    for seed, rows in knowledge_runs.items():
        print(f"seed {seed}: timings {rows['_timings']}")
        for name, row in rows.items():
            if name.startswith("_"):
                continue
            print(f"  {name:<10}" + "".join(f"{row[c]:8.3f}" for c in row) + f"  mean {_mean(row):.3f}")


def test_avgce_fusion_beats_every_single_teacher_on_the_corpora_together(knowledge_runs):
    """Measured (mean bits per byte over general, code, docs; seeds 0/1/2): avgCE beats
    the best single teacher (always ``byte``) by 0.034 / 0.030 / 0.026; margin 0.02."""
    for seed, rows in knowledge_runs.items():
        for single in ("bpe[code]", "bpe[docs]", "byte"):
            assert _mean(rows["avgCE"]) < _mean(rows[single]) - 0.02, (seed, single, rows)


def test_fused_targets_learn_each_domain_from_its_teacher(knowledge_runs):
    """Both fusions beat the other BPE teacher's student on each domain (measured margins
    >= 0.22) and stay within 0.06 bits of the code teacher's student on code (measured
    0.012-0.043 behind it)."""
    for seed, rows in knowledge_runs.items():
        for fused in ("minCE", "avgCE"):
            assert rows[fused]["code"] < rows["bpe[docs]"]["code"] - 0.15, (seed, fused)
            assert rows[fused]["docs"] < rows["bpe[code]"]["docs"] - 0.15, (seed, fused)
            assert rows[fused]["code"] < rows["bpe[code]"]["code"] + 0.06, (seed, fused)


# Not asserted, because it does not reproduce here (see the report / module docstring):
# the fused target beating CLM alone. Measured mean bits per byte, seeds 0/1/2:
# clm 3.538/3.561/3.562, avgCE 3.541/3.568/3.573, minCE 3.572/3.591/3.602.
