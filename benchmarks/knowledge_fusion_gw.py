"""InfiGFusion's sorted Gromov–Wasserstein against ott-jax's entropic GW, n = 1k, 4k, 16k.

Run: ``PYTHONPATH=. python benchmarks/knowledge_fusion_gw.py [--sizes 1024 4096 16384]
[--ott-timeout 300]``. For each graph size ``n`` it reports, on this device, compile time
and the median time per call after compiling (3 runs) of

* :func:`fusionjax.distill.sorted_gw` (degree sort + one ``n x n`` gather and reduction);
* ott-jax's entropic GW solver (``epsilon=1e-2`` on max-scaled graphs, at most 20 outer
  iterations of at most 200 Sinkhorn steps each: a fixed budget, so its time is an
  honest lower bound of a converged solve), its plan scored by
  :func:`fusionjax.distill.gw_cost` on the same scale as the sorted cost.

Each ott size runs in a child process with a wall-clock limit (``--ott-timeout``), so a
size that does not fit in memory or time is reported as such instead of stopping the run.
The graphs are co-activation-like: ``G = ZᵀZ / L`` for ``Z [64, n]`` random non-negative
activations, the teacher a node-permuted copy with 10 % multiplicative noise.

Functions plus :func:`main`; the lead folds it into ``benchmarks/knowledge_fusion.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp

from fusionjax import distill

SIZES = (1024, 4096, 16384)


def make_graphs(n: int, seed: int = 0, *, length: int = 64, noise: float = 0.1):
    """A pair of ``[n, n]`` co-activation-like graphs (student, noisy relabelled teacher)."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    z = jax.random.uniform(k1, (length, n)) ** 4  # a few strong channels per position
    a = jnp.einsum("ti,tj->ij", z, z) / length
    perm = jax.random.permutation(k2, n)
    e = jax.random.normal(k3, (n, n))
    b = a[perm][:, perm] * (1.0 + noise * (e + e.T) / 2)
    scale = jnp.max(a)
    return jax.block_until_ready((a / scale, b / scale))


def _time(fn, *args, repeats: int = 3):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t0)
    return compile_s, sorted(runs)[len(runs) // 2], out


def time_sorted(n: int) -> dict:
    """Compile and run time of :func:`fusionjax.distill.sorted_gw` at size ``n``."""
    a, b = make_graphs(n)
    compile_s, run_s, cost = _time(jax.jit(distill.sorted_gw), a, b)
    return {"n": n, "compile_s": compile_s, "run_s": run_s, "cost": float(cost)}


def time_ott(n: int, *, epsilon: float = 1e-2, outer: int = 20, inner: int = 200) -> dict:
    """Compile and run time of ott-jax's entropic GW at size ``n`` (fixed iteration budget)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="JAXopt is no longer maintained", category=DeprecationWarning
        )
        from ott.geometry import geometry
        from ott.problems.quadratic import quadratic_problem
        from ott.solvers.linear import sinkhorn
        from ott.solvers.quadratic import gromov_wasserstein

    solver = gromov_wasserstein.GromovWasserstein(
        sinkhorn.Sinkhorn(max_iterations=inner), epsilon=epsilon, max_iterations=outer
    )

    @jax.jit
    def solve(a, b):
        prob = quadratic_problem.QuadraticProblem(
            geometry.Geometry(cost_matrix=a), geometry.Geometry(cost_matrix=b)
        )
        out = solver(prob)
        return distill.gw_cost(a, b, out.matrix), out.converged

    a, b = make_graphs(n)
    compile_s, run_s, (cost, converged) = _time(solve, a, b)
    return {"n": n, "compile_s": compile_s, "run_s": run_s, "cost": float(cost),
            "converged": bool(converged)}


def ott_in_child(n: int, timeout_s: float) -> dict:
    """:func:`time_ott` in a child process with a wall-clock limit; failures are reported."""
    cmd = [sys.executable, __file__, "--ott-child", str(n)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"n": n, "error": f"did not finish in {timeout_s:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"n": n, "error": f"failed (exit {done.returncode}): {tail[:160]}"}
    return json.loads(lines[-1])


def main(sizes=SIZES, ott_timeout: float = 300.0) -> list[dict]:
    """Prints one line per size: sorted GW and ott's entropic GW, time per call and cost."""
    print(f"device: {jax.devices()[0].device_kind}")
    rows = []
    for n in sizes:
        s = time_sorted(n)
        o = ott_in_child(n, ott_timeout)
        if "error" in o:
            ott_text = f"ott entropic GW {o['error']}"
        else:
            ott_text = (
                f"ott entropic GW {o['run_s'] * 1e3:.1f} ms (compile {o['compile_s']:.1f} s, "
                f"converged {o['converged']}), cost {o['cost']:.4g}; "
                f"ott/sorted time {o['run_s'] / s['run_s']:.0f}x"
            )
        print(f"n={n}: sorted GW {s['run_s'] * 1e3:.2f} ms (compile {s['compile_s']:.2f} s), "
              f"cost {s['cost']:.4g}; {ott_text}")
        rows.append({"sorted": s, "ott": o})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--ott-timeout", type=float, default=300.0)
    parser.add_argument("--ott-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ott_child is not None:
        print(json.dumps(time_ott(args.ott_child)))
    else:
        main(args.sizes, args.ott_timeout)
