"""Dynamic Logit Fusion: the exact solver against the paper's grid, warm jit, on this device.

Run: ``PYTHONPATH=. python benchmarks/logits_dlf.py``. Reports compile and run time
separately (the median of 5 runs after a warm-up), for 8 and 64 positions per vocabulary.
"""

import time

import jax

from fusionjax import logits as fl


def _time(fn, *args, repeats=5):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t0)
    return compile_s, sorted(runs)[len(runs) // 2]


def main(batches=(8, 64)) -> None:
    print(f"device: {jax.devices()[0].device_kind}")
    for batch, v in ((b, v) for b in batches for v in (32768, 131072)):
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        strong = 3.0 * jax.random.normal(k1, (batch, v))
        base = 3.0 * jax.random.normal(k2, (batch, v))
        expert = base + 1.5 * jax.random.normal(k3, (batch, v))
        row = {}
        for solver in ("exact", "grid"):
            fn = jax.jit(lambda s, e, b, solver=solver: fl.dynamic_alpha(s, e, b, solver=solver))
            row[solver] = _time(fn, strong, expert, base)
        ce, re = row["exact"]
        cg, rg = row["grid"]
        print(f"batch {batch}, V={v}: exact {re * 1e3:.1f} ms (compile {ce:.2f} s), "
              f"grid {rg * 1e3:.1f} ms (compile {cg:.2f} s), grid/exact = {rg / re:.2f}")


if __name__ == "__main__":
    main()
