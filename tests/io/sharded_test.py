"""Merges of Orbax checkpoints restored sharded over a 2x2 mesh of (forced) CPU devices.

The device count is fixed when JAX starts, so the mesh part runs in one fresh
interpreter with ``--xla_force_host_platform_device_count=4``; this process
(one device) writes the input checkpoints, computes the unsharded reference
merges and reloads what the sharded merges saved.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import fusionjax as fj
from fusionjax.io import _sharded as sh
from tests.io import _mesh_models as mm

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import jax, numpy as np
    from jax.sharding import PartitionSpec as P
    import fusionjax as fj
    from fusionjax.io import _sharded as sh
    from tests.io import _mesh_models as mm

    work = sys.argv[1]
    assert jax.device_count() == 4, jax.devices()
    # jax.make_mesh gives explicit axes; no jax.set_mesh context on purpose.
    mesh = jax.make_mesh(mm.MESH_SHAPE, mm.AXES)

    # Rules that do not fit fail before anything is read, naming the leaf.
    bad = [({"embed": P("x", None)}, "mesh axis 'x'"),
           ({"norm": P("r", "c")}, "2 entries for a leaf of shape (16,)"),
           ({"mlp/bias": P(("r", "c", "r"))}, "")]
    for rules, match in bad[:2]:
        try:
            sh.sharded_target(f"{work}/in/0", mesh, rules=rules)
        except ValueError as e:
            assert match in str(e) and "['layers'][0]" in str(e) or "['embed']" in str(e), e
        else:
            raise AssertionError(rules)
    try:
        sh.shardings_for({"w": np.zeros((6, 3))}, mesh, rules={"w": P(None, "c")})
    except ValueError as e:
        assert "['w']" in str(e) and "dimension 1 of shape (6, 3)" in str(e), e
    else:
        raise AssertionError("(6, 3) split over 2 columns")

    t = time.perf_counter()
    models = [sh.load_sharded(f"{work}/in/{i}", mesh, rules=mm.RULES) for i in range(4)]
    restore_s = time.perf_counter() - t
    base, fts = models[0], models[1:]
    layer = base["layers"][0]
    assert base["embed"].sharding.spec == P(("r", "c"), None)
    assert {s.data.shape for s in base["embed"].addressable_shards} == {(4, 16)}
    assert layer["attn"]["kernel"].sharding.spec == P("r", "c")
    assert {s.data.shape for s in layer["attn"]["kernel"].addressable_shards} == {(8, 8)}
    assert layer["mlp"]["kernel"].sharding.spec == P("r", "c")
    assert layer["mlp"]["bias"].sharding.is_fully_replicated

    for name, m in mm.methods().items():
        t = time.perf_counter()
        out = fj.merge(base, fts, m, key=jax.random.key(mm.KEY))
        jax.block_until_ready(out)
        merge_s = time.perf_counter() - t
        n = mm.check_shards(out, base, mm.load_reference(f"{work}/ref_{name}.npz"))
        t = time.perf_counter()
        sh.save_sharded(out, f"{work}/out/{name}")
        save_s = time.perf_counter() - t
        print(json.dumps({"method": name, "merge_s": merge_s, "save_s": save_s, "shards": n}))

    # The same from paths, through the wrapper.
    t = time.perf_counter()
    out = sh.merge_sharded(f"{work}/in/0", [f"{work}/in/{i}" for i in (1, 2, 3)],
                           mm.methods()["ties"], f"{work}/out/wrapped", mesh=mesh,
                           rules=mm.RULES, key=jax.random.key(mm.KEY))
    n = mm.check_shards(out, base, mm.load_reference(f"{work}/ref_ties.npz"))
    print(json.dumps({"method": "merge_sharded", "merge_s": time.perf_counter() - t,
                      "restore_s": restore_s, "shards": n}))

    # Streamed: fusionjax.io.OrbaxSource restores a couple of leaves at a time
    # straight onto the mesh (its target carries the shardings).
    from fusionjax import io
    target = sh.sharded_target(f"{work}/in/0", mesh, rules=mm.RULES)
    t = time.perf_counter()
    srcs = [io.OrbaxSource(f"{work}/in/{i}", target=target, batch_bytes=2048) for i in range(4)]
    out = fj.merge(srcs[0], srcs[1:], mm.methods()["task_arithmetic"])
    n = mm.check_shards(out, target, mm.load_reference(f"{work}/ref_task_arithmetic.npz"))
    assert srcs[1].restore_calls >= 5, srcs[1].restore_calls
    print(json.dumps({"method": "stream", "merge_s": time.perf_counter() - t, "shards": n,
                      "restore_calls": srcs[1].restore_calls}))
    """
)


