"""Tests of the digits multi-task testbed (``fusionjax.testbed``)."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusionjax import testbed
from fusionjax.testbed import _tasks
from fusionjax.testbed import _testbed

# Tiny hyperparameters: exercises every code path (build, cache, progress) in seconds.
TINY = dataclasses.replace(
    testbed.Config(),
    widths=(32, 32, 16),
    gap_dim=10,
    pretrain_steps=20,
    pretrain_batch_size=16,
    finetune_steps=10,
)


@pytest.fixture(scope="session")
def tb():
    """The default testbed, seed 0 (trained once per cache directory, then read back)."""
    return testbed.load(seed=0)


def _leaves(params):
    return [np.asarray(x) for x in jax.tree.leaves(params)]


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(_leaves(a), _leaves(b), strict=False):
        np.testing.assert_array_equal(x, y)


def _norm(leaves):
    return np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in leaves))


def test_tasks(tb):
    assert len(tb.tasks) == tb.num_tasks == 8
    assert tb.task_names == tuple(t.name for t in tb.tasks)
    assert len(set(tb.task_names)) == 8
    n_train, n_test = tb.tasks[0].x_train.shape[0], tb.tasks[0].x_test.shape[0]
    assert n_train + n_test == 1797 and n_test == round(0.3 * 1797)
    for task in tb.tasks:
        assert task.x_train.shape == (n_train, 64) and task.x_test.shape == (n_test, 64)
        assert task.x_train.dtype == task.x_test.dtype == np.float32
        assert task.y_train.dtype == task.y_test.dtype == np.int32
        assert 0.0 <= task.x_train.min() and task.x_train.max() <= 1.0
        for y in (task.y_train, task.y_test):
            np.testing.assert_array_equal(np.unique(y), np.arange(task.num_classes))


def test_split_is_fixed_across_seeds(tb):
    # The tasks (and so the split) depend on the config's test fraction, not on the seed.
    assert tb.tasks is _tasks.make_tasks(tb.config.test_fraction)
    train, test = _tasks.split_indices(tb.config.test_fraction)
    assert not set(train) & set(test)


def test_params_and_heads_shapes(tb):
    shapes = jax.tree.map(lambda x: x.shape, tb.pretrained)
    assert shapes == {
        "Dense_0": {"kernel": (64, 512), "bias": (512,)},
        "Dense_1": {"kernel": (512, 512), "bias": (512,)},
        "Dense_2": {"kernel": (512, 128), "bias": (128,)},
    }
    assert len(tb.finetuned) == len(tb.heads) == tb.num_tasks
    for params in tb.finetuned:
        assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
            lambda x: (x.shape, x.dtype), tb.pretrained
        )
    for task, head in zip(tb.tasks, tb.heads, strict=False):
        assert head.shape == (task.num_classes, 128) and head.dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(head, axis=1), 1.0, rtol=1e-5)


def test_heads_are_fixed(tb):
    # The heads are a function of the pretrained encoder and the seed only: rebuilding
    # them gives the same arrays, and they are not among the (merged) params.
    rebuilt = _testbed.make_heads(tb.config, tb.seed, tb.tasks, tb.pretrained)
    for a, b in zip(rebuilt, tb.heads, strict=False):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-6, atol=1e-7)
    assert len(jax.tree.leaves(tb.pretrained)) == 6
    x = tb.tasks[1].x_test[:16]  # as many rows as the other eager calls: the same op programs
    features = tb.features(tb.finetuned[1], x)
    unit = features / jnp.linalg.norm(features, axis=-1, keepdims=True)
    expected = 100.0 * unit @ tb.heads[1].T
    np.testing.assert_allclose(tb.logits(tb.finetuned[1], 1, x), expected, rtol=1e-5, atol=1e-4)


def test_logits_jit_grad_vmap(tb):
    task = tb.tasks[4]
    x = jax.device_put(task.x_test[:16])
    logits = jax.jit(tb.logits, static_argnums=1)
    np.testing.assert_allclose(
        logits(tb.pretrained, 4, x), tb.logits(tb.pretrained, 4, x), rtol=1e-5, atol=1e-4
    )
    assert logits(tb.pretrained, 4, x[0]).shape == (task.num_classes,)

    def log_likelihood(params, xi, yi):
        return jax.nn.log_softmax(tb.logits(params, 4, xi))[yi]

    grads = jax.jit(jax.vmap(jax.grad(log_likelihood), in_axes=(None, 0, 0)))(
        tb.finetuned[4], x, jax.device_put(task.y_test[:16])
    )
    assert jax.tree.map(lambda g: g.shape, grads) == jax.tree.map(
        lambda p: (16,) + p.shape, tb.pretrained
    )
    assert all(np.isfinite(g).all() for g in _leaves(grads))


def test_dense_inputs_can_be_intercepted(tb):
    widths = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            widths.append((context.module.name, args[0].shape))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        tb.encoder.apply({"params": tb.pretrained}, jnp.zeros((16, 64), jnp.float32))
    assert widths == [("Dense_0", (16, 64)), ("Dense_1", (16, 512)), ("Dense_2", (16, 512))]


def test_evaluate(tb):
    accuracies = tb.evaluate(tb.finetuned[0])
    assert isinstance(accuracies, np.ndarray) and accuracies.shape == (tb.num_tasks,)
    assert ((accuracies >= 0) & (accuracies <= 1)).all()
    task = tb.tasks[0]
    logits = jax.jit(tb.logits, static_argnums=1)  # one program, not op by op on 539 rows
    predictions = np.argmax(logits(tb.finetuned[0], 0, task.x_test), axis=-1)
    assert accuracies[0] == pytest.approx(np.mean(predictions == task.y_test))


def test_pretrained_weak_finetuned_strong(tb):
    # Measured, seeds 0/1/2: pretrained mean 49.1/51.6/47.6% (worst task up to 68%),
    # fine-tuned on own task mean 96.7/96.9/96.2% (every task >= 93.3%).
    pretrained = tb.evaluate(tb.pretrained)
    own = np.array([tb.evaluate(ft)[i] for i, ft in enumerate(tb.finetuned)])
    assert pretrained.mean() < 0.6
    assert own.mean() > 0.93 and own.min() > 0.88
    assert (own - pretrained).min() > 0.2


def test_task_vectors_are_small(tb):
    # Measured ||tau_t|| / ||theta_0|| between 0.048 and 0.10 over seeds 0-2.
    base = _leaves(tb.pretrained)
    for params in tb.finetuned:
        relative = _norm([p - b for p, b in zip(_leaves(params), base, strict=False)]) / _norm(base)
        assert 0.01 < relative < 0.15


def test_simple_average_interferes(tb):
    # Measured, seeds 0/1/2: average of the fine-tuned encoders 73.7/71.3/58.2% vs
    # individual 96.7/96.9/96.2% and pretrained 49.1/51.6/47.6%.
    # In NumPy (float32, the same sum): no op programs to compile per leaf shape.
    average = jax.tree.map(lambda *xs: sum(np.asarray(x) for x in xs) / len(xs), *tb.finetuned)
    merged = tb.evaluate(average).mean()
    own = np.mean([tb.evaluate(ft)[i] for i, ft in enumerate(tb.finetuned)])
    assert merged < own - 0.1
    assert merged > tb.evaluate(tb.pretrained).mean() + 0.1


def _cached(folder):
    """The testbed files in a cache folder (its ``.locks`` folder aside)."""
    return [n for n in os.listdir(folder) if n.endswith(".npz")]


def test_deterministic_with_and_without_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONJAX_CACHE", str(tmp_path))
    first = testbed.load(seed=3, config=TINY, cache=False)
    assert not _cached(tmp_path)
    second = testbed.load(seed=3, config=TINY, cache=True)  # trains, then writes the file
    (name,) = _cached(tmp_path)
    assert "seed3" in name
    cached = testbed.load(seed=3, config=TINY, cache=True)  # reads the file
    for a, b in [(first, second), (first, cached)]:
        _assert_same(a.pretrained, b.pretrained)
        for x, y in zip(a.finetuned, b.finetuned, strict=False):
            _assert_same(x, y)
        for x, y in zip(a.heads, b.heads, strict=False):
            np.testing.assert_array_equal(x, y)
    other = testbed.load(seed=4, config=TINY, cache=True)
    kernel = lambda t: t.pretrained["Dense_0"]["kernel"]  # noqa: E731
    assert not np.array_equal(kernel(other), kernel(first))
    assert len(_cached(tmp_path)) == 2
    changed = dataclasses.replace(TINY, finetune_steps=11)
    assert _testbed._cache_path(changed, 3) != _testbed._cache_path(TINY, 3)


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONJAX_CACHE", str(tmp_path))
    testbed.load(seed=5, config=TINY)
    (name,) = _cached(tmp_path)
    (tmp_path / name).write_bytes(b"not an npz file")
    tb = testbed.load(seed=5, config=TINY)
    _assert_same(tb.pretrained, testbed.load(seed=5, config=TINY, cache=False).pretrained)


def test_progress():
    messages = []
    testbed.load(seed=0, config=TINY, cache=False, progress=messages.append)
    assert len(messages) == 9 and messages[0] == "pretraining"

    class Bar:
        def __init__(self, total=None, desc=None):
            self.total, self.n, self.closed = total, 0, False

        def reset(self, total=None):
            self.total, self.n = total, 0

        def update(self, n=1):
            self.n += n

        def close(self):
            self.closed = True

    bar = Bar(total=1)
    testbed.load(seed=0, config=TINY, cache=False, progress=bar)
    assert bar.total == bar.n == 9
    with pytest.raises(TypeError, match="progress"):
        testbed.load(seed=0, config=TINY, cache=False, progress=3)
