"""Throughput of ``fusionjax.merge`` on a >= 1 GB model, against NumPy.

Builds a synthetic transformer-like float32 model (per layer: q/o kernels
[d, d], k/v kernels [d, d/4], MLP kernels [d, 3d/4] and [3d/4, d], biases and
norm scales; d = 4096) and 3 fine-tuned copies (base + small noise), then times
``fusionjax.merge`` with task arithmetic, TIES (density 0.2, per-leaf trim) and
DARE (drop 0.9), and a plain NumPy implementation of each method. Every method
and implementation runs in a fresh subprocess, so the peak RSS is its own.

Usage::

    python benchmarks/merge_throughput.py             # 1 GB model, all methods
    python benchmarks/merge_throughput.py --gb 0.1 --methods ties --repeats 2
    python benchmarks/merge_throughput.py --thp       # see benchmarks/README.md

Reported per method (see benchmarks/README.md for the definitions):
compile time (JAX compile events during the first call), run time (median of
``--repeats`` warm runs, ``block_until_ready``; also without the NaN/Inf
check), GB/s of input read (4 models x model size / run time), that rate over
this machine's NumPy copy bandwidth measured in the same process, the speedup
over NumPy, and peak RSS beyond inputs + output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

# Run from a source checkout without installing: the repository root is the parent.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

D_MODEL = 4096
NOISE = 1e-3
SCALE = 0.02
TA_SCALING = 0.3  # fusionjax.merging.task_arithmetic() default, also dare()'s merger
DENSITY = 0.2
DROP_RATE = 0.9
THP_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


# ----------------------------------------------------------------------------- model


def layer_shapes(d: int) -> dict[str, tuple[int, ...]]:
    h = 3 * d // 4
    return {
        "attn": {
            "q": {"kernel": (d, d), "bias": (d,)},
            "k": {"kernel": (d, d // 4), "bias": (d // 4,)},
            "v": {"kernel": (d, d // 4), "bias": (d // 4,)},
            "o": {"kernel": (d, d), "bias": (d,)},
        },
        "mlp": {
            "up": {"kernel": (d, h), "bias": (h,)},
            "down": {"kernel": (h, d), "bias": (d,)},
        },
        "ln1": {"scale": (d,)},
        "ln2": {"scale": (d,)},
    }


def model_shapes(gb: float) -> dict:
    """Nested dict of shapes with at least ``gb`` GB of float32 (>= one layer)."""
    d = D_MODEL
    per_layer = 4 * _count(layer_shapes(d))
    layers = max(1, math.ceil(gb * 1e9 / per_layer))
    if gb * 1e9 < per_layer:  # small runs: one narrower layer
        d = max(128, int(D_MODEL * math.sqrt(gb * 1e9 / per_layer)) // 128 * 128)
        layers = 1
    return {f"layer_{i}": layer_shapes(d) for i in range(layers)}


def _count(tree) -> int:
    if isinstance(tree, dict):
        return sum(_count(v) for v in tree.values())
    return math.prod(tree)


def _leaves(tree, prefix=()):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], prefix + (k,))
    else:
        yield prefix, tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def build_models(gb: float, num_models: int, convert=lambda a: a):
    """base and fine-tuned copies as nested dicts; leaves pass through ``convert``.

    Deterministic (one seed per leaf), so every subprocess builds the same model.
    Leaves are generated and converted one at a time (no full NumPy copy).
    """
    shapes = model_shapes(gb)
    base, fts = {}, [{} for _ in range(num_models)]
    for i, (path, shape) in enumerate(_leaves(shapes)):
        rng = np.random.default_rng(i)
        b = rng.standard_normal(shape, dtype=np.float32)
        b *= np.float32(SCALE)
        if path[-1] == "scale":
            b += np.float32(1.0)
        for ft in fts:
            f = rng.standard_normal(shape, dtype=np.float32)
            f *= np.float32(NOISE)
            f += b
            _set(ft, path, convert(f))
            del f
        _set(base, path, convert(b))
        del b
    return base, fts


# ----------------------------------------------------------------------------- numpy


def _np_kept(n: int) -> int:
    return math.ceil(round(DENSITY * n, 9))  # fusionjax.merging._ties.num_kept


def numpy_leaf(method: str, b: np.ndarray, fs: list, rng) -> np.ndarray:
    """One leaf of the method in plain NumPy, in place where it can be."""
    tmp = np.empty_like(b)
    if method == "ta":
        acc = np.subtract(fs[0], b)
        for f in fs[1:]:
            acc += np.subtract(f, b, out=tmp)
        acc *= np.float32(TA_SCALING)
        acc += b
        return acc
    if method == "dare":
        keep = np.float32(1.0) - np.float32(DROP_RATE)
        acc = np.zeros_like(b)
        for f in fs:
            np.subtract(f, b, out=tmp)
            tmp /= keep
            tmp *= rng.random(b.shape, dtype=np.float32) < keep
            acc += tmp
        acc *= np.float32(TA_SCALING)
        acc += b
        return acc
    if method == "ties":
        n = b.size
        k = _np_kept(n)
        trimmed = []
        for f in fs:
            tv = np.subtract(f, b)
            mag = np.abs(tv, out=tmp)
            thr = np.partition(mag.reshape(-1), n - k)[n - k]
            tv[mag < thr] = 0
            trimmed.append(tv)
        total = trimmed[0].copy()
        for tv in trimmed[1:]:
            total += tv
        sign = np.sign(total)
        num = np.zeros_like(b)
        count = np.zeros_like(b)
        for tv in trimmed:
            agree = (np.sign(tv) == sign) & (sign != 0) & (tv != 0)
            num += np.where(agree, tv, np.float32(0))
            count += agree
        num /= np.maximum(count, np.float32(1))
        num += b
        return num
    raise ValueError(method)


def numpy_merge(method, base, fts):
    rng = np.random.default_rng(0)
    out = {}
    for path, b in _leaves(base):
        fs = [_get(ft, path) for ft in fts]
        _set(out, path, numpy_leaf(method, b, fs, rng))
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


# ----------------------------------------------------------------------------- child


def copy_bandwidth(nbytes: int = 64 << 20, repeats: int = 10) -> float:
    """NumPy copy bandwidth in GB/s: bytes copied (each read once, written once) / s.

    Both buffers are touched first, so this is streaming speed, not page faults.
    """
    src = np.ones(nbytes // 4, np.float32)
    dst = np.zeros_like(src)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return nbytes / best / 1e9


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _fusionjax_merger(method):
    import fusionjax as fj  # pylint: disable=import-outside-toplevel

    if method == "ta":
        return fj.merging.task_arithmetic(scaling=TA_SCALING)
    if method == "ties":
        return fj.merging.ties(density=DENSITY)
    if method == "dare":
        return fj.merging.dare(drop_rate=DROP_RATE)
    raise ValueError(method)


def child(method: str, impl: str, gb: float, num_models: int, repeats: int) -> dict:
    rec = {"method": method, "impl": impl}
    rss0 = rss_bytes()
    if impl == "numpy":
        base, fts = build_models(gb, num_models)
        rec["rss_inputs"] = rss_bytes()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = numpy_merge(method, base, fts)
            times.append(time.perf_counter() - t)
            del out
        rec["run_s"] = float(np.median(times))
        rec["runs_s"] = times
        rec["copy_gbs"] = copy_bandwidth()
    else:
        import jax  # pylint: disable=import-outside-toplevel
        import jax.monitoring  # pylint: disable=import-outside-toplevel
        import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

        import fusionjax as fj  # pylint: disable=import-outside-toplevel

        rec["device"] = str(jax.devices()[0].device_kind) + " " + repr(jax.devices())
        rec["jax"] = jax.__version__
        jax.block_until_ready(jnp.zeros(8) + 1)  # the runtime is up: not counted below
        rss0 = rss_bytes()
        compile_s = [0.0]

        def on_event(name, secs, **_):
            if name.startswith("/jax/core/compile/"):
                compile_s[0] += secs

        jax.monitoring.register_event_duration_secs_listener(on_event)
        base, fts = build_models(gb, num_models, convert=jnp.asarray)
        rec["rss_inputs"] = rss_bytes()
        merger = _fusionjax_merger(method)
        key = jax.random.key(0)

        def run(check_finite=True):
            out = fj.merge(base, fts, merger, key=key, check_finite=check_finite)
            return jax.block_until_ready(out)

        t = time.perf_counter()
        out = run()
        rec["first_call_s"] = time.perf_counter() - t
        rec["compile_s"] = compile_s[0]
        del out
        for check in (True, False):
            if not check:  # check_finite is static: this variant compiles anew
                run(check)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                out = run(check)
                times.append(time.perf_counter() - t)
                del out
            rec["run_s" if check else "run_nocheck_s"] = float(np.median(times))
            rec["runs_s" if check else "runs_nocheck_s"] = times
        rec["copy_gbs"] = copy_bandwidth()
    rec["rss_start"] = rss0
    rec["peak_rss"] = peak_rss_bytes()
    if impl == "fusionjax":  # after the peak is read: the reference needs temporaries
        rec["verify"] = verify(method, base, fts, run())
    shapes = model_shapes(gb)
    rec["model_bytes"] = 4 * _count(shapes)
    rec["largest_leaf_bytes"] = 4 * max(math.prod(s) for _, s in _leaves(shapes))
    return rec


def verify(method, base, fts, out, max_leaves=2) -> str:
    """Compares the largest leaves with the NumPy implementation (TA and TIES)."""
    if method == "dare":  # different random streams; checked statistically in tests
        return "n/a (RNG)"
    leaves = sorted(_leaves(base), key=lambda pl: -pl[1].size)[:max_leaves]
    worst = 0.0
    for path, b in leaves:
        fs = [np.asarray(_get(ft, path)) for ft in fts]
        ref = numpy_leaf(method, np.asarray(b), fs, None)
        got = np.asarray(_get(out, path))
        worst = max(worst, float(np.max(np.abs(got - ref))))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6, err_msg=str(path))
    return f"ok (max|diff| {worst:.1e})"


# ----------------------------------------------------------------------------- parent


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {system}"


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--gb", type=float, default=1.0, help="model size, GB of float32 (default 1)")
    p.add_argument("--methods", default="ta,ties,dare", help="comma-separated: ta, ties, dare")
    p.add_argument("--models", type=int, default=3, help="fine-tuned copies (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed warm runs per variant")
    p.add_argument("--no-numpy", action="store_true", help="skip the NumPy baselines")
    p.add_argument("--thp", action="store_true", help=f"run children with {THP_ENV}")
    p.add_argument("--json", help="also write the raw records to this file")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        rec = child(*args.child, args.gb, args.models, args.repeats)
        print("RESULT " + json.dumps(rec))
        return

    env = dict(os.environ, **(THP_ENV if args.thp else {}))
    impls = ["fusionjax"] + ([] if args.no_numpy else ["numpy"])
    shapes = model_shapes(args.gb)
    model_gb = 4 * _count(shapes) / 1e9
    print(f"# fusionjax merge throughput, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"# machine: {machine()}")
    print(
        f"# model: {model_gb:.3f} GB float32, {len(list(_leaves(shapes)))} leaves "
        f"({len(shapes)} layers), {args.models} fine-tuned copies; inputs "
        f"{(args.models + 1) * model_gb:.2f} GB"
    )
    print(
        f"# env: XLA_FLAGS={env.get('XLA_FLAGS', '')!r} "
        f"GLIBC_TUNABLES={env.get('GLIBC_TUNABLES', '')!r}"
    )
    records = {}
    for method in args.methods.split(","):
        for impl in impls:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", method, impl]
            cmd += ["--gb", str(args.gb), "--models", str(args.models)]
            cmd += ["--repeats", str(args.repeats)]
            t = time.perf_counter()
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
            if res.returncode or not line:
                print(f"# {method}/{impl} failed:\n{res.stdout}\n{res.stderr}", file=sys.stderr)
                continue
            rec = json.loads(line[-1][len("RESULT ") :])
            rec["wall_s"] = time.perf_counter() - t
            records[(method, impl)] = rec
            print(f"#   {method}/{impl} done in {rec['wall_s']:.0f} s", file=sys.stderr)
    if records:
        dev = next((r["device"] for r in records.values() if "device" in r), "?")
        print(f"# device: {dev}")
        print_table(records, args.models + 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{m}/{i}": r for (m, i), r in records.items()}, f, indent=1)


def print_table(records, num_inputs):
    cols = [
        "method", "impl", "compile s", "run s", "run s, no NaN check", "input GB/s",
        "of copy BW", "vs NumPy", "peak RSS GB", "RSS over in+out", "verified",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for (method, impl), r in records.items():
        gbs = num_inputs * r["model_bytes"] / 1e9 / r["run_s"]
        np_rec = records.get((method, "numpy"))
        speedup = f"{np_rec['run_s'] / r['run_s']:.2f}x" if np_rec and impl != "numpy" else ""
        extra = r["peak_rss"] - r["rss_start"] - (num_inputs + 1) * r["model_bytes"]
        row = [
            method,
            impl,
            f"{r['compile_s']:.1f}" if "compile_s" in r else "-",
            f"{r['run_s']:.2f}",
            f"{r['run_nocheck_s']:.2f}" if "run_nocheck_s" in r else "-",
            f"{gbs:.2f}",
            f"{100 * gbs / r['copy_gbs']:.0f}% of {r['copy_gbs']:.1f}",
            speedup,
            f"{r['peak_rss'] / 1e9:.2f}",
            f"{extra / 1e9:+.2f} GB = {extra / r['largest_leaf_bytes']:+.1f} leaves",
            r.get("verify", ""),
        ]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
