"""Tokens per second of fused decoding: the jitted loop against its parts and a Python loop.

Models (``fusionjax.zoo.Decoder``, vocabulary 256, random weights): one *strong* model (dim
256, depth 4, MLP 1024) and ``E`` small *experts* (dim 64, depth 2, MLP 256) stacked into one
group. The strong model reads a 16-token prompt, the experts a 24-token one (their own
"chat-formatted" prompt); every row generates ``--tokens`` tokens (a stop id that never
occurs is set, so every run does the same number of steps). For E = 1, 2, 4 and batch 1, 8:

* ``fused``: :func:`fusionjax.decoding.generate` with the rule in ``RULES`` (proxy-tuning's
  expert term averaged over the experts,
  ``log_softmax(s + mean_e log_softmax(x_e))``);
* ``forwards only``: the same loop and members, the rule replaced by the strong model's
  logits (plus ``0 * sum_e x_e``, so XLA keeps the experts' forwards it would otherwise
  drop as dead code): the difference to ``fused`` is the cost of fusing;
* ``strong alone``: the strong model decoding by itself in the same loop;
* ``python loop``: a plain decoder doing the fused work with a jitted forward per model
  (each expert its own call, its cache donated), the rule and ``argmax`` as eager jnp ops,
  and a host check of the stop flags every step;
* ``python loop, no donation`` (E = 2, batch 8 only): the same without ``donate_argnums``.

Each variant is compiled by a first call (reported: *compile s*, first call minus a warm
call), then timed as the best of ``--repeats`` warm calls ending in ``block_until_ready``
(on a shared machine, contention only adds time). The last two lines give the fusion
overhead over the forwards and the speedup of the jitted loop over the Python loop, both at
E = 2, batch 8. To add a fusion rule, add it to ``RULES``: it gets its own ``fused`` rows
(and may return ``(log_probs, aux)``). Before the last two lines, Dynamic Logit Fusion's
exact solver against the paper's grid at V = 32k and 128k (:mod:`logits_dlf`).

Usage::

    python benchmarks/fused_decoding.py                # ~2-3 min on 2 CPU cores
    python benchmarks/fused_decoding.py --tokens 64 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import logits_dlf  # noqa: E402  (benchmarks/logits_dlf.py, next to this file)
import numpy as np  # noqa: E402

import fusionjax as fj  # noqa: E402
from fusionjax import decoding  # noqa: E402
from fusionjax import zoo  # noqa: E402

VOCAB = 256
STRONG = dict(vocab_size=VOCAB, dim=256, depth=4, heads=4, mlp_width=1024, max_length=128)
EXPERT = dict(vocab_size=VOCAB, dim=64, depth=2, heads=4, mlp_width=256, max_length=128)
STRONG_PROMPT, EXPERT_PROMPT = 16, 24
NEVER = VOCAB + 1  # a stop id no model produces


def proxy_mean(logits):
    """Proxy-tuning's expert term averaged over the stacked experts ``[E, B, V]``."""
    strong, experts = logits
    return jax.nn.log_softmax(strong + jnp.mean(jax.nn.log_softmax(experts), axis=0))


RULES = {"proxy mean": proxy_mean}  # name -> fuse(logits) -> log_probs | (log_probs, aux)


def forwards_only(logits):
    """The strong model's logits; the experts' stay live through a zero-weighted sum."""
    strong, experts = logits
    return strong + 0.0 * jnp.sum(experts, axis=0)


def strong_only(logits):
    """The strong model's logits."""
    return logits[0]


def _models(num_experts):
    strong, small = zoo.Decoder(**STRONG), zoo.Decoder(**EXPERT)
    x = jnp.zeros((1, 4), jnp.int32)
    strong_vars = jax.jit(strong.init)(jax.random.key(0), x)
    init = jax.jit(small.init)
    experts = [init(jax.random.key(i + 1), x) for i in range(num_experts)]
    return strong, strong_vars, small, experts


def _time(fn, repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - start)
    run = min(runs)  # best of: the machine is shared, and contention only ever adds time
    return max(first - statistics.median(runs), 0.0), run


