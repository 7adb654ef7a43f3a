"""``fusionjax merge CONFIG OUT`` end to end: checkpoints on disk, dry runs, bad configs."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import fusionjax as fj
from fusionjax import io
from fusionjax.cli import _merge
from fusionjax.cli import main
from tests.cli.config_test import _model


@pytest.fixture(scope="module")
def trees():
    base = _model(jax.random.key(0))
    fts = [
        jax.tree.map(jnp.add, base, _model(jax.random.key(i + 1), 0.1)) for i in range(2)
    ]
    return base, fts


def _save(tree, path, fmt):
    if fmt == "safetensors":
        io.save_safetensors(tree, str(path) + ".safetensors")
        return str(path) + ".safetensors"
    io.save_orbax(tree, path)
    return str(path)


@pytest.fixture(scope="module", params=["safetensors", "orbax"])
def ckpts(request, trees, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    base, fts = trees
    paths = [_save(t, d / n, request.param) for t, n in zip([base, *fts], "xab", strict=True)]
    return request.param, dict(zip(["base", "a", "b"], paths, strict=True))


def _load(path, fmt):
    return io.load_safetensors(path) if fmt == "safetensors" else io.load_orbax(path)


def _write_cfg(tmp_path, cfg):
    p = tmp_path / "merge.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


@pytest.fixture
def count_reads(monkeypatch):
    """Counts every tensor read of every checkpoint the command opens."""
    reads = []
    real = io.open_checkpoint

    def counting(*args, **kwargs):
        src = real(*args, **kwargs)
        inner = src.read

        def read(i):
            reads.append(i)
            return inner(i)

        src.read = read
        return src

    monkeypatch.setattr(io, "open_checkpoint", counting)
    return reads


def _ties_cfg(paths, fmt, **extra):
    cfg = {
        "merge_method": "ties",
        "base_model": {"model": paths["base"], "format": fmt},
        "models": [
            {"model": paths["a"], "parameters": {"density": 0.5}},
            {"model": paths["b"], "parameters": {"density": 0.75}},
        ],
        "output": {"format": fmt},
    }
    cfg.update(extra)
    return cfg


def test_end_to_end_equals_in_memory_merge(ckpts, trees, tmp_path, capsys):
    fmt, paths = ckpts
    out = str(tmp_path / ("out.safetensors" if fmt == "safetensors" else "out"))
    rc = main(["merge", _write_cfg(tmp_path, _ties_cfg(paths, fmt)), out, "--no-progress"])
    assert rc == 0
    assert out in capsys.readouterr().out
    base, fts = trees
    want = fj.merge(base, fts, fj.merging.ties(density=jnp.array([0.5, 0.75])))
    got = _load(out, fmt)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dry_run_reads_no_tensor_and_writes_nothing(ckpts, tmp_path, capsys, count_reads):
    fmt, paths = ckpts
    cfg = _ties_cfg(paths, fmt, parameters={"lambda": [0.5, 1.0]}, out_dtype="bfloat16")
    out = tmp_path / "out"
    before = set(os.listdir(tmp_path))
    assert main(["merge", _write_cfg(tmp_path, cfg), str(out), "--dry-run"]) == 0
    assert count_reads == []
    assert set(os.listdir(tmp_path)) == before | {"merge.yaml"}
    text = capsys.readouterr().out
    # every leaf: name, shape, dtype, bytes and its resolved method
    assert "model/layers/1/self_attn/q_proj/weight  (4, 4)  float32  64 bytes  trim(" in text
    assert "scale(scaling=0.75)" in text  # lambda gradient at layer 1 of 3
    assert "scale(scaling=0.5)" in text  # outside the layers: the first value
    n_leaves = 2 + 2 * 3  # embed, norm, and q_proj + up_proj in each of 3 layers
    total = sum(x.size for x in jax.tree.leaves(_model(jax.random.key(0))))
    assert f"total: {n_leaves} leaves, {3 * 4 * total} bytes read, {2 * total} bytes written" in text


def _bad(paths, fmt, tmp_path, trees):
    """(name, config edit, exit status, words in the message)."""
    base, fts = trees
    wrong = jax.tree.map(lambda x: x, fts[1])
    wrong["model"]["norm"]["weight"] = jnp.zeros(5)
    odd = _save(wrong, tmp_path / "odd", fmt)

    def missing(c):
        c["models"][1]["model"] = str(tmp_path / "nope.safetensors")

    def shape(c):
        c["models"][1]["model"] = odd

    def method(c):
        c["merge_method"] = "tiess"

    def param(c):
        c["models"][0]["parameters"]["densiti"] = 0.5

    def grad(c):
        c["models"][1]["parameters"]["density"] = [0.5, 0.6, 0.7, 0.8, 0.9]

    def dtype(c):
        c["out_dtype"] = "bfloat32"

    return [
        (missing, 1, ["models[1].model", "no such file"]),
        (shape, 1, ["models[1].model", "['model']['norm']['weight']", "(5,) != (4,)"]),
        (method, 2, ["merge_method", "did you mean 'ties'"]),
        (param, 2, ["models[0].parameters.densiti", "did you mean 'density'"]),
        (grad, 1, ["models[1].parameters.density", "5 values", "3 layers"]),
        (dtype, 2, ["out_dtype", "bfloat16"]),
    ]


@pytest.mark.parametrize("dry", [False, True], ids=["merge", "dry-run"])
def test_bad_configs_fail_before_reading(ckpts, trees, tmp_path, capsys, count_reads, dry):
    fmt, paths = ckpts
    for edit, status, words in _bad(paths, fmt, tmp_path, trees):
        cfg = _ties_cfg(paths, fmt)
        edit(cfg)
        out = tmp_path / "out"
        before = set(os.listdir(tmp_path))
        rc = main(["merge", _write_cfg(tmp_path, cfg), str(out), "--no-progress"]
                  + (["--dry-run"] if dry else []))
        err = capsys.readouterr().err.strip()
        assert rc == status, (edit.__name__, err)
        assert "\n" not in err, err
        for w in words:
            assert w in err, (edit.__name__, err)
        assert count_reads == [], edit.__name__
        assert set(os.listdir(tmp_path)) <= before | {"merge.yaml"}, edit.__name__


def test_help_lists_the_methods(capsys):
    with pytest.raises(SystemExit) as e:
        main(["merge", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("linear", "task_arithmetic", "ties", "dare_ties", "slerp", "model_stock",
                 "fusionjax.NAME", "--dry-run"):
        assert name in text


def test_console_command(tmp_path, trees):
    base, fts = trees
    paths = {n: _save(t, tmp_path / n, "safetensors") for n, t in
             zip(["base", "a", "b"], [base, *fts], strict=True)}
    cfg = {"merge_method": "task_arithmetic", "base_model": paths["base"],
           "models": [{"model": paths["a"]}, {"model": paths["b"]}],
           "parameters": {"weight": 0.5}}
    out = str(tmp_path / "merged.safetensors")
    env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS="cpu")
    r = subprocess.run(
        [sys.executable, "-m", "fusionjax.cli", "merge", _write_cfg(tmp_path, cfg), out,
         "--no-progress"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert r.returncode == 0, r.stderr
    want = fj.merge(base, fts, fj.merging.task_arithmetic(scaling=0.5))
    got = io.load_safetensors(out)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
    assert _merge is not None


def _slices_cfg(paths, ranges):
    return {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": paths[m], "layer_range": list(r)}]} for m, r in ranges]}


def test_passthrough_slices_stack_layers(tmp_path, trees, count_reads, capsys):
    base, (a, _) = trees
    paths = {n: _save(t, tmp_path / n, "safetensors") for n, t in
             zip(["base", "a"], [base, a], strict=True)}
    cfg = _slices_cfg(paths, [("base", (0, 2)), ("a", (1, 3))])
    out = str(tmp_path / "stacked.safetensors")
    assert main(["merge", _write_cfg(tmp_path, cfg), out, "--dry-run"]) == 0
    assert count_reads == []
    text = capsys.readouterr().out
    assert "model/layers/3/mlp/up_proj/weight  (6, 4) float32  <- slices[1].sources[0]: " \
        "model/layers/2/mlp/up_proj/weight" in text
    assert main(["merge", _write_cfg(tmp_path, cfg), out, "--no-progress"]) == 0
    got = io.open_checkpoint(out)
    assert sorted(got.names) == sorted(
        [f"model.layers.{i}.{w}" for i in range(4)
         for w in ("self_attn.q_proj.weight", "mlp.up_proj.weight")]
        + ["model.embed_tokens.weight", "model.norm.weight"])
    got = io.load_safetensors(out)["model"]
    for new, (src, old) in enumerate([(base, 0), (base, 1), (a, 1), (a, 2)]):
        for sub in ("self_attn", "mlp"):
            np.testing.assert_array_equal(
                jax.tree.leaves(got["layers"][str(new)][sub]),
                jax.tree.leaves(src["model"]["layers"][str(old)][sub]))
    np.testing.assert_array_equal(got["norm"]["weight"], base["model"]["norm"]["weight"])


@pytest.mark.parametrize("edit, status, words", [
    (lambda c, p: c["slices"][1]["sources"][0].update(layer_range=[1, 5]), 1,
     ["slices[1].sources[0].layer_range", "a model of 3 layers"]),
    (lambda c, p: c["slices"][0]["sources"].append({"model": p["a"], "layer_range": [0, 2]}),
     2, ["slices[0].sources", "one source per slice"]),
    (lambda c, p: c["slices"][0]["sources"][0].update(layer_range=[2, 1]), 2,
     ["slices[0].sources[0].layer_range", "START < END"]),
    (lambda c, p: c.update(merge_method="ties"), 2, ["merge_method", "passthrough"]),
    (lambda c, p: c["slices"][1]["sources"][0].update(model=p["odd"]), 1,
     ["slices[1].sources[0]", "layer 1 of", "self_attn/q_proj/weight"]),
])
def test_bad_slices_fail_before_reading(tmp_path, trees, count_reads, capsys, edit, status,
                                        words):
    base, (a, _) = trees
    odd = jax.tree.map(lambda x: x, a)
    odd["model"]["layers"]["1"]["self_attn"]["q_proj"]["weight"] = jnp.zeros((2, 4))
    paths = {n: _save(t, tmp_path / n, "safetensors") for n, t in
             zip(["base", "a", "odd"], [base, a, odd], strict=True)}
    cfg = _slices_cfg(paths, [("base", (0, 2)), ("a", (1, 3))])
    edit(cfg, paths)
    before = set(os.listdir(tmp_path))
    rc = main(["merge", _write_cfg(tmp_path, cfg), str(tmp_path / "o.safetensors"),
               "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == status, err
    for w in words:
        assert w in err, err
    assert count_reads == []
    assert set(os.listdir(tmp_path)) <= before | {"merge.yaml"}


def _hf_llama(seed, scale=1.0):
    """A tiny Llama-named checkpoint in torch layout (GQA k/v, RMSNorm weights, untied head)."""
    r = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (32, 8), "model.norm.weight": (8,), "lm_head.weight": (32, 8)}
    for i in range(2):
        for name, shape in [("self_attn.q_proj", (8, 8)), ("self_attn.k_proj", (4, 8)),
                            ("self_attn.v_proj", (4, 8)), ("self_attn.o_proj", (8, 8)),
                            ("mlp.gate_proj", (16, 8)), ("mlp.up_proj", (16, 8)),
                            ("mlp.down_proj", (8, 16)), ("input_layernorm", (8,)),
                            ("post_attention_layernorm", (8,))]:
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    return {k: (scale * r.normal(size=s)).astype(np.float32) for k, s in shapes.items()}


def test_hf_layout_config_merges_and_writes_back_the_checkpoints_own_names(tmp_path):
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    base = _hf_llama(0)
    deltas = [_hf_llama(s, 0.1) for s in (1, 2)]
    raw = [base] + [{k: v + d[k] for k, v in base.items()} for d in deltas]
    for name, tensors in zip(["base", "a", "b"], raw, strict=True):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    cfg = {"merge_method": "ties", "base_model": str(tmp_path / "base"), "layout": "hf",
           "models": [{"model": str(tmp_path / "a"), "parameters": {"density": 0.5, "weight": 1.0}},
                      {"model": str(tmp_path / "b"), "parameters": {"density": 0.5, "weight": 0.5}}]}
    assert main(["merge", _write_cfg(tmp_path, cfg), str(tmp_path / "out"), "--no-progress"]) == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    # TIES is per tensor and ignores element order, so merging the flax-layout leaves and
    # writing them back equals merging the torch tensors as they are stored.
    want = fj.merge(raw[0], raw[1:], fj.merging.ties(density=0.5, weights=jnp.array([1.0, 0.5]),
                                                      convention="mergekit"))
    assert sorted(got) == sorted(raw[0])
    for k in got:
        np.testing.assert_array_equal(got[k], np.asarray(want[k]), err_msg=k)
