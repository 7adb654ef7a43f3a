"""The leaf-stream engine: sources read lazily, metadata validated before any read."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from tests import _testing as T

K = jax.random.key


class CountingSource(fj.TreeSource):
    """An in-memory source that records which leaves were read, like a lazy disk reader."""

    def __init__(self, tree, log, name):
        super().__init__(tree)
        self.log, self.name = log, name

    def read(self, index):
        self.log.append((self.name, index))
        return super().read(index)


class ListSink:
    def __init__(self):
        self.written = []

    def write(self, index, value):
        self.written.append((index, np.asarray(value)))

    def finish(self):
        return len(self.written)


@pytest.fixture
def models():
    base = T.random_model(K(0))
    return base, T.finetune_like(base, K(1), 3)


@pytest.mark.parametrize("scope", ["leaf", "model"])
def test_sources_and_sink_give_the_in_memory_result(models, scope):
    base, fts = models
    m = fj.merging.ties(density=0.3, scope=scope)
    log = []
    srcs = [CountingSource(f, log, i) for i, f in enumerate(fts)]
    sink = ListSink()
    n = fj.merge(CountingSource(base, log, "base"), srcs, m, sink=sink)
    ref = fj.merge(base, fts, m)
    assert n == len(jax.tree.leaves(base))
    for (_, v), r in zip(sink.written, jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(v, np.asarray(r))
    n_float = 4
    reads_per_model = n_float + 1 + (2 * n_float if scope == "model" else 0)
    assert sum(1 for who, _ in log if who == 0) == reads_per_model


def test_metadata_errors_come_before_any_read(models):
    base, fts = models
    log = []
    bad = dict(fts[2])
    bad["dense"] = {**fts[2]["dense"], "kernel": jnp.zeros((4, 8))}
    srcs = [CountingSource(f, log, i) for i, f in enumerate([*fts[:2], bad])]
    with pytest.raises(ValueError, match=r"finetuned\[2\] differs from base at \['dense'\]\['kernel'\]: shape \(4, 8\) != \(8, 4\)"):
        fj.merge(CountingSource(base, log, "base"), srcs, fj.merging.mean())
    with pytest.raises(ValueError, match=r"density takes one value, or one per model"):
        fj.merge(CountingSource(base, log, "base"), srcs[:2], fj.merging.ties(density=[0.1, 0.2, 0.3]))
    assert log == []


def test_abstract_trees_are_validated_by_shape_not_by_value():
    a = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}
    b = {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32)}
    with pytest.raises(ValueError, match=r"finetuned\[0\] differs from base at \['w'\]: shape \(3, 2\) != \(2, 3\)"):
        fj.merge(a, [b], fj.merging.mean())
    with pytest.raises(ValueError, match=r"abstract .* no value to merge"):
        fj.merge(a, [a], fj.merging.mean())


def test_keys_depend_on_paths_not_on_reading_order(models):
    base, fts = models
    m = fj.merging.dare(drop_rate=0.5)
    whole = fj.merge(base, fts, m, key=K(9))
    part = fj.merge({"dense": base["dense"]}, [{"dense": f["dense"]} for f in fts], m, key=K(9))
    T.assert_trees_close(part["dense"], whole["dense"], rtol=0, atol=0)


def test_model_wide_trim_streams_the_exact_threshold(models):
    base, fts = models
    density = 0.37
    out = fj.merging.trim(density=density, scope="model")(fj.stack(fj.task_vectors(base, fts)))
    tv = [np.concatenate([np.abs(np.asarray(x)).ravel() for x in jax.tree.leaves(fj.task_vector(base, f))]) for f in fts]
    kept = [
        sum(int((np.asarray(x[t]) != 0).sum()) for x in jax.tree.leaves(out)) for t in range(3)
    ]
    n = tv[0].size
    k = int(np.ceil(density * n))
    thresholds = [np.sort(v)[::-1][k - 1] for v in tv]
    assert kept == [int((v >= thr).sum()) for v, thr in zip(tv, thresholds, strict=True)]
