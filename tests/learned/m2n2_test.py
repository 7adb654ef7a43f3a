"""M2N2: each piece against a NumPy version of the paper's formulas, and the loop's invariants.

The references follow the paper and its code (SakanaAI/natural_niches): fitness sharing
:math:`f_i = \\sum_j s_{ij} / (\\sum_k s_{kj})^\\alpha`, attraction
:math:`g(A, B) = \\sum_j \\max(0, s_{Bj}/z_j - s_{Aj}/z_j)`, the split-point crossover over
the flattened float parameters with ratio :math:`w` before the split and :math:`1-w`
after (one SLERP angle for the whole vector), and the archive update that evicts the
least fit of the archive plus the child. The loop runs on a toy problem whose "models"
are sign patterns, so a child can only gain by combining two parents across a split.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from fusionjax.learned import _m2n2
from tests._testing import F32
from tests._testing import assert_trees_close

# -- NumPy references ---------------------------------------------------------------------


def np_shared(scores, alpha):
    total = scores.sum(axis=0)
    z = np.where(total > 0, total, 1.0) ** alpha
    return scores / z[None, :]


def np_attraction(scores, parent, alpha):
    f = np_shared(scores, alpha)
    return np.maximum(f - f[parent], 0.0).sum(axis=1)


def np_crossover(a, b, base, split, w, interpolation):
    leaves_a, treedef = jax.tree.flatten(a)
    leaves_b = jax.tree.leaves(b)
    leaves_0 = jax.tree.leaves(base) if base is not None else [None] * len(leaves_a)
    floats = [i for i, x in enumerate(leaves_a) if jnp.issubdtype(x.dtype, jnp.floating)]

    def flat(leaves, sub):
        parts = []
        for i in floats:
            x = np.asarray(leaves[i], np.float64).ravel()
            parts.append(x - np.asarray(sub[i], np.float64).ravel() if sub[i] is not None else x)
        return np.concatenate(parts)

    va, vb = flat(leaves_a, leaves_0), flat(leaves_b, leaves_0)
    r = np.where(np.arange(va.size) < split, w, 1.0 - w)
    cos = va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb))
    if interpolation == "linear" or abs(cos) > 0.9995:
        child = r * va + (1 - r) * vb
    else:
        om = np.arccos(cos)
        child = np.sin(r * om) / np.sin(om) * va + np.sin((1 - r) * om) / np.sin(om) * vb
    out, offset = list(leaves_a), 0
    for i in floats:
        x = np.asarray(leaves_a[i])
        c = child[offset : offset + x.size].reshape(x.shape)
        if leaves_0[i] is not None:
            c = c + np.asarray(leaves_0[i], np.float64)
        out[i], offset = c, offset + x.size
    return jax.tree.unflatten(treedef, out)


def np_evicted(scores, occupied, child_scores, alpha, elitist):
    """Index of the member the update removes (``P``: the child is not inserted)."""
    ext = np.concatenate([scores, child_scores[None]])
    occ = np.concatenate([occupied, [True]])
    f = np.where(occ, np_shared(ext, alpha).sum(axis=1), -np.inf)
    if elitist:
        f[np.argmax(np.where(occ, ext.sum(axis=1), -np.inf))] = np.inf
    return int(np.argmin(f))


def random_scores(seed, p=9, n=18):
    rng = np.random.default_rng(seed)
    s = (rng.random((p, n)) < 0.4).astype(np.float32)
    s[:, :3] = 0.0  # points nobody solves: z = 1
    s[:, 3] = 1.0  # a point everybody solves
    return s


def numpy_model(seed, scale=1.0):
    """A small model (a kernel, a bias, a conv-like kernel, a scalar, an int leaf), from NumPy."""
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": jnp.asarray(scale * rng.normal(size=(8, 4)), jnp.float32),
            "bias": jnp.asarray(scale * rng.normal(size=(4,)), jnp.float32),
        },
        "conv": {"kernel": jnp.asarray(scale * rng.normal(size=(3, 3, 2, 5)), jnp.float32)},
        "scale": jnp.asarray(scale * rng.normal(), jnp.float32),
        "step": jnp.array(7, jnp.int32),
    }


def near(base, seed, scale):
    """``base`` plus NumPy noise on its float leaves."""
    noise = numpy_model(seed, scale)
    return jax.tree.map(lambda b, e: b + e if b.dtype == jnp.float32 else b, base, noise)


# -- The pure pieces (jitted once per module: eager dispatch costs more than the math) ---

shared_fitness = jax.jit(fj.learned.shared_fitness)
attraction = jax.jit(fj.learned.attraction)
crossover = jax.jit(fj.learned.crossover, static_argnames="interpolation")
insert = jax.jit(_m2n2._insert, static_argnums=3)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_shared_fitness_and_attraction_match_numpy(alpha):
    s = random_scores(int(alpha * 10))
    np.testing.assert_allclose(shared_fitness(s, alpha=alpha), np_shared(s, alpha).sum(1), **F32)
    for parent in range(s.shape[0]):
        got = attraction(s, parent, alpha=alpha)
        np.testing.assert_allclose(got, np_attraction(s, parent, alpha), **F32)
        assert float(got[parent]) == 0.0


def test_fitness_sharing_rewards_unique_solutions():
    # Member 0 solves 3 points everybody solves; member 1 solves 2 points nobody else does.
    s = np.zeros((3, 5), np.float32)
    s[:, :3] = 1.0
    s[1, 3:] = 1.0
    s[2] = 0.0
    s[2, :3] = 1.0
    plain = shared_fitness(s, alpha=0.0)
    shared = shared_fitness(s, alpha=1.0)
    np.testing.assert_allclose(plain, [3.0, 5.0, 3.0])
    np.testing.assert_allclose(shared, [1.0, 3.0, 1.0], **F32)


@pytest.mark.parametrize("interpolation", ["linear", "slerp"])
@pytest.mark.parametrize("with_base", [False, True], ids=["params", "task_vectors"])
def test_crossover_matches_numpy(interpolation, with_base):
    base = numpy_model(0)
    a, b = near(base, 1, 0.5), near(base, 2, 0.5)
    n = _m2n2.num_float_params(base)
    assert n == 8 * 4 + 4 + 3 * 3 * 2 * 5 + 1
    for split, w in [(0, 0.3), (17, 0.8), (n // 2 + 3, 0.25), (n, 0.6)]:
        kw = {"split_point": split, "mix_ratio": w, "interpolation": interpolation}
        got = crossover(a, b, base=base if with_base else None, **kw)
        want = np_crossover(a, b, base if with_base else None, split, w, interpolation)
        assert_trees_close(got, want, rtol=1e-5, atol=1e-5)
        assert got["step"].dtype == jnp.int32 and int(got["step"]) == 7


def test_crossover_endpoints_give_back_the_parents():
    base = numpy_model(0)
    a, b = near(base, 3, 0.1), near(base, 4, 0.1)
    n = _m2n2.num_float_params(a)
    # w = 1 before a split at N: all of A; w = 0 with the split at 0 (ratio 1 - 0): all of A.
    for split, w, want in [(n, 1.0, a), (0, 0.0, a), (n, 0.0, b), (0, 1.0, b)]:
        got = crossover(a, b, split_point=split, mix_ratio=w, base=base, interpolation="slerp")
        assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


def test_crossover_errors():
    a = numpy_model(0)
    b = {**a, "scale": jnp.zeros((2,))}
    with pytest.raises(ValueError, match=r"parent_b differs from parent_a at \['scale'\]"):
        fj.learned.crossover(a, b, split_point=1, mix_ratio=0.5)
    with pytest.raises(ValueError, match="mix_ratio"):
        fj.learned.crossover(a, a, split_point=1, mix_ratio=1.5)
    with pytest.raises(ValueError, match="interpolation"):
        fj.learned.crossover(a, a, split_point=1, mix_ratio=0.5, interpolation="cubic")
    with pytest.raises(ValueError, match="scores"):
        fj.learned.shared_fitness(np.ones(3))
    with pytest.raises(ValueError, match="alpha"):
        fj.learned.attraction(np.ones((2, 3)), 0, alpha=-1.0)


# -- The archive update and the parent draw ------------------------------------------------


@pytest.mark.parametrize("elitist", [False, True])
def test_insert_evicts_the_least_fit_as_numpy_does(elitist):
    for seed in range(6):
        s = random_scores(seed)
        occupied = np.ones(9, bool)
        occupied[3] = seed % 2 == 0
        s[~occupied] = 0.0
        child = random_scores(100 + seed)[0]
        params = jnp.arange(9.0)
        (arch, new, occ), accept = insert(
            (params, s, occupied), (jnp.float32(-1.0), child, jnp.bool_(True)), jnp.float32(1.0), elitist
        )
        gone = np_evicted(s, occupied, child, 1.0, elitist)
        assert bool(accept) == (gone < 9)
        if gone < 9:
            assert float(arch[gone]) == -1.0 and bool(occ[gone])
            np.testing.assert_array_equal(new[gone], child)
        else:
            np.testing.assert_array_equal(arch, params)


def test_elitism_keeps_the_most_accurate_member_fitness_sharing_would_evict():
    # Member 0 solves 10 points, each also solved by 8 others; members 1..8 solve 8 of
    # them plus one point of their own. Sharing values member 0 least, yet it is the
    # most accurate: the paper's update evicts it, the elitist one keeps it.
    p, n = 9, 10 + 8
    s = np.zeros((p, n), np.float32)
    s[0, :10] = 1.0
    for k in range(1, p):
        s[k, [(k + i) % 10 for i in range(8)]] = 1.0
        s[k, 9 + k] = 1.0
    child = s[1].copy()
    child[9 + 1] = 0.0
    child[17] = 1.0  # like member 1, but its own point is member 8's
    occupied = np.ones(p, bool)
    assert np_evicted(s, occupied, child, 1.0, elitist=False) == 0
    assert s[0].sum() > s[1:].sum(axis=1).max()
    for elitist in (False, True):
        (_, new, _), _ = insert(
            (jnp.zeros(p), s, occupied), (jnp.float32(0.0), child, jnp.bool_(True)), jnp.float32(1.0), elitist
        )
        kept = new.sum(axis=1).max() == s[0].sum()
        assert bool(kept) == elitist


def test_parents_are_drawn_by_fitness_then_by_attraction():
    s = random_scores(3, p=4, n=30)
    occupied = np.ones(4, bool)
    keys = jax.random.split(jax.random.key(0), 10000)

    @jax.jit
    def draw(keys):  # with and without attraction, one compile
        return [
            jax.vmap(lambda k, u=u: _m2n2._sample_parents(k, s, occupied, 1.0, u))(keys)
            for u in (True, False)
        ]

    fitness = np_shared(s, 1.0).sum(1)
    p_a = fitness / fitness.sum()
    for use_attraction, (a, b) in zip((True, False), draw(keys), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(np.bincount(a, minlength=4) / a.size, p_a, atol=0.02)
        for i in range(4):
            g = np_attraction(s, i, 1.0) if use_attraction else fitness
            freq = np.bincount(b[a == i], minlength=4) / max((a == i).sum(), 1)
            np.testing.assert_allclose(freq, g / g.sum(), atol=0.04)
        if use_attraction:
            assert not np.any(a == b)  # g(A, A) = 0


# -- The loop -------------------------------------------------------------------------------

D, BLOCKS = 32, 2


def sign_score(params):
    """One point per coordinate: solved where the parameter is positive."""
    return (params["w"] > 0).astype(jnp.float32)


def sign_models():
    """Model k is positive on half k only: each solves half of the points."""
    out = []
    for k in range(BLOCKS):
        w = -np.ones(D, np.float32)
        w[k * D // BLOCKS : (k + 1) * D // BLOCKS] = 1.0
        out.append({"w": jnp.asarray(w), "step": jnp.array(3, jnp.int32)})
    return out


def run(key):
    return fj.learned.m2n2(
        sign_models(), sign_score, generations=60, archive_size=6, key=key, children=2
    )


@pytest.fixture(scope="module")
def result():
    return run(jax.random.key(0))


def test_m2n2_combines_parents_across_split_points(result):
    history = np.asarray(result.history)
    assert history.shape == (60,)
    # Both models start at 1/2. A child is right on i < s and on the other half only when
    # its split s falls in A's half and w > 1/2: all of it needs s at the boundary, or
    # several generations of children of children (measured 0.94-1.0 over four keys).
    assert history[-1] >= 0.85, history
    assert float(jnp.mean(sign_score(result.params))) == history[-1]
    assert int(result.params["step"]) == 3


def test_archive_never_loses_its_best_member(result):
    history = np.asarray(result.history)
    assert np.all(np.diff(history) >= 0), history
    assert history[0] >= 0.5


def test_archive_is_consistent(result):
    occupied = np.asarray(result.occupied)
    assert occupied.all()
    members = [jax.tree.map(lambda x, i=i: x[i], result.archive) for i in range(6)]
    for i, m in enumerate(members):
        np.testing.assert_array_equal(result.scores[i], sign_score(m))
    np.testing.assert_allclose(
        result.fitness, fj.learned.shared_fitness(result.scores, alpha=1.0), **F32
    )
    best = int(np.argmax(np.asarray(result.scores).mean(1)))
    assert_trees_close(result.params, members[best])
    assert np.asarray(result.accepted).sum() > 0


def test_m2n2_is_deterministic_under_a_key(result):
    again = run(jax.random.key(0))
    for x, y in zip(jax.tree.leaves(result), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(x, y)
    other = run(jax.random.key(1))
    assert not np.array_equal(np.asarray(other.archive["w"]), np.asarray(result.archive["w"]))


def test_m2n2_errors():
    models = sign_models()
    kw = {"generations": 2, "archive_size": 4, "key": jax.random.key(0)}
    with pytest.raises(ValueError, match="models is empty"):
        fj.learned.m2n2([], sign_score, **kw)
    with pytest.raises(ValueError, match=r"models\[1\] differs from models\[0\] at \['w'\]"):
        fj.learned.m2n2([models[0], {**models[1], "w": jnp.ones(3)}], sign_score, **kw)
    with pytest.raises(ValueError, match="alpha"):
        fj.learned.m2n2(models, sign_score, alpha=-0.5, **kw)
    with pytest.raises(ValueError, match="archive_size"):
        fj.learned.m2n2(models, sign_score, **{**kw, "archive_size": 1})
    with pytest.raises(TypeError, match="generations"):
        fj.learned.m2n2(models, sign_score, **{**kw, "generations": 2.5})
    with pytest.raises(ValueError, match="score_fn must return"):
        fj.learned.m2n2(models, lambda p: p["w"][None], **kw)
    with pytest.raises(TypeError, match="score_fn"):
        fj.learned.m2n2(models, None, **kw)
    with pytest.raises(ValueError, match="key"):
        fj.learned.m2n2(models, sign_score, **{**kw, "key": None})
