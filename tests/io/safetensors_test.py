import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from fusionjax import io


def _tree():
    r = np.random.default_rng(0)
    return {
        "model": {
            "embed": r.normal(size=(10, 6)).astype(np.float32),
            "layers": [
                {"w": r.normal(size=(6, 6)).astype(jnp.bfloat16), "b": r.normal(size=6).astype(np.float16)}
                for _ in range(3)
            ],
        },
        "ids": np.arange(-5, 7, dtype=np.int32).reshape(3, 4),
        "count": np.array(9, np.int64),
    }


def _bits(x):
    x = np.asarray(x)
    return x.dtype, x.shape, x.tobytes()


def _same(a, b):
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert [jax.tree_util.keystr(p) for p, _ in fa] == [jax.tree_util.keystr(p) for p, _ in fb]
    for (p, x), (_, y) in zip(fa, fb, strict=True):
        assert _bits(x) == _bits(y), jax.tree_util.keystr(p)


def _as_nested_strings(tree):
    return io.nest(io.tree_to_flat(tree))


def test_single_file_round_trip_is_bit_identical_and_readable_by_safetensors(tmp_path):
    tree = _tree()
    p = io.save_safetensors(tree, tmp_path / "m.safetensors", metadata={"format": "np"})
    assert os.listdir(tmp_path) == ["m.safetensors"]  # nothing staged left behind
    _same(io.load_safetensors(p), _as_nested_strings(tree))
    # the reference reader agrees, and bf16 stayed bf16
    ref = load_file(str(p))
    assert ref["model.layers.1.w"].dtype == jnp.bfloat16
    assert _bits(ref["model.layers.1.w"]) == _bits(tree["model"]["layers"][1]["w"])
    # with a target: the original structure (lists) back
    _same(io.load_safetensors(p, target=tree), tree)


def test_sharded_round_trip_with_hugging_face_index(tmp_path):
    tree = _tree()
    out = io.save_safetensors(tree, tmp_path / "ckpt", max_shard_bytes=200)
    files = sorted(os.listdir(out))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))
    for f in shards:  # each shard respects the size (a larger single tensor has its own)
        arrays = load_file(str(out / f))
        assert sum(a.nbytes for a in arrays.values()) <= 200 or len(arrays) == 1
    _same(io.load_safetensors(out), _as_nested_strings(tree))
    src = io.open_checkpoint(out)
    assert src.names[0] == "count" and src.specs[src.names.index("model.embed")].shape == (10, 6)


def test_source_reads_metadata_only_and_one_tensor_at_a_time(tmp_path):
    p = io.save_safetensors(_tree(), tmp_path / "m.safetensors")
    src = io.open_checkpoint(p)
    assert jax.tree_util.keystr(src.paths[src.names.index("model.layers.2.b")]) == (
        "['model']['layers']['2']['b']"
    )
    assert src.kinds[src.names.index("ids")] == "other"
    assert src.kinds[src.names.index("model.embed")] == "param"
    i = src.names.index("model.layers.0.w")
    assert _bits(src.read(i)) == _bits(_tree()["model"]["layers"][0]["w"])


def test_missing_shard_corrupt_header_and_bad_index_name_the_file(tmp_path):
    out = io.save_safetensors(_tree(), tmp_path / "ckpt", max_shard_bytes=200)
    shards = sorted(out.glob("*.safetensors"))
    n = len(shards)
    shard = shards[1]
    assert shard.name == f"model-00002-of-{n:05d}.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 10**6) + data[8:])
    with pytest.raises(ValueError, match=rf"model-00002-of-{n:05d}\.safetensors is not a valid"):
        io.open_checkpoint(out)
    shard.write_bytes(data[:8] + b"}" + data[9:])
    with pytest.raises(ValueError, match=rf"model-00002-of-{n:05d}\.safetensors has a corrupt"):
        io.open_checkpoint(out)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"model-00002-of-{n:05d}\.safetensors"):
        io.open_checkpoint(out)
    shard.write_bytes(data)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.nope"] = shards[0].name
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"'model\.nope'.*model-00001-of-"):
        io.open_checkpoint(out)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        io.open_checkpoint(tmp_path / "nowhere.safetensors")


def test_target_mismatch_and_unstorable_leaves_are_errors(tmp_path):
    p = io.save_safetensors({"a": np.zeros((2, 3), np.float32)}, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"'a' has shape \(2, 3\), the target expects \(3, 2\)"):
        io.load_safetensors(p, target={"a": jax.ShapeDtypeStruct((3, 2), jnp.float32)})
    with pytest.raises(ValueError, match=r"no tensor 'b'"):
        io.load_safetensors(p, target={"b": np.zeros((2, 3), np.float32)})
    with pytest.raises(ValueError, match=r"\['x'\] is float"):
        io.save_safetensors({"x": 1.0}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=r"\['a'\]\['b\.c'\]"):
        io.save_safetensors({"a": {"b.c": np.zeros(1)}}, tmp_path / "y.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]
