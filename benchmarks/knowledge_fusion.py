"""Knowledge fusion: token alignment throughput, and the fused objective's cost per step.

Run: ``PYTHONPATH=. python benchmarks/knowledge_fusion.py [--gw-sizes 1024 4096 16384]
[--ott-timeout 300]``. Sections: token alignment; InfiGFusion's sorting-based GW against
ott-jax's entropic GW (:mod:`knowledge_fusion_gw`, ott in a child process with a time
limit); one distillation step of FuseLLM's objective against the plain CLM step (the last
line). Text: docstrings of stdlib
modules (ASCII), tokenized by a byte-level BPE trained here on the same text (Hugging Face
``tokenizers``) and by characters (the byte-level model's view). Each section is one
function returning its figures; :func:`main` prints them with the device.

Throughput counts the tokens of both sides per second of wall time (median of 3 runs after
a warm-up; the jax backend's compile time is reported separately). The plain Python DTW is
quadratic with a Python edit distance per cell, so it is timed on a 128-token prefix and
its per-cell rate is what the speed-up compares.
"""

import argparse
import functools
import inspect
import time

import jax
import jax.numpy as jnp
import knowledge_fusion_gw
import numpy as np
import optax

from fusionjax import distill
from fusionjax import zoo
from fusionjax._src import training


@functools.cache
def _text() -> str:
    import argparse
    import collections
    import json
    import logging
    import re
    import string
    import typing

    mods = (json, string, re, argparse, functools, collections, logging, typing, inspect)
    text = "\n\n".join(inspect.getdoc(m) for m in mods)
    return text.encode("ascii", "ignore").decode()


def _bpe(vocab_size: int):
    from tokenizers import Tokenizer
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, initial_alphabet=alphabet
    )
    tok.train_from_iterator([_text()], trainer)
    return tok


