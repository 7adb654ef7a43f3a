"""Streaming merges of checkpoints on disk: wall time, throughput vs copy bandwidth, peak RSS.

Usage: python benchmarks/streaming_merge.py [GB_PER_CHECKPOINT] [--dir DIR] [--leaf-mb MB]

Writes three checkpoints (a base and two fine-tuned models) of ~GB each twice —
safetensors bf16 and Orbax f32 — then runs each merge in its own subprocess
(peak RSS from that process's ``ru_maxrss``): task arithmetic and TIES
(per-tensor and model-wide) with :func:`fusionjax.io.merge_checkpoints`, and a
plain NumPy streaming merge (safe_open, one tensor at a time, safetensors
output) as the baseline; ``mergekit-yaml`` on the safetensors files if it is
installed. Throughput is the bytes read and written per second over the bytes
NumPy's ``copyto`` reads and writes per second in this process. The last two
lines are ``peak RSS: N.NN GB`` (the largest over the merges) and
``throughput: N% of copy bandwidth`` (task arithmetic, safetensors).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

RUNS = ("ta_st", "ties_st", "ties_model_st", "ta_orbax", "ties_orbax", "numpy_st")


def make_checkpoints(d: pathlib.Path, gb: float, leaf_mb: float) -> None:
    import jax.numpy as jnp

    from fusionjax import io

    cols = 1024
    rows = max(1, int(leaf_mb * 2**20 / 4 / cols))
    n_leaves = max(1, int(gb * 2**30 / (rows * cols * 4)))
    names = {f"model.layers.{i}.w": (rows, cols) for i in range(n_leaves)}

    class Spec:  # a source of specs only, for the sinks
        def __init__(self, dtype):
            import jax

            self.treedef = None
            tree = io.nest({k: jax.ShapeDtypeStruct(s, dtype) for k, s in names.items()})
            flat, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
            self.paths = [p for p, _ in flat]
            self.specs = [s for _, s in flat]
            self.kinds = ["param"] * len(flat)

        def read(self, i):
            raise AssertionError

    for m in range(3):
        rng = np.random.default_rng(m)
        for fmt, dtype, out in (
            ("safetensors", jnp.bfloat16, d / f"st{m}"),
            ("orbax", jnp.float32, d / f"orbax{m}"),
        ):
            like = Spec(dtype)
            sink = io.open_sink(out, format=fmt, like=like, progress=False)
            base_rng = np.random.default_rng(0)
            for i, s in enumerate(like.specs):
                x = base_rng.standard_normal(s.shape, np.float32)
                if m:
                    x += 0.01 * rng.standard_normal(s.shape, np.float32)
                sink.write(i, x.astype(s.dtype))
            sink.finish()
    print(f"checkpoints: 3 x {n_leaves} leaves of {rows}x{cols} (bf16 safetensors, f32 Orbax)")


def numpy_merge(d: pathlib.Path, out: pathlib.Path) -> None:
    """The baseline: task arithmetic, one tensor at a time, no fusionjax."""
    import ml_dtypes
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from fusionjax.io import _safetensors

    specs, files, _ = _safetensors.read_specs(d / "st0")
    handles = [{} for _ in range(3)]
    out.mkdir()
    shard: dict = {}
    for name in specs:
        xs = []
        for m in range(3):
            f = d / f"st{m}" / files[name].name
            h = handles[m].get(f) or handles[m].setdefault(f, safe_open(str(f), framework="numpy"))
            xs.append(h.get_tensor(name).astype(np.float32))
        merged = xs[0] + 0.5 * ((xs[1] - xs[0]) + (xs[2] - xs[0]))
        shard[name] = merged.astype(ml_dtypes.bfloat16)
        if sum(a.nbytes for a in shard.values()) >= 512 << 20:
            save_file(shard, str(out / f"part{len(list(out.iterdir()))}.safetensors"))
            shard = {}
    if shard:
        save_file(shard, str(out / f"part{len(list(out.iterdir()))}.safetensors"))


def run_one(name: str, d: pathlib.Path) -> None:
    # Imports first: the wall time is the merge's (jax, orbax and tensorstore take ~2 s).
    import fusionjax as fj
    from fusionjax import io

    t0 = time.perf_counter()
    out = d / f"out_{name}"
    if name == "numpy_st":
        numpy_merge(d, out)
    else:

        merger = {
            "ta": fj.merging.task_arithmetic(scaling=0.5),
            "ties": fj.merging.ties(density=0.2),
            "ties_model": fj.merging.ties(density=0.2, scope="model"),
        }[name.rsplit("_", 1)[0]]
        fmt = "safetensors" if name.endswith("_st") else "orbax"
        prefix = "st" if fmt == "safetensors" else "orbax"
        io.merge_checkpoints(
            d / f"{prefix}0",
            [d / f"{prefix}1", d / f"{prefix}2"],
            merger,
            out,
            format=fmt,
            progress=False,
            max_shard_bytes=(1 << 30) if fmt == "safetensors" else None,
        )
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"name": name, "wall": wall, "rss": rss}))


def copy_bandwidth(nbytes: int = 256 << 20) -> float:
    """Bytes read + written per second by np.copyto (best of 5)."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def dir_bytes(p: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gb", nargs="?", type=float, default=2.0, help="GB per checkpoint")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--leaf-mb", type=float, default=64.0)
    ap.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        run_one(args.run, pathlib.Path(args.dir))
        return
    d = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="fj_stream_"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        make_checkpoints(d, args.gb, min(args.leaf_mb, args.gb * 1024))
        print(f"wrote the checkpoints in {time.perf_counter() - t:.1f} s")
        bw = copy_bandwidth()
        print(f"NumPy copy bandwidth: {bw / 1e9:.2f} GB/s (read + write)")
        results = {}
        for name in RUNS:
            cmd = [sys.executable, __file__, "--run", name, "--dir", str(d)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if out.returncode:
                raise SystemExit(f"{name} failed:\n{out.stderr[-4000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            prefix = "st" if name.endswith("_st") else "orbax"
            moved = sum(dir_bytes(d / f"{prefix}{m}") for m in range(3))
            passes = 2 if name == "ties_model_st" else 1
            moved = moved * passes + dir_bytes(d / f"out_{name}")
            r["share"] = moved / r["wall"] / bw
            results[name] = r
            print(
                f"{name:>14}: {r['wall']:7.2f} s  {moved / r['wall'] / 1e9:6.2f} GB/s moved  "
                f"{100 * r['share']:5.1f}% of copy  peak RSS {r['rss'] / 2**30:.2f} GB"
            )
        mk = shutil.which("mergekit-yaml")
        if mk:
            cfg = d / "mergekit.yml"
            cfg.write_text(
                f"merge_method: task_arithmetic\nbase_model: {d}/st0\nmodels:\n"
                f"  - model: {d}/st1\n    parameters: {{weight: 0.5}}\n"
                f"  - model: {d}/st2\n    parameters: {{weight: 0.5}}\ndtype: bfloat16\n"
            )
            t = time.perf_counter()
            mo = subprocess.run([mk, str(cfg), str(d / "out_mergekit")], capture_output=True)
            print(f"mergekit-yaml: {time.perf_counter() - t:.2f} s (rc {mo.returncode})")
        else:
            print("mergekit-yaml: not installed")
        peak = max(r["rss"] for n, r in results.items() if n != "numpy_st")
        print(f"peak RSS: {peak / 1e9:.2f} GB")
        print(f"throughput: {100 * results['ta_st']['share']:.0f}% of copy bandwidth")
    finally:
        if args.dir is None:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
