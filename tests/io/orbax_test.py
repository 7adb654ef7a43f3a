import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fusionjax import io


def _tree():
    r = np.random.default_rng(1)
    return {
        "dense": {
            "kernel": jnp.asarray(r.normal(size=(6, 4)), jnp.float32),
            "bias": jnp.asarray(r.normal(size=4), jnp.bfloat16),
        },
        "norm": {"scale": jnp.asarray(r.normal(size=4), jnp.float16)},
        "ids": jnp.arange(12, dtype=jnp.int32).reshape(3, 4),
    }


def _bits(x):
    x = np.asarray(x)
    return x.dtype, x.shape, x.tobytes()


def test_round_trip_bit_identical_plain_and_abstract_target(tmp_path):
    tree = _tree()
    p = io.save_orbax(tree, tmp_path / "ck")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ck"]
    for restored in (io.load_orbax(p), io.load_orbax(p, jax.eval_shape(lambda: tree))):
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
            assert _bits(a) == _bits(b)
    with ocp.StandardCheckpointer() as ck:  # plain orbax reads it too
        assert _bits(ck.restore(p)["dense"]["bias"]) == _bits(tree["dense"]["bias"])


def test_sharded_restore_onto_the_target_sharding(tmp_path):
    tree = _tree()
    p = io.save_orbax(tree, tmp_path / "ck")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree)
    restored = io.load_orbax(p, target)
    assert restored["dense"]["kernel"].sharding == s
    assert _bits(restored["dense"]["kernel"]) == _bits(tree["dense"]["kernel"])


def test_source_reads_metadata_then_leaves_lazily_in_batches(tmp_path):
    tree = {"layers": [{"w": jnp.full((8, 8), i, jnp.float32)} for i in range(6)]}
    p = io.save_orbax(tree, tmp_path / "ck")
    src = io.open_checkpoint(p, batch_bytes=2 * 8 * 8 * 4)
    assert src.names == [f"layers.{i}.w" for i in range(6)]
    assert jax.tree_util.keystr(src.paths[3]) == "['layers']['3']['w']"
    assert src.restore_calls == 0  # metadata only
    values = [src.read(i) for i in range(6)]
    assert src.restore_calls == 3  # two leaves per partial restore
    for i, v in enumerate(values):
        assert isinstance(v, np.ndarray) and _bits(v) == _bits(tree["layers"][i]["w"])


def test_sink_writes_one_standard_checkpoint_in_batches_committed_in_finish(tmp_path):
    tree = {"layers": {str(i): {"w": np.full((8, 8), i, np.float32)} for i in range(5)}}
    src = io.open_checkpoint(io.save_orbax(tree, tmp_path / "in"))
    out = tmp_path / "out"
    sink = io.open_sink(out, format="orbax", like=src, dtype=jnp.bfloat16, batch_bytes=300)
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())  # nothing yet
    for i in range(5):
        sink.write(i, src.read(i))
        assert not out.exists()
    assert sink.finish() == out
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in", "out"]
    with ocp.StandardCheckpointer() as ck:
        restored = ck.restore(out)
    for i in range(5):
        w = restored["layers"][str(i)]["w"]
        assert w.dtype == jnp.bfloat16 and (np.asarray(w, np.float32) == i).all()


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        io.open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is neither"):
        io.open_checkpoint(tmp_path / "empty")
