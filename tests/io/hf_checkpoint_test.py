"""Evidence: Hugging Face checkpoints (torch layout, HF names) merged and written back.

The checkpoints are written with the reference ``safetensors`` library and a hand-made
``model.safetensors.index.json``, as ``transformers`` would shard them; the merged output
is read back with ``safe_open`` and compared byte for byte with ``fj.merge`` run on the raw
torch-layout tensors in memory.
"""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import fusionjax as fj
from fusionjax import io

D, HEADS, KV_HEADS, FF, VOCAB = 16, 4, 2, 32, 40
KV = D // HEADS * KV_HEADS  # GQA: k/v project to fewer features


def _llama_shapes():
    s = {"model.embed_tokens.weight": (VOCAB, D), "model.norm.weight": (D,), "lm_head.weight": (VOCAB, D)}
    for i in range(2):
        p = f"model.layers.{i}."
        s |= {
            p + "self_attn.q_proj.weight": (D, D),
            p + "self_attn.k_proj.weight": (KV, D),
            p + "self_attn.v_proj.weight": (KV, D),
            p + "self_attn.o_proj.weight": (D, D),
            p + "mlp.gate_proj.weight": (FF, D),
            p + "mlp.up_proj.weight": (FF, D),
            p + "mlp.down_proj.weight": (D, FF),
            p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,),
        }
    return s


def _gpt2_shapes():
    s = {"transformer.wte.weight": (VOCAB, D), "transformer.wpe.weight": (8, D)}
    s |= {"transformer.ln_f.weight": (D,), "transformer.ln_f.bias": (D,)}
    for i in range(2):
        p = f"transformer.h.{i}."
        s |= {
            p + "ln_1.weight": (D,),
            p + "ln_1.bias": (D,),
            p + "attn.c_attn.weight": (D, 3 * D),
            p + "attn.c_attn.bias": (3 * D,),
            p + "attn.c_proj.weight": (D, D),
            p + "attn.c_proj.bias": (D,),
            p + "ln_2.weight": (D,),
            p + "ln_2.bias": (D,),
            p + "mlp.c_fc.weight": (D, 4 * D),
            p + "mlp.c_fc.bias": (4 * D,),
            p + "mlp.c_proj.weight": (4 * D, D),
            p + "mlp.c_proj.bias": (D,),
        }
    return s


