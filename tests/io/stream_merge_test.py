import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from fusionjax import io


def _model(seed, *, layers=3):
    r = np.random.default_rng(seed)
    m = {
        "embed": np.asarray(r.normal(size=(8, 8)), np.float32),
        "layers": {
            str(i): {
                "w": np.asarray(r.normal(size=(8, 8)), np.float32),
                "b": np.asarray(r.normal(size=8), jnp.bfloat16),
            }
            for i in range(layers)
        },
        "step": np.asarray(3, np.int32),
    }
    # NumPy draws placed with device_put: jnp.asarray compiles a program per shape.
    return jax.device_put(m)


def _near(base, seed):
    r = np.random.default_rng(seed)
    return jax.device_put(jax.tree.map(
        lambda x: (np.asarray(x) + np.asarray(0.1 * r.normal(size=x.shape), x.dtype))
        if jnp.issubdtype(x.dtype, jnp.floating)
        else x,
        base,
    ))


BASE = _model(0)
FTS = [_near(BASE, s) for s in (1, 2, 3)]
KEY = jax.random.key(7)


def _write(tree, path, fmt):
    return io.save_safetensors(tree, path) if fmt == "safetensors" else io.save_orbax(tree, path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    out = {}
    for fmt, ext in (("safetensors", ".safetensors"), ("orbax", "")):
        out[fmt] = [_write(t, d / f"{n}{ext}", fmt) for n, t in zip("b123", [BASE, *FTS], strict=True)]
    return out


def _bits_equal(a, b):
    fa, _ = jax.tree_util.tree_flatten_with_path(a)
    fb, _ = jax.tree_util.tree_flatten_with_path(b)
    assert [jax.tree_util.keystr(p) for p, _ in fa] == [jax.tree_util.keystr(p) for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(p)
        assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(p)


METHODS = {
    "task_arithmetic": (lambda: fj.merging.task_arithmetic(scaling=0.4), 3),
    "ties": (lambda: fj.merging.ties(density=0.3), 3),
    "ties_model": (lambda: fj.merging.ties(density=0.3, scope="model"), 3),
    "dare": (lambda: fj.merging.dare(drop_rate=0.5), 3),
    "breadcrumbs": (lambda: fj.merging.breadcrumbs(density=0.5, gamma=0.1), 3),
    "della": (lambda: fj.merging.della(density=0.5, epsilon=0.1), 3),
    "slerp": (lambda: fj.merging.slerp(t=0.3), 2),
    "model_stock": (lambda: fj.merging.model_stock(), 3),
}


def _load(path):
    p = pathlib.Path(path)
    return io.load_safetensors(p) if p.suffix == ".safetensors" or not (p / "_METADATA").exists() else io.load_orbax(p)


@pytest.mark.parametrize("method", list(METHODS))
def test_streaming_merge_equals_in_memory_merge_safetensors(method, ckpts, tmp_path):
    make, n = METHODS[method]
    expected = fj.merge(BASE, FTS[:n], make(), key=KEY)
    b, *fts = ckpts["safetensors"]
    r = io.merge_checkpoints(b, fts[:n], make(), tmp_path / "out.safetensors", key=KEY, progress=False)
    assert r.num_leaves == 8 and r.resumed_leaves == 0
    _bits_equal(io.load_safetensors(r.path), expected)


@pytest.mark.parametrize(
    "method,combo",
    [("task_arithmetic", "orbax"), ("ties_model", "orbax"), ("dare", "mixed"), ("slerp", "mixed")],
)
def test_streaming_merge_equals_in_memory_merge_orbax_and_mixed(method, combo, ckpts, tmp_path):
    make, n = METHODS[method]
    expected = fj.merge(BASE, FTS[:n], make(), key=KEY)
    if combo == "orbax":
        b, *fts = ckpts["orbax"]
        out = tmp_path / "out"
    else:  # base and odd models from safetensors, the rest from Orbax, output Orbax
        b = ckpts["safetensors"][0]
        fts = [ckpts["safetensors"][1], ckpts["orbax"][2], ckpts["safetensors"][3]]
        out = tmp_path / "out_orbax"
    r = io.merge_checkpoints(b, fts[:n], make(), out, format="orbax", key=KEY, progress=False)
    assert r.format == "orbax"
    _bits_equal(io.load_orbax(r.path), expected)


def test_output_format_defaults_to_the_extension_then_the_bases_format(ckpts, tmp_path):
    ta = fj.merging.task_arithmetic(scaling=0.4)
    st, orb = ckpts["safetensors"], ckpts["orbax"]
    assert io.merge_checkpoints(st[0], st[1:2], ta, tmp_path / "a", progress=False).format == "safetensors"
    assert io.merge_checkpoints(orb[0], st[1:2], ta, tmp_path / "b", progress=False).format == "orbax"
    r = io.merge_checkpoints(orb[0], orb[1:2], ta, tmp_path / "c.safetensors", progress=False)
    assert r.format == "safetensors"
    _bits_equal(io.load_safetensors(tmp_path / "a"), io.load_orbax(tmp_path / "b"))


def test_dtype_casts_the_output_and_progress_counts_bytes(ckpts, tmp_path):
    class Bar:
        def __init__(self, total, **_):
            self.total, self.n, self.closed = total, 0, False

        def update(self, k):
            self.n += k

        def set_postfix_str(self, *_a, **_k):
            pass

        def close(self):
            self.closed = True

    bars = []
    b, *fts = ckpts["safetensors"]

    class Recording(Bar):
        def __init__(self, **kw):
            super().__init__(**kw)
            bars.append(self)

    r = io.merge_checkpoints(b, fts, fj.merging.task_arithmetic(scaling=0.4), tmp_path / "o.safetensors",
                             dtype=jnp.bfloat16, progress=Recording)
    out = io.load_safetensors(r.path)
    assert out["embed"].dtype == jnp.bfloat16 and out["step"].dtype == np.int32
    expected = fj.merge(BASE, FTS, fj.merging.task_arithmetic(scaling=0.4))
    np.testing.assert_array_equal(np.asarray(out["embed"]), np.asarray(expected["embed"].astype(jnp.bfloat16)))
    assert bars[0].n == bars[0].total == r.bytes_written and bars[0].closed


class CountingSource:
    def __init__(self, src):
        self.src, self.reads = src, 0
        self.treedef, self.paths, self.specs, self.kinds = src.treedef, src.paths, src.specs, src.kinds
        self.path = src.path

    def read(self, i):
        self.reads += 1
        return self.src.read(i)


def test_every_check_runs_before_any_read_and_nothing_is_written(ckpts, tmp_path):
    b, f1, f2, _ = ckpts["safetensors"]
    counting = [CountingSource(io.open_checkpoint(p)) for p in (b, f1, f2)]
    out = tmp_path / "out.safetensors"
    other = _model(5, layers=2)  # one layer fewer
    odd = io.save_safetensors(other, tmp_path / "odd.safetensors")
    shaped = dict(BASE, embed=jnp.zeros((8, 9), jnp.float32))
    wrong_shape = io.save_safetensors(shaped, tmp_path / "shape.safetensors")
    cases = [
        ([tmp_path / "missing.safetensors"], FileNotFoundError, r"finetuned\[0\].*missing\.safetensors"),
        ([counting[1], odd], ValueError, r"finetuned\[1\] differs from base: it is missing \['layers'\]\['2'\]"),
        ([counting[1], wrong_shape], ValueError, r"finetuned\[1\] differs from base at \['embed'\]"),
    ]
    for fts, err, match in cases:
        with pytest.raises(err, match=match):
            io.merge_checkpoints(counting[0], fts, fj.merging.ties(), out, progress=False)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        io.merge_checkpoints(counting[0], counting[1:], fj.merging.dare(), out, progress=False)
    with pytest.raises(ValueError, match="format must be one of"):
        io.merge_checkpoints(counting[0], counting[1:], fj.merging.ties(), out, format="npz")
    io.save_safetensors({"x": np.zeros(1, np.float32)}, out)
    with pytest.raises(FileExistsError, match="out.safetensors exists"):
        io.merge_checkpoints(counting[0], counting[1:], fj.merging.ties(), out, progress=False)
    assert [c.reads for c in counting] == [0, 0, 0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.safetensors", "out.safetensors", "shape.safetensors"]


_WORKER = textwrap.dedent(
    """
    import os, pathlib, sys, time
    import jax, fusionjax as fj
    from fusionjax import io

    class PauseAfter:  # pauses for good when asked for leaf `k`: the kill lands there
        def __init__(self, src, k, flag):
            self.src, self.k, self.flag = src, k, pathlib.Path(flag)
            self.treedef, self.paths, self.specs, self.kinds = src.treedef, src.paths, src.specs, src.kinds
            self.path = src.path

        def read(self, i):
            if i == self.k:
                self.flag.write_text("paused")
                time.sleep(600)
            return self.src.read(i)

    d = pathlib.Path(sys.argv[1])
    base = PauseAfter(io.open_checkpoint(d / "b.safetensors"), int(sys.argv[2]), d / "paused")
    fts = [d / f"{i}.safetensors" for i in range(2)]
    io.merge_checkpoints(base, fts, fj.merging.dare(drop_rate=0.5), d / "out", format="safetensors",
                         key=jax.random.key(3), progress=False, max_shard_bytes=3 * 130 * 130 * 4)
    """
)


def test_sigkill_half_way_leaves_nothing_complete_and_a_rerun_resumes(tmp_path):
    # 12 leaves of 130x130 (above the small-leaf grouping size): merged one by one, in order.
    r = np.random.default_rng(0)
    base = jax.device_put({f"l{i:02d}": np.asarray(r.normal(size=(130, 130)), np.float32) for i in range(12)})
    fts = [_near(base, s) for s in (1, 2)]
    io.save_safetensors(base, tmp_path / "b.safetensors")
    for i, f in enumerate(fts):
        io.save_safetensors(f, tmp_path / f"{i}.safetensors")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path), "7"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "paused").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert not (tmp_path / "out").exists()  # nothing that looks complete
    staged = tmp_path / ".out.fusionjax-tmp"
    # leaves 0..6 were merged; the journal lists those whose background write had been
    # seen complete (all but at most SafetensorsSink.MAX_PENDING in flight)
    kept = len((staged / "journal").read_text().splitlines())
    assert 7 - io.SafetensorsSink.MAX_PENDING <= kept <= 7
    # the re-run (same merge, here without the pause) resumes: journaled leaves are neither read nor written
    counting = CountingSource(io.open_checkpoint(tmp_path / "b.safetensors"))
    res = io.merge_checkpoints(counting, [tmp_path / "0.safetensors", tmp_path / "1.safetensors"],
                               fj.merging.dare(drop_rate=0.5), tmp_path / "out", format="safetensors",
                               key=jax.random.key(3), progress=False, max_shard_bytes=3 * 130 * 130 * 4)
    assert res.resumed_leaves == kept and counting.reads == 12 - kept
    assert not staged.exists()
    assert len(list((tmp_path / "out").glob("model-*-of-00004.safetensors"))) == 4
    expected = fj.merge(base, fts, fj.merging.dare(drop_rate=0.5), key=jax.random.key(3))
    _bits_equal(io.load_safetensors(tmp_path / "out"), expected)


def test_a_different_merge_does_not_resume(ckpts, tmp_path):
    b, *fts = ckpts["safetensors"]
    staged = tmp_path / ".out.safetensors.fusionjax-tmp"
    staged.mkdir()
    (staged / "fingerprint").write_text("something else")
    (staged / "journal").write_text('{"i": 0, "n": "embed"}\n')
    r = io.merge_checkpoints(b, fts, fj.merging.ties(), tmp_path / "out.safetensors", progress=False)
    assert r.resumed_leaves == 0 and not staged.exists()
    _bits_equal(io.load_safetensors(r.path), fj.merge(BASE, FTS, fj.merging.ties()))


def test_merge_on_a_mesh_reads_onto_the_shardings_and_equals_the_host_merge(ckpts, tmp_path):
    mesh = jax.make_mesh((1,), ("x",))
    ta = fj.merging.task_arithmetic(scaling=0.5)
    base, *fts = ckpts["safetensors"]
    # Bad combinations fail before anything is read or written.
    for kw, msg in [
        ({"rules": {"w": jax.sharding.PartitionSpec()}}, "needs a mesh"),
        ({"mesh": mesh, "layout": "hf"}, "cannot be combined with layout"),
        ({"mesh": mesh, "target": BASE}, "not both"),
    ]:
        with pytest.raises(ValueError, match=msg):
            io.merge_checkpoints(base, fts, ta, tmp_path / "bad", progress=False, **kw)
    assert list(tmp_path.iterdir()) == []
    # The sources' specs carry the target's shardings (the merge plans from them).
    target = io.sharded_target(BASE, mesh)
    src = io.open_checkpoint(ckpts["orbax"][0], target=target)
    names = dict(zip(src.names, src.specs, strict=True))
    assert names["embed"].sharding.spec == jax.sharding.PartitionSpec("x", None)
    assert isinstance(src.read(src.names.index("embed")), jax.Array)
    ref = fj.merge(BASE, FTS, ta)
    for fmt, ins in ckpts.items():
        out = tmp_path / f"mesh_{fmt}"
        io.merge_checkpoints(ins[0], ins[1:], ta, out, mesh=mesh, format="orbax", progress=False)
        got = io.load_orbax(out)
        for p, x in jax.tree_util.tree_flatten_with_path(ref)[0]:
            y = got
            for k in p:
                y = y[str(getattr(k, "key", getattr(k, "idx", None)))]
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=f"{fmt} {p}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mesh_orbax", "mesh_safetensors"]
