"""Time per layer-wise AdaMerging step: compiled loop vs a jitted step vs eager.

Two models, each with 8 tasks of 16 unlabeled inputs per step (AdaMerging's setting):

* ``testbed``: the digits testbed (64-512-512-128 MLP encoder, 0.36 M parameters, fixed
  cosine heads), seed 0;
* ``synthetic``: a 50 M parameter MLP encoder (1024 -> 2048 x 12 -> 1024, GELU) with 8
  random fine-tunes (base + 1e-3 noise) and random 10-class heads; inputs are Gaussian.

Each (model, implementation) pair runs in a fresh subprocess (so its peak RSS is its own):

* ``loop``: :func:`fusionjax.learned.fit_coefficients`' compiled loop (``chunk`` steps per
  call in a ``lax.fori_loop``), timed over ``--steps`` steps after a warm-up call;
* ``jit-step``: a ``jax.jit``-ed step called from a Python loop (what a hand-written optax
  loop does), same step;
* ``eager``: the same step op by op (``jit=False``), the naive reference.

Reported: compile seconds (first call minus a warm call), ms per step, speedup over eager,
peak RSS, and how much it grew while stepping (above the RSS once the inputs, base + stacked
task vectors + data, were built). Usage::

    python benchmarks/adamerging_step.py                       # both models
    python benchmarks/adamerging_step.py --models testbed --steps 200
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_TASKS = 8
BATCH = 16
SYN_WIDTHS = (1024,) + (2048,) * 12 + (1024,)
SYN_CLASSES = 10
SYN_POOL = 256


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _synthetic():
    import jax
    import jax.numpy as jnp

    key = jax.random.key(0)
    base = {}
    for i, (a, b) in enumerate(zip(SYN_WIDTHS[:-1], SYN_WIDTHS[1:], strict=False)):
        k = jax.random.fold_in(key, i)
        base[f"Dense_{i}"] = {
            "kernel": jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a),
            "bias": jnp.zeros((b,), jnp.float32),
        }
    fts = []
    for t in range(NUM_TASKS):
        kt = jax.random.fold_in(key, 1000 + t)
        leaves, treedef = jax.tree.flatten(base)
        fts.append(
            treedef.unflatten(
                [
                    x + 1e-3 * jax.random.normal(jax.random.fold_in(kt, j), x.shape)
                    for j, x in enumerate(leaves)
                ]
            )
        )
    heads = [
        jax.random.normal(jax.random.fold_in(key, 2000 + t), (SYN_WIDTHS[-1], SYN_CLASSES)) / 32
        for t in range(NUM_TASKS)
    ]
    data = [
        np.asarray(jax.random.normal(jax.random.fold_in(key, 3000 + t), (SYN_POOL, SYN_WIDTHS[0])))
        for t in range(NUM_TASKS)
    ]
    n = len(SYN_WIDTHS) - 1

    def logits_fn(params, t, x):
        for i in range(n):
            x = x @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"][None]
            if i < n - 1:
                x = jax.nn.gelu(x)
        return x @ heads[t]

    return base, fts, data, logits_fn


def _testbed():
    from fusionjax import testbed

    tb = testbed.load(seed=0)
    return tb.pretrained, list(tb.finetuned), [t.x_test for t in tb.tasks], tb.logits


def child(model: str, impl: str, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.tree_util import Partial

    import fusionjax as fj
    from fusionjax._src import training
    from fusionjax.learned import _loop

    base, fts, data, logits_fn = _synthetic() if model == "synthetic" else _testbed()
    tvs = fj.learned.stacked_task_vectors(base, fts)
    del fts
    jax.block_until_ready(tvs)
    coef = fj.learned.init_coefficients(tvs, granularity="layer")
    num_params = sum(int(np.size(x)) for x in jax.tree.leaves(base))
    input_gb = (
        sum(x.nbytes for x in jax.tree.leaves(base))
        + sum(x.nbytes for x in jax.tree.leaves(tvs))
        + sum(x.nbytes for x in data)
    ) / 2**30
    opt = training.standard_promotion(optax.adam(1e-3))
    state = opt.init(coef)
    step = Partial(_loop._step, fj.learned.adamerging_loss, logits_fn, opt, BATCH, (0.0, 1.0))
    key = jax.random.key(0)
    rss_ready = _rss_gb()

    if impl == "loop":
        run = training.compiled_chunk(step, steps)

        def go(c, s):
            return run(jnp.asarray(0), jnp.asarray(steps), c, s, (key, base, tvs, None, data))

        n = steps
    elif impl == "jit-step":
        jstep = jax.jit(step)

        def go(c, s):
            for i in range(steps):
                c, s, _ = jstep(jnp.asarray(i), c, s, key, base, tvs, None, data)
            return c, s

        n = steps
    else:
        n = max(2, steps // 10)

        def go(c, s):
            for i in range(n):
                c, s, _ = step(jnp.asarray(i), c, s, key, base, tvs, None, data)
            return c, s

    t0 = time.perf_counter()
    jax.block_until_ready(go(coef, state))
    first = time.perf_counter() - t0
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        jax.block_until_ready(go(coef, state))
        times.append(time.perf_counter() - t0)
    warm = min(times)
    return {
        "model": model,
        "impl": impl,
        "params_m": num_params / 1e6,
        "steps_timed": n,
        "ms_per_step": 1e3 * warm / n,
        "compile_s": max(first - warm, 0.0),
        "peak_rss_gb": _rss_gb(),
        "input_gb": input_gb,
        "rss_ready_gb": rss_ready,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["testbed", "synthetic"])
    parser.add_argument("--impls", nargs="*", default=["loop", "jit-step", "eager"])
    parser.add_argument("--steps", type=int, default=100, help="steps timed (eager: a tenth)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.steps)))
        return

    import jax

    print(
        f"{datetime.date.today()}  {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, "
        f"jax {jax.__version__}, device {jax.devices()[0].platform}"
    )
    records = []
    for model in args.models:
        steps = args.steps if model == "testbed" else max(args.steps // 10, 5)
        for impl in args.impls:
            out = subprocess.run(
                [sys.executable, __file__, "--child", model, impl, "--steps", str(steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            records.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = records[-1]
            print(
                f"{model:9s} {r['params_m']:6.1f}M  {impl:8s}  {r['ms_per_step']:9.2f} ms/step  "
                f"compile {r['compile_s']:5.1f}s  peak RSS {r['peak_rss_gb']:.2f} GB, "
                f"+{r['peak_rss_gb'] - r['rss_ready_gb']:.2f} GB while stepping "
                f"(inputs {r['input_gb']:.2f} GB)",
                flush=True,
            )
    print()
    for model in args.models:
        by = {r["impl"]: r for r in records if r["model"] == model}
        if "eager" in by:
            for impl in ("loop", "jit-step"):
                if impl in by:
                    print(
                        f"{model}: {impl} is "
                        f"{by['eager']['ms_per_step'] / by[impl]['ms_per_step']:.1f}x "
                        "faster than eager"
                    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
