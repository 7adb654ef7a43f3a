"""The small model, mesh rules and methods shared by the sharded and multi-process tests.

Imported by the tests and by the worker processes they start (which put this
folder on ``sys.path``), so both sides build the same models and methods.
"""

import os
import time

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

import fusionjax as fj
from fusionjax._src import paths as paths_lib

# Leaves no rule names get fusionjax.io._sharded.default_spec: rows over "r", columns over
# "c" (matrices), replicated (vectors). Every distinct sharding costs compiles: keep them few.
RULES = {"embed": P(("r", "c"), None)}
MESH_SHAPE = (2, 2)
AXES = ("r", "c")
KEY = 0


def host_model(seed, *, of=None):
    """A two-layer model of NumPy arrays; ``of``: a base to fine-tune (base + small noise)."""
    r = np.random.default_rng(seed)

    def f(*shape):
        return r.normal(size=shape).astype(np.float32)

    model = {
        "embed": f(16, 16),
        "layers": [
            {"attn": {"kernel": f(16, 16)}, "mlp": {"kernel": f(16, 16), "bias": f(16)}, "norm": f(16)}
            for _ in range(2)
        ],
        "batch_stats": {"mean": f(16)},
        "step": np.array(5, np.int32),
    }
    if of is None:
        return model
    return jax.tree.map(
        lambda b, x: b + np.float32(0.1) * x if b.dtype == np.float32 else b, of, model
    )


def models(num_finetuned=3):
    """``(base, [finetuned...])`` as NumPy pytrees."""
    base = host_model(0)
    return base, [host_model(i, of=base) for i in range(1, num_finetuned + 1)]


def methods(names=None):
    """``{name: merger}``: leafwise and model-wide methods."""
    out = {
        "task_arithmetic": fj.merging.task_arithmetic(scaling=0.4),
        "ties": fj.merging.ties(density=0.3),
        "ties_model": fj.merging.ties(density=0.3, scope="model"),
        "dare": fj.merging.dare(drop_rate=0.5),
    }
    return out if names is None else {n: out[n] for n in names}


def flat(tree):
    """``{path name: NumPy array}`` of a pytree (for .npz references)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {paths_lib.path_name(p): np.asarray(x) for p, x in leaves}


def save_reference(tree, path):
    """Writes ``flat(tree)`` to ``path`` (.npz) atomically, for a worker that waits on it."""
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, **flat(tree))
    os.replace(tmp, path)


def load_reference(path, timeout=120.0):
    """``{path name: array}`` from ``path``, waiting for the test process to write it.

    The test starts its workers first and computes the unsharded references
    while they start up and compile, so the two overlap.
    """
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"no reference at {path} after {timeout} s")
        time.sleep(0.02)
    return dict(np.load(path))


def one_device_target(path):
    """The abstract tree of an Orbax checkpoint, every leaf on this process's first device."""
    from fusionjax.io import _sharded as sh

    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), sh.checkpoint_specs(path)
    )


def check_shards(out, like, ref, *, strict=True):
    """Asserts ``out`` has ``like``'s shardings and each local shard equals ``ref``'s slice.

    ``out``: a pytree of jax.Arrays; ``like``: arrays or specs with the
    shardings expected, matched by path name (so nested dicts of string keys
    from a checkpoint source match lists); ``ref``: ``{path name: NumPy array}``.
    ``strict``: the shardings compare equal (explicit mesh axes); otherwise they
    are equivalent (same device for every index: with auto axes XLA writes
    ``P(('r', 'c'), None)`` back as ``P(('r', 'c'),)``). Returns the number of
    shards checked.
    """
    expected = {k: x.sharding for k, x in flat_specs(like).items()}
    got = flat_specs(out)
    assert sorted(got) == sorted(expected) == sorted(ref), (sorted(got), sorted(ref))
    n = 0
    for name, x in got.items():
        want = expected[name]
        assert x.sharding.is_equivalent_to(want, x.ndim), (name, x.sharding, want)
        if strict:
            assert x.sharding == want, (name, x.sharding, want)
        placed = want.devices_indices_map(x.shape)
        for s in x.addressable_shards:
            assert placed[s.device] == s.index, (name, s.device, s.index, placed[s.device])
            assert s.data.shape == x.sharding.shard_shape(x.shape), name
            np.testing.assert_allclose(
                np.asarray(s.data), ref[name][s.index], rtol=1e-6, atol=1e-6, err_msg=name
            )
            n += 1
    return n


def flat_specs(tree):
    """``{path name: leaf}`` without touching values."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {paths_lib.path_name(p): x for p, x in leaves}
