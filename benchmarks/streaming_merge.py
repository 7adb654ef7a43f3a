"""Streaming merges of checkpoints on disk: wall time, throughput vs copy bandwidth, peak RSS.

Usage: python benchmarks/streaming_merge.py [GB_PER_CHECKPOINT] [--dir DIR] [--leaf-mb MB]

Writes three checkpoints (a base and two fine-tuned models) of ~GB each twice —
safetensors bf16 and Orbax f32 — then runs each merge in its own subprocess
(peak RSS from that process's ``VmHWM``): task arithmetic and TIES
(per-tensor and model-wide) with :func:`fusionjax.io.merge_checkpoints`, and a
plain NumPy streaming merge (safe_open, one tensor at a time, safetensors
output) as the baseline; ``mergekit-yaml`` on the safetensors files if it is
installed.

Definitions (printed with the figures):

* *moved*: the bytes of the input files read (twice for model-wide TIES) plus
  the bytes of the output written; *throughput* = moved / wall time of the merge
  (imports excluded). The inputs were just written, so the page cache is
  **warm** for reads (if they fit in free RAM); writes go through the page
  cache and are fsync'ed at the commit, so they are bound by the disk.
* *copy bandwidth*: bytes read + written per second by ``np.copyto`` of 256 MB
  (best of 5) in this process. ``throughput: N% of copy bandwidth`` compares
  the two — a memory-speed yardstick no disk-bound merge can reach.
* *disk write ceiling*: the moved bytes per second a merge would reach if it
  took exactly as long as writing (``pwrite`` + ``fsync``) its output once,
  measured here on a file of the output's size: the honest upper bound on
  this machine.
* *peak RSS*: ``VmHWM`` of the merge's process (``/proc/self/status``; it
  counts mapped file pages touched; not ``ru_maxrss``, which on Linux keeps the
  high-water mark of the parent the process was forked from), and
  ``RssAnon`` (anonymous memory only) at its end; the
  *floor* is the peak RSS of a process that only imports jax, fusionjax.io
  and runs one tiny jit.

The last two lines are ``peak RSS: N.NN GB`` (the largest over the merges) and
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

    if name == "floor":
        import jax
        import jax.numpy as jnp

        jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(4)))
        rss = _peak_rss()
        print(json.dumps({"name": name, "wall": 0.0, "rss": rss, "anon": _rss_anon()}))
        return
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
    rss = _peak_rss()
    print(json.dumps({"name": name, "wall": wall, "rss": rss, "anon": _rss_anon()}))


def _peak_rss() -> int:
    """This process's peak resident memory (``VmHWM``, bytes).

    ``ru_maxrss`` is not used: a child started from a large parent inherits the
    parent's high-water mark across fork + exec, so every merge would report at
    least the parent's peak (the checkpoint writer's).
    """
    for line in open("/proc/self/status"):  # noqa: SIM115
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_anon() -> int:
    """Anonymous resident memory of this process now (bytes; 0 if unknown)."""
    try:
        for line in open("/proc/self/status"):  # noqa: SIM115
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def disk_write_bandwidth(d: pathlib.Path, nbytes: int) -> float:
    """Bytes per second of pwrite + fsync of ``nbytes`` into a new file in ``d``."""
    chunk = np.ones(32 << 20, np.uint8)
    path = d / "disk_probe.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        os.ftruncate(fd, nbytes)
        t = time.perf_counter()
        for pos in range(0, nbytes, chunk.size):
            os.pwrite(fd, memoryview(chunk)[: min(chunk.size, nbytes - pos)], pos)
        os.fsync(fd)
        return nbytes / (time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()


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
        disk = disk_write_bandwidth(d, dir_bytes(d / "st0"))
        print(f"disk write bandwidth (pwrite + fsync): {disk / 1e9:.2f} GB/s")
        print("page cache: warm for reads (inputs just written); outputs fsync'ed at the commit")
        results = {}
        fl = subprocess.run(
            [sys.executable, __file__, "--run", "floor", "--dir", str(d)],
            capture_output=True, text=True, env=os.environ,
        )
        if fl.returncode:
            raise SystemExit(f"floor failed:\n{fl.stderr[-4000:]}")
        floor = json.loads(fl.stdout.strip().splitlines()[-1])
        print(f"RSS floor (import jax + fusionjax.io, one tiny jit): {floor['rss'] / 1e9:.2f} GB")
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
            out_bytes = dir_bytes(d / f"out_{name}")
            r["ceiling"] = moved / (out_bytes / disk)
            results[name] = r
            print(
                f"{name:>14}: {r['wall']:7.2f} s  {moved / r['wall'] / 1e9:6.2f} GB/s moved  "
                f"{100 * r['share']:5.1f}% of copy  "
                f"{100 * moved / r['wall'] / r['ceiling']:5.1f}% of the disk write ceiling  "
                f"peak RSS {r['rss'] / 1e9:.2f} GB (RssAnon at end {r['anon'] / 1e9:.2f} GB)"
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
        print(f"peak RSS: {peak / 1e9:.2f} GB (floor {floor['rss'] / 1e9:.2f} GB)")
        print(f"throughput: {100 * results['ta_st']['share']:.0f}% of copy bandwidth")
    finally:
        if args.dir is None:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
