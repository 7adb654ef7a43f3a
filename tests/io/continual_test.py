"""OPCM continual merging of checkpoints streamed from disk (``io.opcm_checkpoints``)."""

import jax
import numpy as np
import pytest

import fusionjax as fj
from fusionjax import io


def _model(rng, scale=1.0):
    """Two projected matrices, a bias, a conv kernel, a scalar and an int leaf (flax-like)."""
    shapes = {"dense": {"kernel": (12, 8), "bias": (8,)}, "out": {"kernel": (8, 6)},
              "conv": {"kernel": (3, 3, 2, 4)}, "scale": ()}  # fmt: skip
    out = {}
    for name, leaf in shapes.items():
        if isinstance(leaf, dict):
            out[name] = {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in leaf.items()}
        else:
            out[name] = np.asarray(scale * rng.standard_normal(), np.float32)
    out["step"] = np.int32(7)
    return out


def _add(base, delta):
    """``base + delta`` on the float leaves (the int leaf stays the base's)."""
    return jax.tree.map(lambda b, d: np.asarray(b + d, b.dtype) if np.asarray(d).dtype.kind == "f" else b,
                        base, delta)


class Recording:
    """A LeafSource that records every read as (model, leaf)."""

    log: list = []

    def __init__(self, src, index):
        self.src, self.index = src, index
        self.treedef, self.paths, self.specs, self.kinds = src.treedef, src.paths, src.specs, src.kinds
        self.path = src.path

    def read(self, i):
        Recording.log.append((self.index, i))
        return self.src.read(i)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("opcm")
    rng = np.random.default_rng(0)
    base = _model(rng)
    fts = [_add(base, _model(rng, 0.1)) for _ in range(4)]
    paths = [io.save_safetensors(base, d / "base.safetensors")]
    # Formats may mix: the second model is an Orbax checkpoint.
    for j, ft in enumerate(fts):
        if j == 1:
            io.save_orbax(ft, d / "ft1")
            paths.append(d / "ft1")
        else:
            paths.append(io.save_safetensors(ft, d / f"ft{j}.safetensors"))
    return base, fts, paths


@pytest.mark.parametrize("alpha,drop_diagonal", [(0.5, True), (0.8, False)])
def test_equals_the_in_memory_merge_reading_each_leaf_once_model_by_model(
    ckpts, tmp_path, alpha, drop_diagonal
):
    base, fts, paths = ckpts
    Recording.log = []
    srcs = [Recording(io.open_checkpoint(p), j) for j, p in enumerate(paths[1:])]
    r = io.opcm_checkpoints(paths[0], srcs, tmp_path / "out.safetensors", alpha=alpha,
                            drop_diagonal=drop_diagonal)  # fmt: skip
    merger = fj.merging.opcm(alpha=alpha, drop_diagonal=drop_diagonal)
    state = merger.init(base)
    scalings = []
    for ft in fts:
        state = merger.update(state, ft)
        scalings.append(float(state.scaling))
    want = state.merged
    got = io.load_safetensors(r.path)
    for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want),
                         strict=True):  # fmt: skip
        assert np.asarray(x).dtype == np.asarray(y).dtype, p
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-6, atol=1e-7, err_msg=str(p))
    np.testing.assert_allclose(r.scaling, scalings, rtol=1e-6)
    assert r.scaling[0] == 1.0 and len(r.scaling) == 4
    # Streamed: every leaf of every model read once, model after model, never two at once.
    n = len(srcs[0].paths)
    assert Recording.log == [(j, i) for j in range(4) for i in range(n)]
    assert r.leaf_reads == 4 * n
    # Projection happened: the merge is not the rescaled plain sum (task arithmetic).
    tvs = [fj.task_vectors(base, [ft])[0] for ft in fts]
    plain = np.sum([t["dense"]["kernel"] for t in tvs], 0)
    assert not np.allclose(got["dense"]["kernel"] - base["dense"]["kernel"],
                           plain / r.scaling[-1], atol=1e-4)  # fmt: skip


def test_every_check_before_any_read_and_nothing_written(ckpts, tmp_path):
    base, fts, paths = ckpts
    out = tmp_path / "out.safetensors"
    shaped = dict(fts[0], out={"kernel": np.zeros((8, 5), np.float32)})
    wrong = io.save_safetensors(shaped, tmp_path / "wrong.safetensors")
    Recording.log = []
    srcs = [Recording(io.open_checkpoint(p), j) for j, p in enumerate(paths[1:3])]
    cases = [
        ([], ValueError, "empty"),
        ([srcs[0], wrong], ValueError, r"finetuned\[1\] differs from base at \['out'\]\['kernel'\]"),
        ([tmp_path / "missing.safetensors"], FileNotFoundError, r"finetuned\[0\].*missing"),
    ]
    for models, err, match in cases:
        with pytest.raises(err, match=match):
            io.opcm_checkpoints(paths[0], models, out)
    with pytest.raises(ValueError, match="alpha"):
        io.opcm_checkpoints(paths[0], srcs, out, alpha=1.5)
    io.save_safetensors({"x": np.zeros(1, np.float32)}, out)
    with pytest.raises(FileExistsError, match="exists"):
        io.opcm_checkpoints(paths[0], srcs, out)
    assert Recording.log == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "wrong.safetensors"]


def test_nan_and_changed_int_leaves_name_the_checkpoint_and_leave_nothing(ckpts, tmp_path):
    base, fts, paths = ckpts
    bad = dict(fts[2])
    bad["conv"] = {"kernel": np.full((3, 3, 2, 4), np.nan, np.float32)}
    nan = io.save_safetensors(bad, tmp_path / "nan.safetensors")
    stepped = dict(fts[2], step=np.int32(8))
    moved = io.save_safetensors(stepped, tmp_path / "step.safetensors")
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match=r"finetuned\[1\] has NaN or Inf values at \['conv'\]"):
        io.opcm_checkpoints(paths[0], [paths[1], nan], out)
    with pytest.raises(ValueError, match=r"finetuned\[0\] differs from base at \['step'\]"):
        io.opcm_checkpoints(paths[0], [moved], out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.safetensors", "step.safetensors"]
