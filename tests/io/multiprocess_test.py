"""Two JAX processes on this machine merge one model sharded over both, into one checkpoint.

Each process has two CPU devices (a global 2x2 mesh, one mesh row per
process), restores only its shards of the Orbax inputs, merges across the
global mesh (leafwise methods, and TIES with a model-wide threshold, whose
statistic is reduced across processes) and both write one Orbax checkpoint.
This process then loads each checkpoint on one device and compares it with
the one-process merge. The workers are ``multiprocess_worker.py``.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

import fusionjax as fj
from fusionjax.io import _sharded as sh
from tests.io import _mesh_models as mm

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
METHODS = ("ties_model", "task_arithmetic")  # in the workers' order


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_merge_equals_the_one_process_merge(tmp_path):
    base, fts = mm.models()
    for i, model in enumerate([base, *fts]):
        sh.save_sharded(model, tmp_path / "in" / str(i))
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    env.pop("XLA_FLAGS", None)
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), port, str(tmp_path)],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        # The one-process references, computed while the workers start and compile.
        refs = {}
        for name, merger in mm.methods(METHODS).items():
            refs[name] = fj.merge(base, fts, merger, key=jax.random.key(mm.KEY))
            mm.save_reference(refs[name], tmp_path / f"ref_{name}.npz")
        for p in procs:
            outs.append(p.communicate(timeout=240))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
    rows = [json.loads(line) for out, _ in outs for line in out.splitlines() if line[:1] == "{"]
    print("\n".join(map(json.dumps, rows)))
    for pid in (0, 1):
        steps = [r["step"] for r in rows if r["process"] == pid]
        assert steps == [*METHODS, "stream", "save_orbax", "merge_checkpoints", "nan", "done"], steps
        # Each process checked its own shards: 11 leaves x 2 local devices.
        assert all(r["shards"] == 22 for r in rows if r["process"] == pid and "shards" in r)
        # No process can fetch a leaf that spans both to its host (so the merge did not).
        assert all("non-addressable" in r["fetch_error"] for r in rows if "fetch_error" in r), rows

    # One checkpoint each, equal to the one-process merge: fusionjax.merge saved by
    # sharded.save_sharded (both processes), the streamed merge saved by io.save_orbax
    # (both), and io.merge_checkpoints on the mesh (both, one output).
    # io.merge_checkpoints without a mesh to safetensors: process 0 wrote it.
    from fusionjax import io

    outs = {name: name for name in METHODS} | {"save_orbax": "task_arithmetic",
                                               "mc": "task_arithmetic"}
    host = tmp_path / "out" / "host.safetensors"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*outs, host.name])
    got = mm.flat(io.load_safetensors(host))
    want = mm.flat(refs["task_arithmetic"])
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6, err_msg=k)
    for out, name in outs.items():
        path = tmp_path / "out" / out
        got = sh.load_sharded(path, target=mm.one_device_target(path))
        for (p, x), y in zip(
            jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(refs[name]), strict=True
        ):
            np.testing.assert_allclose(
                np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6, err_msg=f"{out} {p}"
            )
            assert x.dtype == y.dtype
