"""The learned-merging loops: same trajectory jitted or eager, and as a hand-written optax loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fusionjax as fj
from fusionjax._src import training
from fusionjax.learned import _loop

# The file's tests share two compiled loops (Adam at 1e-2, 8 examples per task, the fixture's
# logits_fn and clamp): one for "layer" and one for "task" coefficients.
LR, BATCH = 1e-2, 8

T, D, H, N = 3, 6, 16, 40


def _normal(rng, *shape, scale=1.0):
    """Standard normal float32 draws from NumPy, placed with device_put (no XLA compilation)."""
    return jax.device_put(np.asarray(scale * rng.standard_normal(shape), np.float32))


def _zeros(*shape):
    return jax.device_put(np.zeros(shape, np.float32))


def _head_logits(heads, params, t, x):
    h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"][None])
    h = jnp.tanh(h @ params["l2"]["kernel"] + params["l2"]["bias"][None])
    return 3.0 * h @ heads[t]


def _np_head_logits(heads, params, t, x):
    """``_head_logits`` in float64 NumPy."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    h = np.tanh(f(x) @ f(params["l1"]["kernel"]) + f(params["l1"]["bias"])[None])
    h = np.tanh(h @ f(params["l2"]["kernel"]) + f(params["l2"]["bias"])[None])
    return 3.0 * h @ f(heads[t])


@pytest.fixture(scope="module")
def drawn():
    """A 2-layer model fine-tuned three ways, a head per task and an unlabeled pool per task."""
    rng = np.random.default_rng(0)
    base = {
        "l1": {"kernel": _normal(rng, D, H, scale=1 / np.sqrt(D)), "bias": _zeros(H)},
        "l2": {"kernel": _normal(rng, H, H, scale=1 / np.sqrt(H)), "bias": _zeros(H)},
        "count": jax.device_put(np.int32(3)),
    }
    fts = []
    for _ in range(T):
        ft = jax.tree.map(lambda x: x, base)
        for layer in ("l1", "l2"):
            ft[layer] = {
                n: jax.device_put(
                    np.asarray(np.asarray(v) + 0.3 * rng.standard_normal(v.shape), np.float32)
                )
                for n, v in base[layer].items()
            }
        fts.append(ft)
    heads = [_normal(rng, H, 2 + t) for t in range(T)]
    data = [rng.standard_normal((N, D)).astype(np.float32) for _ in range(T)]

    def logits_fn(params, t, x):  # a plain closure over the heads
        return _head_logits(heads, params, t, x)

    return base, fts, data, logits_fn, heads


@pytest.fixture(scope="module")
def problem(drawn):
    """``(base, finetuned, unlabeled pools, logits_fn)``."""
    return drawn[:4]