def _variants(shapes, dtype, n=4):
    """A base and n - 1 fine-tuned variants (the base plus small noise)."""
    r = np.random.default_rng(0)
    base = {k: r.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    out = []
    for m in range(n):
        rm = np.random.default_rng(m + 1)
        out.append({k: (x + (0.05 * rm.standard_normal(x.shape) if m else 0)).astype(dtype)
                    for k, x in base.items()})
    return out


def _save_hf(tensors, d, shards=2):
    """Shards like transformers: model-0000k-of-0000N.safetensors plus the index."""
    d.mkdir()
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k * per : (k + 1) * per]}
        save_file(part, str(d / fname), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, fname)
    total = sum(x.nbytes for x in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    return d


def _read_hf(d):
    """Every tensor of a checkpoint, read with the reference library."""
    out = {}
    files = sorted(d.glob("*.safetensors")) if d.is_dir() else [d]
    for f in files:
        with safe_open(str(f), framework="numpy") as h:
            for n in h.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[n] = h.get_tensor(n)
    return out


def _assert_same_tensors(got, want):
    assert sorted(got) == sorted(want)
    for n, x in want.items():
        assert got[n].dtype == x.dtype, n
        assert got[n].shape == x.shape, n
        assert got[n].tobytes() == np.ascontiguousarray(x).tobytes(), n


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    models = _variants(_llama_shapes(), ml_dtypes.bfloat16)
    return models, [_save_hf(m, d / f"m{j}") for j, m in enumerate(models)]


def test_llama_round_trip_through_the_layout_is_bit_identical(llama, tmp_path):
    models, dirs = llama
    src = io.open_checkpoint(dirs[0], layout="hf")
    leaves = src.treedef.unflatten([src.read(i) for i in range(len(src.paths))])
    attn = leaves["model"]["layers"]["1"]["self_attn"]
    # flax layout: kernels [in, out] (GQA k: [D, KV]), embeddings and norm scales as they are
    assert attn["k_proj"]["kernel"].shape == (D, KV)
    np.testing.assert_array_equal(attn["q_proj"]["kernel"], models[0]["model.layers.1.self_attn.q_proj.weight"].T)
    assert leaves["model"]["layers"]["0"]["input_layernorm"]["scale"].dtype == jnp.bfloat16
    assert leaves["lm_head"]["kernel"].shape == (D, VOCAB)
    out = tmp_path / "back"
    sink = io.open_sink(out, format="safetensors", like=src, layout=src.layout, max_shard_bytes=8 << 10)
    for i in range(len(src.paths)):
        sink.write(i, src.read(i))
    sink.finish()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(models[0])
    _assert_same_tensors(_read_hf(out), models[0])


@pytest.mark.parametrize("merger", [fj.merging.task_arithmetic(scaling=0.4), fj.merging.ties(density=0.3)],
                         ids=["ta", "ties"])
def test_llama_merge_written_back_equals_merging_the_torch_tensors(llama, tmp_path, merger):
    models, dirs = llama
    out = tmp_path / "merged"
    r = io.merge_checkpoints(dirs[0], dirs[1:], merger, out, format="safetensors", layout="hf", progress=False)
    assert r.num_leaves == len(models[0])
    # q/k/v are separate tensors in Llama, so per-leaf TIES on the transposed kernels
    # is TIES per torch tensor (trimming and sign election ignore element order).
    want = fj.merge(models[0], models[1:], merger)
    _assert_same_tensors(_read_hf(out), {n: np.asarray(x) for n, x in want.items()})


def test_gpt2_fused_qkv_merge_written_back(tmp_path):
    models = _variants(_gpt2_shapes(), np.float32)
    dirs = [_save_hf(m, tmp_path / f"g{j}") for j, m in enumerate(models)]
    src = io.open_checkpoint(dirs[0], layout="hf")
    names = ["/".join(k.key for k in p) for p in src.paths]
    assert "transformer/h/0/attn/query/kernel" in names and "transformer/h/0/attn/c_attn/weight" not in names
    merger = fj.merging.task_arithmetic(scaling=0.7)
    out = tmp_path / "gpt2.safetensors"
    io.merge_checkpoints(dirs[0], dirs[1:], merger, out, layout="hf", progress=False)
    want = fj.merge(models[0], models[1:], merger)
    _assert_same_tensors(_read_hf(out), {n: np.asarray(x) for n, x in want.items()})
    # out_layout="target": the flax leaves, named by their paths
    out2 = tmp_path / "gpt2_target.safetensors"
    io.merge_checkpoints(dirs[0], dirs[1:], merger, out2, layout="hf", out_layout="target", progress=False)
    got = _read_hf(out2)
    fused = want["transformer.h.1.attn.c_attn.weight"]
    np.testing.assert_array_equal(got["transformer.h.1.attn.key.kernel"], np.asarray(fused)[:, D : 2 * D])


def test_layout_sink_holds_only_the_parts_of_one_fused_tensor(tmp_path):
    models = _variants(_gpt2_shapes(), np.float32, n=1)
    d = _save_hf(models[0], tmp_path / "g", shards=1)
    src = io.open_checkpoint(d, layout="hf")
    sink = io.open_sink(tmp_path / "o.safetensors", like=src, layout=src.layout)
    names = ["/".join(k.key for k in p) for p in src.paths]
    held = []
    for i in range(len(src.paths)):  # the merge's order: key, query, value of a block
        sink.write(i, src.read(i))
        held.append({names[j].rsplit("/", 1)[0] for j in sink._pending})
    sink.finish()
    # At most the key/query parts of one block's fused c_attn weight and bias wait for value.
    assert max(len(h) for h in held) == 2 and not held[-1]
    assert all(len({n.split("/attn/")[0] for n in h}) <= 1 for h in held)
    _assert_same_tensors(_read_hf(tmp_path / "o.safetensors"), models[0])


def test_layout_sink_rejects_leaves_the_layout_lacks_before_writing(tmp_path):
    models = _variants(_gpt2_shapes(), np.float32, n=1)
    d = _save_hf(models[0], tmp_path / "g", shards=1)
    src = io.open_checkpoint(d, layout="hf")
    raw = io.open_checkpoint(d)
    with pytest.raises(ValueError, match="target path 'transformer/h/0/attn/query/"):
        io.open_sink(tmp_path / "o.safetensors", like=raw, layout=src.layout)
    with pytest.raises(ValueError, match="out_layout"):
        io.merge_checkpoints(d, [d], fj.merging.task_arithmetic(), tmp_path / "x.safetensors",
                             out_layout="torch", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]
