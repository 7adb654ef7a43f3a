"""One of two JAX processes merging models sharded over a global 2x2 mesh.

Run by ``multiprocess_test.py`` as ``python multiprocess_worker.py PROCESS_ID PORT WORKDIR``:
two CPU devices per process, ``jax.distributed.initialize`` on localhost. Each
process restores only its shards of the input checkpoints, merges with
:func:`fusionjax.merge` across the global mesh, checks its own shards against
the unsharded reference and writes its part of one Orbax checkpoint per
method. Prints one JSON line per step.
"""

import json
import os
import sys
import time


def main(process_id: int, port: str, work: str) -> None:
    """Runs this process's part; raises on any failed check."""
    t0 = time.perf_counter()
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
    )
    init_s = time.perf_counter() - t0
    import numpy as np
    from jax.sharding import Mesh

    import fusionjax as fj
    from fusionjax.io import _sharded as sh

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _mesh_models as mm

    def report(**row):
        print(json.dumps({"process": process_id, **row}), flush=True)

    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    # Model-wide TIES on a mesh of explicit axes (jax.make_mesh's default), TA on
    # one of auto axes (jax.sharding.Mesh); each process holds one mesh row.
    meshes = {
        "ties_model": jax.make_mesh(mm.MESH_SHAPE, mm.AXES),
        "task_arithmetic": Mesh(np.array(jax.devices()).reshape(mm.MESH_SHAPE), mm.AXES),
    }
    for name, mesh in meshes.items():
        t = time.perf_counter()
        # The default shardings (rows over "r", columns over "c"; vectors replicated).
        models = [sh.load_sharded(f"{work}/in/{i}", mesh) for i in range(4)]
        restore_s = time.perf_counter() - t
        base, fts = models[0], models[1:]
        w = base["layers"][0]["attn"]["kernel"]
        assert not w.is_fully_addressable and len(w.addressable_shards) == 2
        assert {s.data.shape for s in w.addressable_shards} == {(8, 8)}
        try:  # so a merge that copied a leaf to the host would fail here
            np.asarray(w)
        except RuntimeError as e:
            fetch_error = str(e).split(". ")[0]
        else:
            raise AssertionError("a leaf spanning both processes was fetched to one")
        # Leafwise (no communication but the finite check) and model-wide (the
        # threshold statistic is reduced across the processes).
        merger = mm.methods([name])[name]
        t = time.perf_counter()
        out = fj.merge(base, fts, merger, key=jax.random.key(mm.KEY))
        jax.block_until_ready(out)
        merge_s = time.perf_counter() - t
        ref = mm.load_reference(f"{work}/ref_{name}.npz")
        explicit = jax.sharding.AxisType.Explicit in mesh.axis_types
        shards = mm.check_shards(out, base, ref, strict=explicit)
        t = time.perf_counter()
        sh.save_sharded(out, f"{work}/out/{name}")
        report(step=name, init_s=init_s, restore_s=restore_s, merge_s=merge_s,
               save_s=time.perf_counter() - t, shards=shards, fetch_error=fetch_error)

    # Streamed: fusionjax.io.OrbaxSource restores leaves onto the global mesh,
    # each process its shards (TA on the auto mesh again: compiled already).
    from fusionjax import io

    target = sh.sharded_target(f"{work}/in/0", mesh)
    t = time.perf_counter()
    srcs = [io.OrbaxSource(f"{work}/in/{i}", target=target) for i in range(4)]
    out = fj.merge(srcs[0], srcs[1:], mm.methods(["task_arithmetic"])["task_arithmetic"])
    jax.block_until_ready(out)
    shards = mm.check_shards(
        out, target, mm.load_reference(f"{work}/ref_task_arithmetic.npz"), strict=False
    )
    report(step="stream", merge_s=time.perf_counter() - t, shards=shards)
    # io.save_orbax from both processes: one checkpoint, committed by process 0.
    t = time.perf_counter()
    io.save_orbax(out, f"{work}/out/save_orbax")
    report(step="save_orbax", save_s=time.perf_counter() - t)

    # io.merge_checkpoints on the mesh, Orbax -> Orbax: every leaf of every input
    # is read once (sharded specs from metadata: no group read, then re-read), each
    # process restores only its shards and writes them; process 0 commits.
    from fusionjax.io import _orbax

    reads, plain_read = {}, _orbax.OrbaxSource.read

    def counted(self, i):
        key = (str(self.path), i)
        reads[key] = reads.get(key, 0) + 1
        x = plain_read(self, i)
        assert not isinstance(x, np.ndarray), (key, type(x))  # never read to the host
        return x

    _orbax.OrbaxSource.read = counted
    ta = mm.methods(["task_arithmetic"])["task_arithmetic"]
    ins = [f"{work}/in/{i}" for i in range(4)]
    try:
        t = time.perf_counter()
        r = io.merge_checkpoints(ins[0], ins[1:], ta, f"{work}/out/mc", mesh=mesh, progress=False)
        mc_s = time.perf_counter() - t
    finally:
        _orbax.OrbaxSource.read = plain_read
    # Once each; the base's running statistic (batch_stats/mean, averaged over the
    # fine-tuned models) not at all.
    assert set(reads.values()) == {1} and len(reads) == 4 * r.num_leaves - 1, reads
    assert (ins[0], 0) not in reads and r.num_leaves == 11, sorted(reads)
    # Safetensors output of leaves sharded over both processes: refused before any read.
    try:
        io.merge_checkpoints(ins[0], ins[1:], ta, f"{work}/out/mc.safetensors", mesh=mesh)
    except ValueError as e:
        assert "sharded over several processes" in str(e), e
        assert not os.path.exists(f"{work}/out/.mc.safetensors.fusionjax-tmp")
    else:
        raise AssertionError("safetensors output of cross-process leaves was not refused")
    # Without a mesh every process merges everything on its host; process 0 alone
    # writes the safetensors file and commits it (no clash over the staging dir).
    t = time.perf_counter()
    io.merge_checkpoints(ins[0], ins[1:], ta, f"{work}/out/host.safetensors", progress=False)
    report(step="merge_checkpoints", merge_s=mc_s, reads=len(reads), leaves=r.num_leaves,
           host_s=time.perf_counter() - t)

    # A NaN in a shard that only process 1 holds is found by both processes
    # (on the auto mesh: TA is compiled for it).
    host = jax.tree.map(np.copy, mm.models()[1][0])
    host["layers"][1]["attn"]["kernel"][12, 12] = np.nan  # rows 8.., cols 8..: device (1, 1)
    owner = mesh.devices[1, 1]
    assert (owner.process_index == process_id) == (process_id == 1)
    target = sh.sharded_target(base, mesh)
    bad = sh.shard_like(host, jax.tree.map(lambda s: s.sharding, target))
    try:
        fj.merge(base, [bad, *fts[1:]], mm.methods(["task_arithmetic"])["task_arithmetic"])
    except ValueError as e:
        assert "finetuned[0] has NaN or Inf values at ['layers'][1]['attn']['kernel']" in str(e)
        report(step="nan", error=str(e))
    else:
        raise AssertionError("the NaN was not found")
    report(step="done", total_s=time.perf_counter() - t0)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