def _median(fn, repeats=3) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return sorted(runs)[len(runs) // 2]


def alignment_throughput(n_tokens: int = 2000, reference_tokens: int = 128) -> dict:
    """Token alignment: library DTW (host NumPy, jitted JAX) vs plain Python DTW.

    Args:
      n_tokens: BPE tokens on the source side (the target is the same text in characters,
        or in a second, larger BPE vocabulary).
      reference_tokens: Source tokens given to the plain Python DTW.

    Returns:
      A dict of figures per pairing, printed by :func:`main`.
    """
    small, large = _bpe(500), _bpe(2000)
    enc = small.encode(_text())
    src = enc.tokens[:n_tokens]
    end = enc.offsets[len(src) - 1][1]
    text = _text()[:end]
    pairings = {
        "BPE-500 vs characters": (src, list(text)),
        "BPE-500 vs BPE-2000": (src, large.encode(text).tokens),
    }
    out = {}
    for name, (s, t) in pairings.items():
        numpy_s = _median(lambda s=s, t=t: distill.align_tokens(s, t))
        t0 = time.perf_counter()
        distill.align_tokens(s, t, backend="jax")
        jax_first = time.perf_counter() - t0
        jax_s = _median(lambda s=s, t=t: distill.align_tokens(s, t, backend="jax"))
        # The plain reference on a prefix of both sides (same text span).
        ns = min(reference_tokens, len(s))
        frac = ns / len(s)
        nt = max(1, round(frac * len(t)))
        norm = distill.normalize_token
        ref_src, ref_tgt = [norm(x) for x in s[:ns]], [norm(x) for x in t[:nt]]
        t0 = time.perf_counter()
        distill.dtw_reference(ref_src, ref_tgt)
        ref_s = time.perf_counter() - t0
        cells, ref_cells = len(s) * len(t), ns * nt
        out[name] = dict(
            shape=(len(s), len(t)),
            numpy_tokens_per_s=(len(s) + len(t)) / numpy_s,
            numpy_s=numpy_s,
            jax_s=jax_s,
            jax_compile_s=jax_first - jax_s,
            reference_shape=(ns, nt),
            reference_s=ref_s,
            # The reference's time scaled to the full shape by its quadratic cell count.
            reference_tokens_per_s=(len(s) + len(t)) / (ref_s * cells / ref_cells),
        )
    return out


def _loop(step, state, batches):
    # A scan of `steps` updates: the timing is the loop's, not Python's dispatch.
    def body(carry, batch):
        params, opt_state = carry
        params, opt_state, loss = step(params, opt_state, batch)
        return (params, opt_state), loss

    return jax.lax.scan(body, state, batches)


def distillation_step_overhead(
    *,
    batch_size: int = 32,
    length: int = 64,
    teachers: int = 3,
    k: int = 10,
    steps: int = 20,
    repeats: int = 7,
) -> dict:
    """One training step of FuseLLM's fused objective against the plain CLM step.

    The student is the language testbed's small byte-level decoder (width 64, depth 2,
    vocabulary 256); both steps are Adam on ``batch_size`` windows of ``length`` tokens.
    The fused step also gets ``teachers`` top-``k`` teacher distributions per position
    (FuseLLM precomputes them offline and so does this), scores each teacher by its
    sequence cross-entropy on the labels, fuses them by MinCE and adds the fusion term:
    ``fusellm_loss(lam=0.9)``. Both run ``steps`` updates inside one ``lax.scan``, compiled
    first; the figure is the median of ``repeats`` timed runs of each, interleaved.

    Args:
      batch_size: Windows per step.
      length: Tokens per window.
      teachers: Number of teachers.
      k: Slots per teacher distribution.
      steps: Updates per timed run.
      repeats: Timed runs of each step.

    Returns:
      ``{"clm_ms": ..., "fused_ms": ..., "overhead": ...}`` per step.
    """
    module = zoo.Decoder(vocab_size=256, dim=64, depth=2, heads=4, mlp_width=256,
                         max_length=length)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 256, (steps, batch_size, length + 1)), jnp.int32)
    params = module.init(jax.random.key(0), tokens[0, :, :-1])["params"]
    optimizer = training.standard_promotion(optax.adam(1e-3))
    state = (params, optimizer.init(params))
    ids = jnp.asarray(rng.integers(0, 256, (steps, teachers, batch_size, length, k)), jnp.int32)
    lp = jax.nn.log_softmax(
        jnp.asarray(rng.normal(size=(steps, teachers, batch_size, length, k)), jnp.float32)
    )

    def clm_step(params, opt_state, batch):
        def loss(p):
            logits = module.apply({"params": p}, batch["tokens"][:, :-1])
            return distill.clm_loss(logits, batch["tokens"][:, 1:])

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    def fused_step(params, opt_state, batch):
        labels = batch["tokens"][:, 1:]
        top = distill.TopK(batch["ids"], batch["log_probs"])
        ce = distill.sequence_cross_entropy(top, labels, vocab_size=256)
        fused = distill.fuse_teachers(top, ce, method="min_ce")

        def loss(p):
            logits = module.apply({"params": p}, batch["tokens"][:, :-1])
            out = distill.fusellm_loss(logits, labels, fused, lam=0.9)
            return out.loss

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    runs = {}
    for name, step, batches in [
        ("clm", clm_step, {"tokens": tokens}),
        ("fused", fused_step, {"tokens": tokens, "ids": ids, "log_probs": lp}),
    ]:
        run = jax.jit(functools.partial(_loop, step))
        jax.block_until_ready(run(state, batches))  # compile and warm up
        runs[name] = (run, batches)
    times = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so a slow spell of the machine hits both
        for name, (run, batches) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run(state, batches))
            times[name].append(time.perf_counter() - t0)
    out = {f"{n}_ms": float(np.median(t)) / steps * 1e3 for n, t in times.items()}
    out["overhead"] = out["fused_ms"] / out["clm_ms"] - 1.0
    return out


def main(gw_sizes=(1024, 4096, 16384), ott_timeout: float = 300.0) -> None:
    """Runs every section and prints its figures; the last line is the fusion overhead."""
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    for name, r in alignment_throughput().items():
        speedup = r["numpy_tokens_per_s"] / r["reference_tokens_per_s"]
        print(
            f"align {name} {r['shape'][0]}x{r['shape'][1]} tokens: "
            f"numpy {r['numpy_s'] * 1e3:.0f} ms ({r['numpy_tokens_per_s']:,.0f} tokens/s), "
            f"jax {r['jax_s'] * 1e3:.0f} ms (+{r['jax_compile_s']:.2f} s compile), "
            f"plain Python DTW {r['reference_tokens_per_s']:,.0f} tokens/s "
            f"(measured {r['reference_s']:.2f} s at {r['reference_shape'][0]}x"
            f"{r['reference_shape'][1]}); speed-up {speedup:,.0f}x"
        )
    knowledge_fusion_gw.main(gw_sizes, ott_timeout)
    r = distillation_step_overhead()
    print(
        f"distillation step (batch 32 x 64 bytes, 3 teachers top-10, MinCE, lam 0.9): "
        f"CLM {r['clm_ms']:.2f} ms, fused {r['fused_ms']:.2f} ms"
    )
    print(f"fusion overhead per training step: {r['overhead'] * 100:.0f}%")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gw-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--ott-timeout", type=float, default=300.0)
    args = parser.parse_args()
    main(args.gw_sizes, args.ott_timeout)