def test_sharded_merges_from_checkpoints_keep_their_sharding(tmp_path):
    base, fts = mm.models()
    for i, model in enumerate([base, *fts]):
        sh.save_sharded(model, tmp_path / "in" / str(i))
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # The unsharded references, computed while the subprocess starts and compiles.
        refs = {}
        for name, m in mm.methods().items():
            refs[name] = fj.merge(base, fts, m, key=jax.random.key(mm.KEY))
            mm.save_reference(refs[name], tmp_path / f"ref_{name}.npz")
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert [r["method"] for r in rows] == [*mm.methods(), "merge_sharded", "stream"]
    # 11 leaves (5 split, 6 replicated), each with one shard on each of the 4 devices.
    assert all(r["shards"] == 11 * 4 for r in rows), rows
    print("\n".join(map(json.dumps, rows)))
    # Reloaded on one device, every saved merge equals the unsharded merge.
    for name in [*mm.methods(), "wrapped"]:
        path = tmp_path / "out" / name
        got = sh.load_sharded(path, target=mm.one_device_target(path))
        want = refs["ties" if name == "wrapped" else name]
        for (p, x), y in zip(
            jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True
        ):
            np.testing.assert_allclose(
                np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6, err_msg=f"{name} {p}"
            )
            assert x.dtype == y.dtype


def test_save_load_round_trip_on_a_one_device_mesh(tmp_path):
    base, _ = mm.models(1)
    mesh = jax.make_mesh((1, 1), mm.AXES)
    sh.save_sharded(base, tmp_path / "m")
    got = sh.load_sharded(tmp_path / "m", mesh, rules=mm.RULES)
    assert got["embed"].sharding.spec == jax.P(("r", "c"), None)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
    with pytest.raises(FileExistsError, match="not overwriting"):
        sh.save_sharded(base, tmp_path / "m")


def test_merge_sharded_checks_everything_before_reading(tmp_path):
    base, fts = mm.models(2)
    mesh = jax.make_mesh((1, 1), mm.AXES)
    sh.save_sharded(base, tmp_path / "base")
    sh.save_sharded(fts[0], tmp_path / "ft0")
    wrong = jax.tree.map(lambda x: x, fts[1])
    wrong["layers"][1]["mlp"]["kernel"] = np.zeros((16, 8), np.float32)
    sh.save_sharded(wrong, tmp_path / "ft1")
    ta = fj.merging.task_arithmetic()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"finetuned\[1\].*\['layers'\]\[1\]\['mlp'\]\['kernel'\]"):
        sh.merge_sharded(tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"], ta, out, mesh=mesh)
    with pytest.raises(FileNotFoundError, match="Orbax checkpoint not found"):
        sh.merge_sharded(tmp_path / "base", [tmp_path / "nope"], ta, out, mesh=mesh)
    with pytest.raises(ValueError, match=r"\['embed'\].*mesh axis 'x'"):
        sh.merge_sharded(base, fts, ta, out, mesh=mesh, rules={"embed": jax.P("x")})
    assert not out.exists()
    (out).mkdir()
    with pytest.raises(FileExistsError, match="not overwriting"):
        sh.merge_sharded(base, fts, ta, out, mesh=mesh)
    # In-memory models are placed with shard_like and merged like checkpoints.
    merged = sh.merge_sharded(base, fts, ta, mesh=mesh, rules=mm.RULES)
    assert merged["embed"].sharding.spec == jax.P(("r", "c"), None)
    # Small leaves are merged in groups on a 1-device mesh; they get their sharding back.
    target = sh.sharded_target(base, mesh, rules=mm.RULES)
    for x, t in zip(jax.tree.leaves(merged), jax.tree.leaves(target), strict=True):
        assert x.sharding == t.sharding, (x.sharding, t.sharding)
    want = fj.merge(base, fts, ta)
    for x, y in zip(jax.tree.leaves(merged), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
