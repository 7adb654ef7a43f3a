"""Layout maps: torch / Hugging Face tensors <-> flax leaves, exact both ways and *right*.

Tiny random checkpoints in Llama, GPT-2, Hugging Face ViT and timm ViT naming (NumPy
arrays, no files). Round trips are compared byte for byte; correctness is checked by
running the same layer both ways (torch's formula on torch's layout in NumPy, flax's on
the mapped leaves).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fusionjax.io import _layout
from fusionjax.io._layout import detect_family
from fusionjax.io._layout import flat_layout
from fusionjax.io._layout import hf_layout
from fusionjax.io._layout import layout_for

BF16 = ml_dtypes.bfloat16
D, V, P = 8, 11, 5  # width, vocabulary, positions / patches


def _rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def llama_ckpt(rng, *, head=True, dtype=np.float32):
    t = {"model.embed_tokens.weight": _rand(rng, (V, D), dtype)}
    for i in range(2):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = _rand(rng, (D,), dtype)
        t[p + "self_attn.q_proj.weight"] = _rand(rng, (D, D), dtype)
        t[p + "self_attn.k_proj.weight"] = _rand(rng, (D // 2, D), dtype)  # grouped-query
        t[p + "self_attn.v_proj.weight"] = _rand(rng, (D // 2, D), dtype)
        t[p + "self_attn.o_proj.weight"] = _rand(rng, (D, D), dtype)
        t[p + "post_attention_layernorm.weight"] = _rand(rng, (D,), dtype)
        t[p + "mlp.gate_proj.weight"] = _rand(rng, (2 * D, D), dtype)
        t[p + "mlp.up_proj.weight"] = _rand(rng, (2 * D, D), dtype)
        t[p + "mlp.down_proj.weight"] = _rand(rng, (D, 2 * D), dtype)
    t["model.norm.weight"] = _rand(rng, (D,), dtype)
    if head:
        t["lm_head.weight"] = _rand(rng, (V, D), dtype)
    return t


def gpt2_ckpt(rng, *, prefix="transformer.", dtype=np.float32):
    t = {prefix + "wte.weight": _rand(rng, (V, D), dtype), prefix + "wpe.weight": _rand(rng, (P, D), dtype)}
    for i in range(2):
        p = f"{prefix}h.{i}."
        t[p + "ln_1.weight"] = _rand(rng, (D,), dtype)
        t[p + "ln_1.bias"] = _rand(rng, (D,), dtype)
        t[p + "attn.bias"] = np.tril(np.ones((1, 1, P, P), bool))  # causal-mask buffer
        t[p + "attn.c_attn.weight"] = _rand(rng, (D, 3 * D), dtype)
        t[p + "attn.c_attn.bias"] = _rand(rng, (3 * D,), dtype)
        t[p + "attn.c_proj.weight"] = _rand(rng, (D, D), dtype)
        t[p + "attn.c_proj.bias"] = _rand(rng, (D,), dtype)
        t[p + "ln_2.weight"] = _rand(rng, (D,), dtype)
        t[p + "ln_2.bias"] = _rand(rng, (D,), dtype)
        t[p + "mlp.c_fc.weight"] = _rand(rng, (D, 4 * D), dtype)
        t[p + "mlp.c_fc.bias"] = _rand(rng, (4 * D,), dtype)
        t[p + "mlp.c_proj.weight"] = _rand(rng, (4 * D, D), dtype)
        t[p + "mlp.c_proj.bias"] = _rand(rng, (D,), dtype)
    t[prefix + "ln_f.weight"] = _rand(rng, (D,), dtype)
    t[prefix + "ln_f.bias"] = _rand(rng, (D,), dtype)
    return t


def vit_ckpt(rng, dtype=np.float32):
    t = {
        "vit.embeddings.cls_token": _rand(rng, (1, 1, D), dtype),
        "vit.embeddings.position_embeddings": _rand(rng, (1, P, D), dtype),
        "vit.embeddings.patch_embeddings.projection.weight": _rand(rng, (D, 3, 2, 2), dtype),
        "vit.embeddings.patch_embeddings.projection.bias": _rand(rng, (D,), dtype),
    }
    for i in range(2):
        p = f"vit.encoder.layer.{i}."
        for q in ("query", "key", "value"):
            t[p + f"attention.attention.{q}.weight"] = _rand(rng, (D, D), dtype)
            t[p + f"attention.attention.{q}.bias"] = _rand(rng, (D,), dtype)
        t[p + "attention.output.dense.weight"] = _rand(rng, (D, D), dtype)
        t[p + "attention.output.dense.bias"] = _rand(rng, (D,), dtype)
        t[p + "intermediate.dense.weight"] = _rand(rng, (4 * D, D), dtype)
        t[p + "intermediate.dense.bias"] = _rand(rng, (4 * D,), dtype)
        t[p + "output.dense.weight"] = _rand(rng, (D, 4 * D), dtype)
        t[p + "output.dense.bias"] = _rand(rng, (D,), dtype)
        for n in ("layernorm_before", "layernorm_after"):
            t[p + f"{n}.weight"] = _rand(rng, (D,), dtype)
            t[p + f"{n}.bias"] = _rand(rng, (D,), dtype)
    t["vit.layernorm.weight"] = _rand(rng, (D,), dtype)
    t["vit.layernorm.bias"] = _rand(rng, (D,), dtype)
    t["classifier.weight"] = _rand(rng, (3, D), dtype)
    t["classifier.bias"] = _rand(rng, (3,), dtype)
    return t


def timm_vit_ckpt(rng, dtype=np.float32):
    t = {
        "cls_token": _rand(rng, (1, 1, D), dtype),
        "pos_embed": _rand(rng, (1, P, D), dtype),
        "patch_embed.proj.weight": _rand(rng, (D, 3, 2, 2), dtype),
        "patch_embed.proj.bias": _rand(rng, (D,), dtype),
    }
    for i in range(2):
        p = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            t[p + f"{n}.weight"] = _rand(rng, (D,), dtype)
            t[p + f"{n}.bias"] = _rand(rng, (D,), dtype)
        t[p + "attn.qkv.weight"] = _rand(rng, (3 * D, D), dtype)
        t[p + "attn.qkv.bias"] = _rand(rng, (3 * D,), dtype)
        t[p + "attn.proj.weight"] = _rand(rng, (D, D), dtype)
        t[p + "attn.proj.bias"] = _rand(rng, (D,), dtype)
        t[p + "mlp.fc1.weight"] = _rand(rng, (4 * D, D), dtype)
        t[p + "mlp.fc1.bias"] = _rand(rng, (4 * D,), dtype)
        t[p + "mlp.fc2.weight"] = _rand(rng, (D, 4 * D), dtype)
        t[p + "mlp.fc2.bias"] = _rand(rng, (D,), dtype)
    t["norm.weight"] = _rand(rng, (D,), dtype)
    t["norm.bias"] = _rand(rng, (D,), dtype)
    t["head.weight"] = _rand(rng, (3, D), dtype)
    t["head.bias"] = _rand(rng, (3,), dtype)
    return t


CKPTS = {"llama": llama_ckpt, "gpt2": gpt2_ckpt, "vit": vit_ckpt, "timm_vit": timm_vit_ckpt}


def _specs(flat):
    return {n: jax.ShapeDtypeStruct(x.shape, x.dtype) for n, x in flat.items()}


def _leaf(tree, path):
    for k in path.split("/"):
        tree = tree[k]
    return np.asarray(tree)


def _assert_bit_identical(got, want):
    assert list(got) == list(want), "names or their order changed"
    for n in want:
        a, b = np.asarray(got[n]), np.asarray(want[n])
        assert a.dtype == b.dtype and a.shape == b.shape, n
        assert a.tobytes() == b.tobytes(), n


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", list(CKPTS))
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["f32", "bf16"])
def test_round_trip_is_bit_identical(family, dtype):
    flat = CKPTS[family](np.random.default_rng(0), dtype=dtype)
    lay = hf_layout(_specs(flat))
    assert lay.family == family
    tree = lay.apply(flat)
    # The target tree is what the layout promised, leaf by leaf, without data.
    specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    assert specs == lay.abstract()
    for path, leaf in lay.leaves.items():
        out = jax.eval_shape(leaf.fn, *(lay.specs[n] for n in leaf.sources))
        assert (out.shape, out.dtype) == (leaf.spec.shape, leaf.spec.dtype), path
    # No leaf is left torch-named.
    assert not any(p[-1] == "weight" for p in lay.leaves)
    _assert_bit_identical(lay.invert(tree), flat)


def test_round_trip_with_jax_arrays():
    flat = CKPTS["timm_vit"](np.random.default_rng(1), dtype=BF16)
    lay = hf_layout(_specs(flat))
    tree = jax.tree.map(jnp.asarray, lay.apply({n: jnp.asarray(x) for n, x in flat.items()}))
    back = lay.invert(tree)
    assert all(isinstance(x, jax.Array) for x in back.values())
    _assert_bit_identical(back, flat)


def test_numpy_in_numpy_out_keeps_64_bit():
    flat = {"model.embed_tokens.weight": np.arange(V * D, dtype=np.float64).reshape(V, D),
            "model.layers.0.self_attn.q_proj.weight": np.ones((D, D), np.float64)}
    lay = hf_layout(_specs(flat))
    tree = lay.apply(flat)
    kernel = tree["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(kernel, np.ndarray) and kernel.dtype == np.float64
    assert lay.leaves[("model", "embed_tokens", "embedding")].spec.dtype == np.float64
    _assert_bit_identical(lay.invert(tree), flat)


def test_flat_layout_nests_on_dots_and_round_trips():
    flat = llama_ckpt(np.random.default_rng(2))
    lay = flat_layout(_specs(flat))
    tree = lay.apply(flat)
    np.testing.assert_array_equal(
        tree["model"]["layers"]["1"]["mlp"]["up_proj"]["weight"], flat["model.layers.1.mlp.up_proj.weight"]
    )
    _assert_bit_identical(lay.invert(tree), flat)


def test_target_names_and_shapes():
    lay = hf_layout(_specs(llama_ckpt(np.random.default_rng(0))))
    leaves = {"/".join(p): leaf.spec.shape for p, leaf in lay.leaves.items()}
    assert leaves["model/embed_tokens/embedding"] == (V, D)
    assert leaves["model/layers/0/self_attn/k_proj/kernel"] == (D, D // 2)
    assert leaves["model/layers/1/mlp/down_proj/kernel"] == (2 * D, D)
    assert leaves["model/layers/0/input_layernorm/scale"] == (D,)
    assert leaves["model/norm/scale"] == (D,)
    assert leaves["lm_head/kernel"] == (D, V)
    lay = hf_layout(_specs(gpt2_ckpt(np.random.default_rng(0))))
    leaves = {"/".join(p): (leaf.spec.shape, leaf.kind) for p, leaf in lay.leaves.items()}
    assert leaves["transformer/h/0/attn/key/kernel"] == ((D, D), "gpt2_qkv")
    assert leaves["transformer/h/0/attn/value/bias"] == ((D,), "gpt2_qkv")
    assert leaves["transformer/h/1/mlp/c_fc/kernel"] == ((D, 4 * D), "gpt2_conv1d")
    assert leaves["transformer/h/0/attn/bias"] == ((1, 1, P, P), "param")  # the mask buffer
    assert leaves["transformer/wpe/embedding"] == ((P, D), "embedding")
    assert leaves["transformer/ln_f/scale"] == ((D,), "norm")
    assert lay.tensors["transformer.h.0.attn.c_attn.weight"].targets == tuple(
        ("transformer", "h", "0", "attn", q, "kernel") for q in ("query", "key", "value")
    )
    lay = hf_layout(_specs(timm_vit_ckpt(np.random.default_rng(0))))
    leaves = {"/".join(p): leaf.spec.shape for p, leaf in lay.leaves.items()}
    assert leaves["patch_embed/proj/kernel"] == (2, 2, 3, D)
    assert leaves["blocks/1/attn/query/kernel"] == (D, D)
    assert leaves["pos_embed"] == (1, P, D)


def test_gpt2_without_the_transformer_prefix():
    # The original gpt2 checkpoint names its tensors `h.0.attn.c_attn.weight`, `wte.weight`.
    flat = gpt2_ckpt(np.random.default_rng(3), prefix="")
    lay = hf_layout(_specs(flat))
    assert lay.family == "gpt2" and ("h", "0", "attn", "query", "kernel") in lay.leaves
    assert lay.tied == {("lm_head", "kernel"): "wte.weight"}
    _assert_bit_identical(lay.invert(lay.apply(flat)), flat)


# ----------------------------------------------------------------------------- correctness


def test_linear_forward_matches_torch():
    flat = llama_ckpt(np.random.default_rng(4))
    flat["model.layers.0.self_attn.q_proj.bias"] = _rand(np.random.default_rng(5), (D,))  # Qwen2
    lay = hf_layout(_specs(flat))
    tree = lay.apply(flat)
    x = _rand(np.random.default_rng(6), (3, D))
    w, b = flat["model.layers.0.self_attn.q_proj.weight"], flat["model.layers.0.self_attn.q_proj.bias"]
    torch_out = x @ w.T + b  # torch.nn.Linear
    q = tree["model"]["layers"]["0"]["self_attn"]["q_proj"]
    flax_out = jnp.asarray(x) @ jnp.asarray(q["kernel"]) + jnp.asarray(q["bias"])[None]  # nn.Dense
    np.testing.assert_allclose(flax_out, torch_out, rtol=1e-5, atol=1e-5)
    # The output head: logits from the hidden state, and the embedding lookup.
    h = x
    np.testing.assert_allclose(h @ np.asarray(tree["lm_head"]["kernel"]), h @ flat["lm_head.weight"].T, rtol=1e-6)
    ids = np.array([3, 0, 10])
    np.testing.assert_array_equal(tree["model"]["embed_tokens"]["embedding"][ids], flat["model.embed_tokens.weight"][ids])


def _torch_conv2d(x, w, b, stride):
    # torch.nn.functional.conv2d: x [N, C, H, W], w [O, C, kh, kw], cross-correlation.
    n, _, hh, ww = x.shape
    o, _, kh, kw = w.shape
    ho, wo = (hh - kh) // stride + 1, (ww - kw) // stride + 1
    out = np.zeros((n, o, ho, wo), np.float64)
    for i in range(ho):
        for j in range(wo):
            patch = x[:, :, i * stride : i * stride + kh, j * stride : j * stride + kw]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w)
    return out + b[None, :, None, None]


@pytest.mark.parametrize("family,name,stride", [("timm_vit", "patch_embed.proj", 2), ("vit", "vit.embeddings.patch_embeddings.projection", 1)])
def test_conv_forward_matches_torch(family, name, stride):
    flat = CKPTS[family](np.random.default_rng(7))
    lay = hf_layout(_specs(flat))
    tree = lay.apply(flat)
    x = _rand(np.random.default_rng(8), (2, 3, 6, 6))  # NCHW
    want = _torch_conv2d(x.astype(np.float64), flat[name + ".weight"].astype(np.float64),
                         flat[name + ".bias"].astype(np.float64), stride)
    kernel = _leaf(tree, name.replace(".", "/") + "/kernel")
    bias = _leaf(tree, name.replace(".", "/") + "/bias")
    got = jax.lax.conv_general_dilated(
        jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(kernel), (stride, stride), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST,
    ) + jnp.asarray(bias).reshape(1, 1, 1, -1)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=1e-5, atol=1e-5)


def test_conv1d_and_conv3d_kernels_follow_the_same_rule():
    rng = np.random.default_rng(9)
    for shape in [(4, 3, 5), (4, 3, 2, 3, 5)]:
        w = _rand(rng, shape)
        lay = layout_for("timm_vit", _specs({"patch_embed.proj.weight": w}))
        k = lay.apply({"patch_embed.proj.weight": w})["patch_embed"]["proj"]["kernel"]
        assert k.shape == (*shape[2:], 3, 4)
        # kernel[*s, i, o] == weight[o, i, *s]
        np.testing.assert_array_equal(k[..., 1, 2], w[2, 1])
        _assert_bit_identical(lay.invert(lay.apply({"patch_embed.proj.weight": w})), {"patch_embed.proj.weight": w})


def test_gpt2_qkv_split_equals_slicing_the_fused_projection():
    flat = gpt2_ckpt(np.random.default_rng(10))
    tree = hf_layout(_specs(flat)).apply(flat)
    x = _rand(np.random.default_rng(11), (4, D))
    # HF GPT-2: Conv1D computes x @ W + b, then .split(D, dim=-1) gives q, k, v.
    fused = x @ flat["transformer.h.1.attn.c_attn.weight"] + flat["transformer.h.1.attn.c_attn.bias"]
    attn = tree["transformer"]["h"]["1"]["attn"]
    for i, q in enumerate(("query", "key", "value")):
        np.testing.assert_allclose(x @ attn[q]["kernel"] + attn[q]["bias"], fused[:, i * D : (i + 1) * D], rtol=1e-5, atol=1e-5)
    # Conv1D layers are already [in, out]: the same x @ W + b.
    mlp = tree["transformer"]["h"]["1"]["mlp"]["c_fc"]
    np.testing.assert_array_equal(mlp["kernel"], flat["transformer.h.1.mlp.c_fc.weight"])


def test_timm_qkv_split_equals_slicing_the_fused_projection():
    flat = timm_vit_ckpt(np.random.default_rng(12))
    tree = hf_layout(_specs(flat)).apply(flat)
    x = _rand(np.random.default_rng(13), (4, D))
    # timm: qkv = Linear(x) = x @ W.T + b, reshaped (..., 3, heads, head_dim): q is the first D.
    fused = x @ flat["blocks.0.attn.qkv.weight"].T + flat["blocks.0.attn.qkv.bias"]
    attn = tree["blocks"]["0"]["attn"]
    for i, q in enumerate(("query", "key", "value")):
        np.testing.assert_allclose(x @ attn[q]["kernel"] + attn[q]["bias"], fused[:, i * D : (i + 1) * D], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- tied heads


def test_tied_head_recorded_materialized_or_refused():
    flat = llama_ckpt(np.random.default_rng(14), head=False)
    lay = hf_layout(_specs(flat))
    assert lay.tied == {("lm_head", "kernel"): "model.embed_tokens.weight"}
    assert not any(p[0] == "lm_head" for p in lay.leaves)
    _assert_bit_identical(lay.invert(lay.apply(flat)), flat)

    mat = hf_layout(_specs(flat), tied="materialize")
    assert mat.tied == {}
    tree = mat.apply(flat)
    np.testing.assert_array_equal(tree["lm_head"]["kernel"], flat["model.embed_tokens.weight"].T)
    assert mat.leaves[("lm_head", "kernel")].sources == ("model.embed_tokens.weight",)
    # Writing back stores the (possibly no longer tied) head explicitly.
    tree["lm_head"]["kernel"] = tree["lm_head"]["kernel"] * 2
    back = mat.invert(tree)
    assert list(back) == [*flat, "lm_head.weight"]
    np.testing.assert_array_equal(back["lm_head.weight"], 2 * flat["model.embed_tokens.weight"])
    np.testing.assert_array_equal(back["model.embed_tokens.weight"], flat["model.embed_tokens.weight"])
    assert mat.tensors["lm_head.weight"].spec.shape == (V, D)

    with pytest.raises(ValueError, match=r"no 'lm_head\.weight' \(tied to 'model\.embed_tokens\.weight'\)"):
        hf_layout(_specs(flat), tied="error")
    # A checkpoint with its head is not tied.
    assert hf_layout(_specs(llama_ckpt(np.random.default_rng(0))), tied="error").tied == {}


# ----------------------------------------------------------------------------- errors and options


def test_unknown_name_is_an_error_naming_it_unless_passed_through():
    flat = llama_ckpt(np.random.default_rng(15))
    flat["model.layers.0.adapter.lora_A"] = _rand(np.random.default_rng(0), (2, D))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.adapter\.lora_A' matches no 'llama' layout rule"):
        hf_layout(_specs(flat))
    lay = hf_layout(_specs(flat), unknown="passthrough")
    assert lay.leaves[("model", "layers", "0", "adapter", "lora_A")].kind == "param"
    _assert_bit_identical(lay.invert(lay.apply(flat)), flat)
    # A user rule maps it, and is tried before the family's.
    lay = hf_layout(_specs(flat), rules=[(r".*\.lora_A", "param"), (r".*\.o_proj\.weight", "param")])
    assert ("model", "layers", "0", "self_attn", "o_proj", "weight") in lay.leaves


def test_shape_that_does_not_fit_the_kind_raises_naming_the_tensor():
    specs = _specs(llama_ckpt(np.random.default_rng(0)))
    specs["model.layers.0.mlp.up_proj.weight"] = jax.ShapeDtypeStruct((2, D, 3), np.float32)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' \(kind 'linear'\): a Linear weight must be 2-D.*\(2, 8, 3\)"):
        hf_layout(specs)
    specs = _specs(timm_vit_ckpt(np.random.default_rng(0)))
    specs["blocks.0.attn.qkv.weight"] = jax.ShapeDtypeStruct((3 * D + 1, D), np.float32)
    with pytest.raises(ValueError, match=r"'blocks\.0\.attn\.qkv\.weight'.*divisible by 3"):
        hf_layout(specs)


def test_detection_errors_and_bad_options():
    with pytest.raises(ValueError, match=r"cannot tell the checkpoint's layout family.*'foo\.weight'"):
        detect_family({"foo.weight": None})
    mixed = [*llama_ckpt(np.random.default_rng(0)), "blocks.0.attn.qkv.weight"]
    with pytest.raises(ValueError, match=r"several layout families: llama \(.*\), timm_vit \('blocks\.0\.attn\.qkv\.weight'\)"):
        detect_family(mixed)
    specs = _specs(gpt2_ckpt(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="unknown layout family 'bert'"):
        layout_for("bert", specs)
    with pytest.raises(ValueError, match="unknown kind 'dense'"):
        layout_for("gpt2", specs, rules=[(".*", "dense")])
    with pytest.raises(ValueError, match="unknown must be"):
        layout_for("gpt2", specs, unknown="skip")


def test_colliding_names_raise():
    f32 = jax.ShapeDtypeStruct((D,), np.float32)
    with pytest.raises(ValueError, match=r"'a\.b' and 'a\.b\.c' collide: 'a/b' would be both a leaf and a subtree"):
        flat_layout({"a.b": f32, "a.b.c": f32})
    # timm's fused qkv and a separate `attn.query` Linear would both make attn/query/kernel.
    with pytest.raises(ValueError, match=r"both map to the leaf 'blocks/0/attn/query/kernel'"):
        layout_for("timm_vit", {"blocks.0.attn.qkv.weight": jax.ShapeDtypeStruct((3 * D, D), np.float32),
                                "blocks.0.attn.query.weight": jax.ShapeDtypeStruct((D, D), np.float32)},
                   rules=[(r".*\.query\.weight", "linear")])


def test_apply_and_invert_check_names_and_shapes_first():
    flat = gpt2_ckpt(np.random.default_rng(16))
    lay = hf_layout(_specs(flat))
    missing = {n: x for n, x in flat.items() if n != "transformer.h.1.ln_2.bias"}
    with pytest.raises(ValueError, match=r"checkpoint tensor 'transformer\.h\.1\.ln_2\.bias' is missing"):
        lay.apply(missing)
    wrong = dict(flat, **{"transformer.wpe.weight": flat["transformer.wpe.weight"].astype(BF16)})
    with pytest.raises(ValueError, match=r"'transformer\.wpe\.weight': expected \(5, 8\) float32, got \(5, 8\) bfloat16"):
        lay.apply(wrong)
    tree = lay.apply(flat)
    del tree["transformer"]["h"]["0"]["attn"]["key"]
    with pytest.raises(ValueError, match=r"target leaf 'transformer/h/0/attn/key/kernel' is missing \(2 missing in all\)"):
        lay.invert(tree)
    tree = lay.apply(flat)
    tree["extra"] = np.zeros(2)
    with pytest.raises(ValueError, match=r"target leaf 'extra' is not in the layout's target tree"):
        lay.invert(tree)


def test_kinds_are_documented():
    assert set(_layout.KINDS) >= {kind for rules in _layout.FAMILIES.values() for _, kind in rules}


def test_writers_name_the_fused_tensor():
    lay = hf_layout(_specs(gpt2_ckpt(np.random.default_rng(0))))
    assert lay.writers(("transformer", "h", "1", "attn", "value", "kernel")) == ("transformer.h.1.attn.c_attn.weight",)
    assert lay.writers(("transformer", "ln_f", "scale")) == ("transformer.ln_f.weight",)


@pytest.mark.parametrize("family", ["gpt2"])  # fused q/k/v, Conv1D, a bool buffer
def test_merging_in_flax_layout_equals_merging_the_torch_tensors(family):
    # Task arithmetic is elementwise, and a layout only moves elements: merging the mapped
    # trees and writing back gives exactly the merge of the checkpoint's own tensors.
    import fusionjax as fj

    base = CKPTS[family](np.random.default_rng(20))
    fts = [{n: (x + np.float32(0.1) * _rand(np.random.default_rng(21 + k), x.shape)) if x.dtype.kind == "f" else x
            for n, x in base.items()} for k in range(2)]
    lay = hf_layout(_specs(base))
    merger = fj.merging.task_arithmetic(scaling=0.5)
    merged = lay.invert(fj.merge(lay.apply(base), [lay.apply(ft) for ft in fts], merger))
    want = fj.merge(base, fts, merger)
    _assert_bit_identical({n: np.asarray(x) for n, x in merged.items()}, {n: np.asarray(want[n]) for n in base})