def _python_loop(strong, small, num_tokens, donate):
    """A plain decoder: a jitted forward per model, everything else eager, in Python."""
    donate_args = (2,) if donate else ()
    strong_fwd = jax.jit(
        lambda v, t, c, p: strong.apply(v, t, p, c, method="decode"), donate_argnums=donate_args
    )
    small_fwd = jax.jit(
        lambda v, t, c, p: small.apply(v, t, p, c, method="decode"), donate_argnums=donate_args
    )

    def run(strong_vars, experts, strong_prompt, expert_prompt, fuse, stop_tokens):
        b = strong_prompt.shape[0]
        ps, pe = strong_prompt.shape[1], expert_prompt.shape[1]
        caches = [strong.init_cache(b, ps + num_tokens)]
        caches += [small.init_cache(b, pe + num_tokens) for _ in experts]
        pos_s = jnp.broadcast_to(jnp.arange(ps), strong_prompt.shape)
        pos_e = jnp.broadcast_to(jnp.arange(pe), expert_prompt.shape)
        logits, caches[0] = strong_fwd(strong_vars, strong_prompt, caches[0], pos_s)
        outs = [logits[:, -1]]
        for i, ev in enumerate(experts):
            logits, caches[i + 1] = small_fwd(ev, expert_prompt, caches[i + 1], pos_e)
            outs.append(logits[:, -1])
        stops = jnp.asarray(stop_tokens)
        tokens, done = [], jnp.zeros((b,), bool)
        for step in range(num_tokens):
            out = fuse([outs[0], jnp.stack(outs[1:])])
            log_probs = out[0] if isinstance(out, tuple) else out
            token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
            tokens.append(jnp.where(done, 0, token))
            done = done | jnp.isin(token, stops)
            if bool(jnp.all(done)) or step == num_tokens - 1:
                break
            t = token[:, None]
            logits, caches[0] = strong_fwd(strong_vars, t, caches[0], pos_s[:, -1:] + step + 1)
            outs = [logits[:, -1]]
            for i, ev in enumerate(experts):
                pos = pos_e[:, -1:] + step + 1
                logits, caches[i + 1] = small_fwd(ev, t, caches[i + 1], pos)
                outs.append(logits[:, -1])
        return jnp.stack(tokens, axis=1)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    n = args.tokens
    print(
        f"{datetime.date.today()}  {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus, jax {jax.__version__}, device {jax.devices()[0]}; "
        f"{n} new tokens, best of {args.repeats}"
    )
    strong, strong_vars, small, all_experts = _models(max(args.experts))
    strong_model, small_model = decoding.from_linen(strong), decoding.from_linen(small)
    rng = np.random.default_rng(0)
    rows, results = [], {}
    loops = {d: _python_loop(strong, small, n, d) for d in (True, False)}
    for b in args.batches:
        sp = jnp.asarray(rng.integers(0, VOCAB, (b, STRONG_PROMPT)), jnp.int32)
        ep = jnp.asarray(rng.integers(0, VOCAB, (b, EXPERT_PROMPT)), jnp.int32)
        kw = dict(max_new_tokens=n, stop_tokens=(NEVER,))
        alone = [decoding.Member(strong_model, strong_vars, sp)]

        def fn(alone=alone, kw=kw):
            return decoding.generate(alone, strong_only, **kw)

        compile_s, run_s = _time(fn, args.repeats)
        results[("strong alone", 0, b)] = run_s
        rows.append(("strong alone", "-", b, compile_s, run_s))
        for e in args.experts:
            experts = all_experts[:e]
            members = alone + [decoding.Member(small_model, fj.stack(experts), ep, stacked=True)]
            variants = {f"fused: {name}": rule for name, rule in RULES.items()}
            variants["forwards only"] = forwards_only
            for name, rule in variants.items():

                def fn(rule=rule, members=members, kw=kw):
                    return decoding.generate(members, rule, **kw)

                compile_s, run_s = _time(fn, args.repeats)
                results[(name, e, b)] = run_s
                rows.append((name, e, b, compile_s, run_s))
            donations = (True, False) if (e, b) == (2, 8) else (True,)
            for donate in donations:
                name = "python loop" + ("" if donate else ", no donation")

                def fn(loop=loops[donate], experts=experts, sp=sp, ep=ep):
                    return loop(strong_vars, experts, sp, ep, proxy_mean, (NEVER,))

                compile_s, run_s = _time(fn, args.repeats)
                results[(name, e, b)] = run_s
                rows.append((name, e, b, compile_s, run_s))
    first_rule = f"fused: {next(iter(RULES))}"
    print()
    print("| variant | E | batch | compile s | run ms | tokens/s | vs fused |")
    print("|---|---|---|---|---|---|---|")
    for name, e, b, compile_s, run_s in rows:
        ref = results.get((first_rule, e, b))
        ratio = f"{run_s / ref:.2f}x time" if ref and name != first_rule else ""
        print(
            f"| {name} | {e} | {b} | {compile_s:.1f} | {run_s * 1e3:.1f} | "
            f"{b * n / run_s:,.0f} | {ratio} |"
        )
    key = (2, 8)
    fused, fwd = results[(first_rule, *key)], results[("forwards only", *key)]
    python = results[("python loop", *key)]
    print()
    by_batch = []
    for b in args.batches:
        ratios = [
            f"E={e} {results[('python loop', e, b)] / results[(first_rule, e, b)]:.1f}x"
            for e in args.experts
        ]
        by_batch.append(f"batch {b}: " + ", ".join(ratios))
    print("jitted loop vs python loop by config: " + "; ".join(by_batch))
    print(
        f"at E=2, batch 8 the forwards alone take {100 * fwd / python:.0f}% of the python "
        f"loop's time, which bounds the speedup there by {python / fwd:.1f}x"
    )
    print("\nDynamic Logit Fusion's alpha, exact solver vs the paper's grid (8 positions):")
    logits_dlf.main(batches=(8,))
    print(f"fusion overhead over the forwards: {100 * (fused - fwd) / fwd:.0f}%")
    print(f"jitted loop vs python loop: {python / fused:.1f}x")


if __name__ == "__main__":
    main()