def test_entropy_matches_numpy():
    entropy = jax.jit(fj.learned.entropy)  # one program per shape, not op by op (eager: loop tests)
    z = _normal(np.random.default_rng(1), 5, 7, scale=3.0)
    p = np.exp(np.asarray(z, np.float64))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(entropy(z), -(p * np.log(p)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(entropy(_zeros(4)), np.log(4), rtol=1e-6)
    assert float(entropy(jax.device_put(np.float32([1e4, 0.0])))) == 0.0


def test_sample_batches_is_deterministic_and_keeps_pairs_aligned():
    x = np.arange(20.0).reshape(10, 2)
    y = np.arange(10)
    a = fj.learned.sample_batches(jax.random.key(3), [(x, y), x[:4]], 6)
    b = fj.learned.sample_batches(jax.random.key(3), [(x, y), x[:4]], 6)
    a, b = jax.tree.map(np.asarray, (a, b))  # checked on the host
    np.testing.assert_array_equal(a[0][0], b[0][0])
    np.testing.assert_array_equal(a[0][0][:, 0] / 2, a[0][1])
    assert a[1].shape == (6, 2) and float(a[1].max()) < 8


def test_ready_loop_equals_hand_written_optax_loop(problem):
    base, fts, data, logits_fn = problem
    key, steps = jax.random.key(5), 30
    ready = fj.learned.adamerging(
        base, fts, data, logits_fn, steps=steps, learning_rate=LR, key=key, batch_size=BATCH
    )

    tvs = fj.learned.stacked_task_vectors(base, fts)
    coef = fj.learned.init_coefficients(tvs, granularity="layer")
    opt = optax.adam(1e-2)
    state = opt.init(coef)

    @jax.jit
    def step(coef, state, batches):
        loss, grads = jax.value_and_grad(fj.learned.adamerging_loss)(
            coef, batches, base=base, task_vectors=tvs, logits_fn=logits_fn, clamp=(0.0, 1.0)
        )
        with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
            updates, state = opt.update(grads, state, coef)
            return optax.apply_updates(coef, updates), state, loss

    losses = []
    for s in range(steps):
        batches = fj.learned.sample_batches(jax.random.fold_in(key, s), data, 8)
        coef, state, loss = step(coef, state, batches)
        losses.append(float(loss))
    # Same steps, same batches, same arithmetic: bit for bit.
    np.testing.assert_array_equal(ready.losses, np.asarray(losses, np.float32))
    for a, b in zip(jax.tree.leaves(ready.coefficients), jax.tree.leaves(coef), strict=False):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(jax.tree.leaves(coef)[0], 0.3), "the coefficients did not move"


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_jit_and_eager_give_the_same_trajectory(problem, granularity):
    base, fts, data, logits_fn = problem
    kw = dict(
        steps=8, learning_rate=LR, key=jax.random.key(2), batch_size=BATCH, granularity=granularity
    )
    jitted = fj.learned.adamerging(base, fts, data, logits_fn, **kw)
    eager = fj.learned.adamerging(base, fts, data, logits_fn, jit=False, **kw)
    np.testing.assert_allclose(jitted.losses, eager.losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(jitted.coefficients), jax.tree.leaves(eager.coefficients), strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunking_does_not_change_the_result(problem):
    base, fts, data, logits_fn = problem
    tvs = fj.learned.stacked_task_vectors(base, fts)
    coef = fj.learned.init_coefficients(tvs, granularity="task")
    # adamerging's own optimizer and clamp: chunk=50 reuses the compiled "task" loop.
    kw = dict(
        optimizer=_loop.adam(LR), steps=11, batch_size=BATCH, key=jax.random.key(0), clamp=(0.0, 1.0)
    )
    a = fj.learned.fit_coefficients(
        fj.learned.adamerging_loss, base, tvs, data, logits_fn, coef, chunk=4, **kw
    )
    b = fj.learned.fit_coefficients(
        fj.learned.adamerging_loss, base, tvs, data, logits_fn, coef, chunk=50, **kw
    )
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-6)
    np.testing.assert_allclose(a.coefficients, b.coefficients, rtol=1e-6)


def test_entropy_goes_down_and_params_are_the_merge_of_the_coefficients(problem):
    base, fts, data, logits_fn = problem
    res = fj.learned.adamerging(
        base, fts, data, logits_fn, steps=60, learning_rate=LR, batch_size=BATCH, key=jax.random.key(0))
    assert res.losses[-10:].mean() < res.losses[:10].mean()
    tvs = fj.learned.stacked_task_vectors(base, fts)
    want = fj.learned.combine(base, tvs, res.coefficients, clamp=(0.0, 1.0))
    for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(want), strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert res.params["count"].dtype == jnp.int32


def test_adamerging_plus_plus_learns_on_trimmed_task_vectors(problem):
    base, fts, data, logits_fn = problem
    res = fj.learned.adamerging_plus_plus(
        base, fts, data, logits_fn, steps=2, density=0.1, granularity="task",
        learning_rate=LR, batch_size=BATCH, key=jax.random.key(0))
    # With λ = 0.3 and 10% of each task vector kept, the merge differs from base on few entries.
    changed = float(jnp.mean(res.params["l2"]["kernel"] != base["l2"]["kernel"]))
    assert 0.0 < changed <= 3 * 0.1 + 1e-6


def test_atlas_fits_labeled_batches(drawn):
    base, fts, data, logits_fn, heads = drawn
    # The fine-tuned models' own predictions as labels, computed on the host (float64).
    labels = [
        np.argmax(_np_head_logits(heads, fts[t], t, x), -1).astype(np.int32)
        for t, x in enumerate(data)
    ]
    labeled = list(zip(data, labels, strict=False))
    res = fj.learned.atlas(base, fts, labeled, logits_fn, num_blocks=3, steps=40, batch_size=16, key=jax.random.key(0))
    assert res.coefficients["l1"]["kernel"].shape == (T, 3)
    assert res.losses[-5:].mean() < res.losses[:5].mean()


def test_progress_callable_is_called(problem):
    base, fts, data, logits_fn = problem
    messages = []
    fj.learned.adamerging(
        base, fts, data, logits_fn, steps=5, progress=messages.append, granularity="task",
        learning_rate=LR, batch_size=BATCH, key=jax.random.key(0))
    assert messages and "step 5/5" in messages[-1]


def test_errors(problem):
    base, fts, data, logits_fn = problem
    with pytest.raises(ValueError, match="steps"):
        fj.learned.adamerging(base, fts, data, logits_fn, steps=-1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="non-empty list"):
        fj.learned.adamerging(base, fts, [], logits_fn, key=jax.random.key(0))
    with pytest.raises(ValueError, match="task 1's data has no examples"):
        fj.learned.adamerging(base, fts, [data[0], data[1][:0]], logits_fn, key=jax.random.key(0))
    with pytest.raises(ValueError, match="empty"):
        fj.learned.adamerging(base, [], data, logits_fn, key=jax.random.key(0))
    with pytest.raises(TypeError, match="task_vector_fn"):
        fj.learned.adamerging_plus_plus(base, fts, data, logits_fn, task_vector_fn=None, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"\(x, y\)"):
        fj.learned.atlas_loss(
            jnp.ones(T),
            [data[0]],
            base=base,
            task_vectors=fj.learned.stacked_task_vectors(base, fts),
            logits_fn=logits_fn,
        )
    with pytest.raises(TypeError, match="batches must be"):
        fj.learned.adamerging_loss(
            jnp.ones(T),
            data[0],
            base=base,
            task_vectors=fj.learned.stacked_task_vectors(base, fts),
            logits_fn=logits_fn,
        )


def test_one_compile_serves_models_that_differ_in_their_head_arrays(drawn):
    """A ``Partial`` logits_fn passes its arrays (heads) as arguments: no recompilation.

    As the testbed's ``tb.logits`` does for every seed; the result is the closure's. The
    heads are the fixture's and twice them; the fixture's closure over its heads is the
    first reference (with the file's "task" hyperparameters it reuses that compiled loop).
    """
    base, fts, data, logits_fn, heads = drawn
    kw = dict(steps=3, batch_size=BATCH, granularity="task", learning_rate=LR, key=jax.random.key(0))
    before = training._run_chunk_shared._cache_size()
    scaled = [heads, [jax.device_put(2 * np.asarray(h)) for h in heads]]
    outs = [
        fj.learned.adamerging(base, fts, data, jax.tree_util.Partial(_head_logits, hs), **kw)
        for hs in scaled
    ]
    assert training._run_chunk_shared._cache_size() - before == 1
    closures = [logits_fn, lambda p, t, x, hs=scaled[1]: _head_logits(hs, p, t, x)]
    for closure, out in zip(closures, outs, strict=True):
        want = fj.learned.adamerging(base, fts, data, closure, **kw)
        np.testing.assert_array_equal(out.losses, want.losses)
    assert not np.allclose(outs[0].losses, outs[1].losses)  # the heads did reach the loop


def test_output_is_a_pytree_jit_returns(problem):
    """LearnedMergeOutput holds arrays only: ``jax.jit`` returns it whole."""
    base, fts, data, logits_fn = problem
    res = fj.learned.adamerging(
        base, fts, data, logits_fn, steps=2, granularity="task", learning_rate=LR, batch_size=BATCH,
        key=jax.random.key(0))
    back = jax.jit(lambda out: out)(res)
    assert type(back) is fj.learned.LearnedMergeOutput
    np.testing.assert_array_equal(back.coefficients, res.coefficients)
