"""Git Re-Basin weight matching: fusionjax vs a plain NumPy + scipy implementation.

Pairs (two independent random initialisations each, flax linen variables):

* ``mlp``: :class:`fusionjax.zoo.MLP` 784-512-512-512-10, spec
  :func:`fusionjax.alignment.mlp_spec` (3 groups of 512 units);
* ``resnet20``: :class:`fusionjax.zoo.ResNet` (``blocks=3``, ResNet-20-like, BatchNorm),
  spec :func:`fusionjax.alignment.resnet_spec` (12 groups of 16/32/64 x ``width`` units;
  params and batch statistics).

For each pair, every implementation runs to convergence (``max_iter=100``) from the
identity with the same key, hence the same visiting order in every sweep:

* ``fusionjax scipy``: :func:`fusionjax.alignment.weight_matching`, ``solver="scipy"``
  (host loop: compiled cost matrices, cached and low-rank-updated contributions, skipped
  unchanged groups, scipy LAP on the reduced matrix);
* ``fusionjax hungarian``: ``solver="hungarian"`` (the whole loop compiled);
* ``reference``: the paper's Algorithm 1 in NumPy + scipy (float32 matmuls, one
  ``linear_sum_assignment`` per visit, stop after a sweep without progress), run twice:
  with NumPy's default BLAS threads and with one BLAS thread (``threadpoolctl``), since
  OpenBLAS's two threads were several times slower than one on this shared 2-core VM.

Reported: compile seconds (first call minus warm), warm seconds to convergence (best of
``--repeats``), sweeps and LAP solves, the objective (every result is scored by the same
function) and whether the permutations equal the reference's. Then the time of a jitted
:class:`ott.solvers.linear.sinkhorn.Sinkhorn` between ``n`` random 512-d points (the
soft-matching step of OT fusion) for n = 512 ... 4096. The last line is the MLP speedup of
the faster fusionjax solver over the faster reference, warm. Usage::

    python benchmarks/weight_matching.py             # ~2-4 min on 2 cores
    python benchmarks/weight_matching.py --quick     # 1 repeat, Sinkhorn up to 2048
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MAX_ITER = 100


def reference_weight_matching(groups, ref, other, orders, max_iter=MAX_ITER):
    """Ainsworth et al.'s Algorithm 1, eagerly, in NumPy + scipy (no caching, no skipping).

    Args:
      groups: ``{group: [(path, axis), ...]}``.
      ref: ``{path: float32 ndarray}``, the model matched to.
      other: The same for the model whose units are permuted.
      orders: ``[max_iter, G]`` group visiting order per sweep.
      max_iter: Maximum sweeps.

    Returns:
      ``(perms, sweeps, solves)``.
    """
    import scipy.optimize

    names = list(groups)
    axes_of = {}
    for g, entries in groups.items():
        for path, axis in entries:
            axes_of.setdefault(path, {})[axis % ref[path].ndim] = g
    sizes = {g: ref[e[0][0]].shape[e[0][1]] for g, e in groups.items()}
    perm = {g: np.arange(n) for g, n in sizes.items()}
    solves = 0
    for it in range(max_iter):
        progress = False
        for gi in orders[it]:
            g = names[gi]
            n = sizes[g]
            cost = np.zeros((n, n), np.float32)
            for path, axis in groups[g]:
                axis %= ref[path].ndim
                w_a = np.moveaxis(ref[path], axis, 0).reshape(n, -1)
                w_b = other[path]
                for ax, h in axes_of[path].items():
                    if ax != axis:
                        w_b = np.take(w_b, perm[h], axis=ax)
                w_b = np.moveaxis(w_b, axis, 0).reshape(n, -1)
                cost += w_a @ w_b.T
            _, cols = scipy.optimize.linear_sum_assignment(cost, maximize=True)
            rows = np.arange(n)
            old = cost[rows, perm[g]].sum(dtype=np.float64)
            new = cost[rows, cols].sum(dtype=np.float64)
            progress = progress or new > old + 1e-12
            perm[g] = cols
            solves += 1
        if not progress:
            break
    return perm, it + 1, solves


def make_pair(name: str, width: int):
    """``(spec, a, b)``: two random initialisations of the named model (linen variables)."""
    import jax
    import jax.numpy as jnp

    from fusionjax import alignment
    from fusionjax import zoo

    if name == "mlp":
        model = zoo.MLP(widths=(512, 512, 512), num_classes=10)
        x = jnp.zeros((1, 784))
        spec = alignment.mlp_spec(3)
    else:
        model = zoo.ResNet(blocks=3, width=width)
        x = jnp.zeros((1, 32, 32, 3))
        spec = alignment.resnet_spec(3)
    a = model.init(jax.random.key(1), x)
    b = model.init(jax.random.key(2), x)
    # Random batch statistics, so that they are not identical in both models.
    if "batch_stats" in a:
        a, b = (
            {
                "params": v["params"],
                "batch_stats": jax.tree.map(
                    lambda s, k=k: s + 0.1 * jax.random.uniform(jax.random.key(k), s.shape),
                    v["batch_stats"],
                ),
            }
            for k, v in ((3, a), (4, b))
        )
    return spec, a, b


def run_pair(name, width, repeats, solvers):
    """Times every implementation on one pair; returns ``(group sizes, table rows)``."""
    import jax
    import threadpoolctl

    from fusionjax.alignment import _weight_matching as wm
    from fusionjax.alignment._spec import leaf_paths

    spec, a, b = make_pair(name, width)
    key = jax.random.key(0)
    sizes = spec.sizes(a)
    rows = []
    results = {}
    for solver in solvers:
        t0 = time.perf_counter()
        out, stats = wm._weight_matching(
            spec, a, b, max_iter=MAX_ITER, key=key, init_permutations=None, solver=solver
        )
        jax.block_until_ready(out.permutations)
        first = time.perf_counter() - t0
        warm = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out, stats = wm._weight_matching(
                spec, a, b, max_iter=MAX_ITER, key=key, init_permutations=None, solver=solver
            )
            jax.block_until_ready((out.permutations, out.objective))
            warm.append(time.perf_counter() - t0)
        results[solver] = out
        rows.append(
            dict(
                impl=f"fusionjax {solver}",
                compile_s=max(first - min(warm), 0.0),
                warm_s=min(warm),
                sweeps=stats.sweeps,
                solves=stats.solves,
                objective=float(out.objective),
                perms={k: np.asarray(v) for k, v in out.permutations.items()},
                detail=(
                    f"cost {stats.cost_s / max(stats.solves, 1) * 1e3:.1f} + LAP "
                    f"{stats.lap_s / max(stats.solves, 1) * 1e3:.1f} ms/solve, "
                    f"{stats.skipped} skipped, {stats.updates} low-rank updates"
                    if solver == "scipy"
                    else f"{stats.skipped} skipped"
                ),
            )
        )
    ref = {p: np.asarray(x, np.float32) for p, x in leaf_paths(a).items()}
    oth = {p: np.asarray(x, np.float32) for p, x in leaf_paths(b).items()}
    groups = {g: list(e) for g, e in spec.groups.items()}
    orders = np.asarray(wm.sweep_orders(key, MAX_ITER, len(spec)))
    plan = wm.make_plan(spec, a)
    la, lb = tuple(jax.tree.leaves(a)), tuple(jax.tree.leaves(b))
    for threads in (None, 1):
        warm = []
        for _ in range(repeats):
            with threadpoolctl.threadpool_limits(threads, user_api="blas"):
                t0 = time.perf_counter()
                perm, sweeps, solves = reference_weight_matching(groups, ref, oth, orders)
                warm.append(time.perf_counter() - t0)
        perms = tuple(jax.numpy.asarray(perm[g].astype(np.int32)) for g in spec.names)
        objective = float(wm.objective_jit(la, lb, perms, plan=plan))
        rows.append(
            dict(
                impl=f"reference ({'default' if threads is None else threads} BLAS threads)",
                compile_s=0.0,
                warm_s=min(warm),
                sweeps=sweeps,
                solves=solves,
                objective=objective,
                perms={g: perm[g] for g in spec.names},
                detail="",
            )
        )
    ref_perms = rows[-1]["perms"]
    for r in rows:
        r["same"] = all(np.array_equal(r["perms"][g], ref_perms[g]) for g in spec.names)
    return sizes, rows


SINKHORN_EPSILONS = (0.01, 0.002)
"""Entropic regularisation, relative to the mean squared-Euclidean cost."""


def sinkhorn_rows(ns, dim=512, repeats=3):
    """``(epsilon, n, compile s, warm s, iterations, converged)`` per Sinkhorn run."""
    import jax
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    solver = sinkhorn.Sinkhorn(max_iterations=5000)

    def make(eps):
        @jax.jit
        def solve(x, y):
            geom = pointcloud.PointCloud(x, y, epsilon=eps, relative_epsilon="mean")
            out = solver(linear_problem.LinearProblem(geom))
            return out.matrix, out.n_iters, out.converged

        return solve

    rows = []
    for eps in SINKHORN_EPSILONS:
        solve = make(eps)
        for n in ns:
            kx, ky = jax.random.split(jax.random.key(n))
            x = jax.random.normal(kx, (n, dim)) / np.sqrt(dim)
            y = jax.random.normal(ky, (n, dim)) / np.sqrt(dim)
            t0 = time.perf_counter()
            jax.block_until_ready(solve(x, y))
            first = time.perf_counter() - t0
            warm = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                _, iters, conv = jax.block_until_ready(solve(x, y))
                warm.append(time.perf_counter() - t0)
            rows.append((eps, n, max(first - min(warm), 0.0), min(warm), int(iters), bool(conv)))
    return rows


def main() -> None:
    """Runs the benchmark and prints the tables (last line: the MLP speedup)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, Sinkhorn up to 2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resnet-width", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--pairs", nargs="*", default=["mlp", "resnet20"])
    parser.add_argument("--sinkhorn", type=int, nargs="*", default=[512, 1024, 2048, 4096])
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    sink_ns = [n for n in args.sinkhorn if not (args.quick and n > 2048)]

    import jax
    import scipy

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{datetime.date.today()}  {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores (load {load:.1f}), jax {jax.__version__}, numpy "
        f"{np.__version__}, scipy {scipy.__version__}, device {jax.devices()[0].device_kind}"
    )
    mlp_speedup = None
    for pair in args.pairs:
        for width in args.resnet_width if pair == "resnet20" else [1]:
            sizes, rows = run_pair(pair, width, repeats, ["scipy", "hungarian"])
            label = pair if pair == "mlp" else f"{pair} (width {width})"
            print(f"\n{label}: {len(sizes)} groups, sizes {sorted(set(sizes.values()))}")
            print(
                f"  {'implementation':28s} {'compile s':>9s} {'warm s':>8s} {'sweeps':>6s} "
                f"{'solves':>6s} {'objective':>12s}  same perms as ref"
            )
            for r in rows:
                print(
                    f"  {r['impl']:28s} {r['compile_s']:9.2f} {r['warm_s']:8.3f} "
                    f"{r['sweeps']:6d} {r['solves']:6d} {r['objective']:12.4f}  "
                    f"{'yes' if r['same'] else 'NO'}  {r['detail']}"
                )
            fj = min(r["warm_s"] for r in rows if r["impl"].startswith("fusionjax"))
            refs = [r["warm_s"] for r in rows if r["impl"].startswith("reference")]
            objs = {round(r["objective"], 3) for r in rows}
            print(
                f"  fusionjax (best solver) vs reference: {max(refs) / fj:.1f}x (default "
                f"threads), {min(refs) / fj:.1f}x (faster reference); same objective: "
                f"{'yes' if len(objs) == 1 else 'NO ' + str(sorted(objs))}"
            )
            if pair == "mlp":
                mlp_speedup = min(refs) / fj
    if sink_ns:
        print("\nott Sinkhorn (jitted), n random 512-d points per side (threshold 1e-3)")
        print(
            f"  {'epsilon':>13s} {'n':>5s} {'compile s':>9s} {'warm s':>8s} "
            f"{'iterations':>10s} converged"
        )
        for eps, n, comp, warm, iters, conv in sinkhorn_rows(sink_ns, repeats=repeats):
            print(f"  {eps:5.3f} x mean {n:5d} {comp:9.2f} {warm:8.3f} {iters:10d} {conv}")
    if mlp_speedup is not None:
        print(f"speedup vs reference: {mlp_speedup:.1f}x")


if __name__ == "__main__":
    main()
