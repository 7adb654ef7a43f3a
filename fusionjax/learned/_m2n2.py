r"""M2N2: evolutionary model merging with dynamic split points, competition and attraction.

M2N2 (Model Merging of Natural Niches; Abrantes, Lange and Tang, GECCO 2025) evolves an
*archive* of :math:`P` models by repeatedly merging two of them into a child that
competes for a place. Every model :math:`\theta_i` is scored on every data point
:math:`x_j` of a fitness set, :math:`s_{ij} = s(x_j \mid \theta_i) \ge 0` (per-example
correctness, or any per-example score).

**Resource competition** (fitness sharing). A data point is a resource of capacity 1
that the models solving it share:

.. math::
  f_i = \sum_j \frac{s_{ij}}{z_j}, \qquad z_j = \Big(\sum_k s_{kj}\Big)^{\alpha}
  \quad (z_j = 1 \text{ where no model scores on } x_j).

A model that alone solves a point keeps it whole; a point every model solves is worth
:math:`P^{1-\alpha}\cdot\frac{1}{P}` to each. :math:`\alpha = 1` is the paper's default;
:math:`\alpha = 0` switches competition off (:math:`f_i` is the plain total score).

**Attraction** (mate selection). Parent :math:`A` is drawn with probability
:math:`\propto f_A`; parent :math:`B` with probability :math:`\propto g(A, B)`,

.. math::
  g(A, B) = \sum_j \max\Big(0,\ \frac{s_{Bj}}{z_j} - \frac{s_{Aj}}{z_j}\Big),

the shared score :math:`B` holds where :math:`A` is weak (complementary partners).
``attraction=False`` draws :math:`B` like :math:`A`, by fitness.

**Dynamic merge boundaries** (crossover). With the float parameters flattened into one
vector of length :math:`N` (leaves in ``jax.tree`` order, each row-major), a split point
:math:`s\sim\mathcal{U}\{0,\dots,N-1\}` and a mixing ratio :math:`w\sim\mathcal{U}(0, 1)`
are drawn per child, and

.. math::
  \theta_c[i] = h\big(\theta_A[i], \theta_B[i];\ r_i\big), \qquad
  r_i = \begin{cases} w & i < s \\ 1 - w & i \ge s \end{cases}

where :math:`h(a, b; r)` puts weight :math:`r` on :math:`a`: ``"linear"`` is
:math:`r a + (1-r) b`, ``"slerp"`` (the paper's code) is
:math:`\frac{\sin(r\Omega)}{\sin\Omega}a + \frac{\sin((1-r)\Omega)}{\sin\Omega}b` with one
angle :math:`\Omega` between the two whole flattened vectors (linear interpolation when
they are nearly collinear, :math:`|\cos\Omega| > 0.9995`). Given a ``base``
:math:`\theta_0`, the interpolation acts on the task vectors
:math:`\theta - \theta_0` and adds :math:`\theta_0` back: SLERP then keeps the norm of
(nearly orthogonal) task vectors instead of shrinking it as averaging does, the
``space="task_vectors"`` of :func:`fusionjax.merging.slerp`.

**Archive update.** The child is scored and joins the archive as its :math:`(P+1)`-th
member; shared fitness is recomputed over all :math:`P+1` and the least fit leaves (the
child itself, if it is the least fit). With ``elitist=True`` (default) the member with
the highest total score is never the one removed: fitness sharing alone can evict the
most accurate model (when its points are all shared with many others), which the
paper's code allows; here the best model found is never lost. The archive starts
empty and the given models are inserted one by one by the same rule.

On the digits testbed (``tests/learned/m2n2_evidence_test.py``: 16 slots, 100 children,
SLERP on task vectors, fitness = correctness on the 200-example validation slice per task)
the best child beats the uniform soup on all three seeds (79.9/75.6/66.1% vs
73.7/71.3/58.2%) but task arithmetic with a validated λ only on seed 0 (76.6/77.6/72.4%),
and stays far below TIES and TSV-M: 100 pairwise interpolations, the demo's time budget,
are few for eight specialists (the paper runs thousands). Fitness sharing matters
(α = 0: 72.8/71.6/66.2%); attraction barely does at this budget (79.7/75.4/65.8%).

What costs time, and what is done about it: scoring a child (one forward pass over the
fitness set) dominates; crossover and fitness sharing are :math:`O(N + Pn)` per child.
The whole run is one compiled function: a ``lax.scan`` whose step draws ``children``
pairs, builds and scores the children under ``vmap`` and inserts them one by one (an
inner ``lax.scan``, in place); the starting models enter through the same step,
``children`` at a time (a ``lax.cond``), so the program holds one copy of the scoring
and of the insertion (compiling took 5 s of CPU on the testbed, running 100
generations under 2 s). The archive is one stacked pytree ``[P, ...]`` carried through
the scan, never copied to the host. ``score_fn`` may be a :class:`jax.tree_util.Partial`
whose array leaves (data, labels, heads) are passed as arguments of the compiled
function, so runs with equal shapes and options compile once (one compile per set of
static options, shared across seeds of the digits testbed). The split mask is built
leaf by leaf from each leaf's offset in the flattened order: the flat vector is never
materialised.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import keys as keys_lib
from fusionjax._src import pytrees
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax._src.base import PRNGKey
from fusionjax._src.base import Stacked

_HIGHEST = jax.lax.Precision.HIGHEST
_COLLINEAR = 0.9995
Interpolation = Literal["slerp", "linear"]
ScoreFn = Callable[[Params], jax.Array]


class M2N2Output(NamedTuple):
    r"""The result of :func:`m2n2` (a pytree of arrays).

    Attributes:
      params: The archive's member with the highest mean score :math:`\bar s_i` (the
        merged model).
      archive: The final archive, every leaf stacked ``[P, ...]``.
      scores: The archive's per-example scores :math:`s_{ij}`, ``[P, n]``.
      fitness: The archive's shared fitness :math:`f_i`, ``[P]`` (0 for empty slots).
      occupied: Which archive slots hold a model, ``[P]`` bool.
      history: The best mean score in the archive after each generation,
        ``[generations]`` (non-decreasing when ``elitist``).
      accepted: How many children entered the archive in each generation,
        ``[generations]`` int32.
    """

    params: Params
    archive: Stacked
    scores: jax.Array
    fitness: jax.Array
    occupied: jax.Array
    history: jax.Array
    accepted: jax.Array


# -- The pure pieces ---------------------------------------------------------------------


def _shared(scores: jax.Array, alpha: jax.Array) -> jax.Array:
    total = jnp.sum(scores, axis=0)
    z = jnp.where(total > 0, total, jnp.ones_like(total)) ** alpha
    return scores / z[None, :]


def shared_fitness(scores: ArrayLike, *, alpha: ArrayLike = 1.0) -> jax.Array:
    r"""Fitness under resource competition: every data point's score shared by its solvers.

    :math:`f_i = \sum_j s_{ij} / z_j` with :math:`z_j = (\sum_k s_{kj})^{\alpha}`
    (:math:`z_j = 1` where no member scores).

    Args:
      scores: Per-example scores ``[P, n]`` (member :math:`i`, data point :math:`j`),
        non-negative (e.g. 0/1 correctness).
      alpha: Competition strength :math:`\alpha \ge 0`; 0 is no competition (plain
        total score), 1 the paper's default (each point's value split evenly).

    Returns:
      ``[P]`` shared fitness.

    Raises:
      ValueError: if ``scores`` is not 2-D or ``alpha`` is negative.

    Examples:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
      >>> shared_fitness(s, alpha=1.0)   # point 0 is shared: worth 1/2 to each
      Array([1.5, 1.5], dtype=float32)

    References:
      Abrantes, Lange and Tang, `Competition and Attraction Improve Model Fusion
      <https://arxiv.org/abs/2508.16204>`_, GECCO 2025
    """
    scores = _score_matrix(scores)
    validation.check_hparam("alpha", alpha, lower=0.0)
    return jnp.sum(_shared(scores, jnp.asarray(alpha, scores.dtype)), axis=1)


def attraction(scores: ArrayLike, parent: ArrayLike, *, alpha: ArrayLike = 1.0) -> jax.Array:
    r"""How much each member complements ``parent``: where it scores and ``parent`` does not.

    :math:`g(A, B) = \sum_j \max(0, s_{Bj}/z_j - s_{Aj}/z_j)` with :math:`z_j` as in
    :func:`shared_fitness`, for :math:`A` = ``parent`` and every member :math:`B`
    (:math:`g(A, A) = 0`).

    Args:
      scores: Per-example scores ``[P, n]``.
      parent: Index of the first parent :math:`A` (an int, may be traced).
      alpha: Competition strength, as in :func:`shared_fitness`.

    Returns:
      ``[P]`` attraction of every member to ``parent``.

    Raises:
      ValueError: if ``scores`` is not 2-D or ``alpha`` is negative.

    Examples:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
      >>> attraction(s, 0, alpha=0.0)   # members 1 and 2 each solve one point 0 misses
      Array([0., 1., 1.], dtype=float32)

    References:
      Abrantes, Lange and Tang, `Competition and Attraction Improve Model Fusion
      <https://arxiv.org/abs/2508.16204>`_, GECCO 2025
    """
    scores = _score_matrix(scores)
    validation.check_hparam("alpha", alpha, lower=0.0)
    shared = _shared(scores, jnp.asarray(alpha, scores.dtype))
    return _attraction(shared, jnp.asarray(parent))


def _attraction(shared: jax.Array, parent: jax.Array) -> jax.Array:
    gap = shared - jnp.take(shared, parent, axis=0)[None, :]
    return jnp.sum(jnp.maximum(gap, 0.0), axis=1)


def _score_matrix(scores: ArrayLike) -> jax.Array:
    scores = validation.float_array(scores, "scores")
    if scores.ndim != 2:
        raise ValueError(
            f"scores must be [members, data points], 2-D; got shape {tuple(scores.shape)}."
        )
    return scores


def crossover(
    parent_a: Params,
    parent_b: Params,
    *,
    split_point: ArrayLike,
    mix_ratio: ArrayLike,
    base: Params | None = None,
    interpolation: Interpolation = "slerp",
) -> Params:
    r"""M2N2's crossover: two parents mixed with ratio ``w`` before a split point, ``1-w`` after.

    Over the float parameters flattened in ``jax.tree`` order (each leaf row-major),
    entry :math:`i` of the child is :math:`h(a_i, b_i; r_i)` with :math:`r_i = w` for
    :math:`i <` ``split_point`` and :math:`1 - w` after, the weight on ``parent_a``:
    ``"linear"`` :math:`r a + (1 - r) b`; ``"slerp"``
    :math:`\frac{\sin(r\Omega)}{\sin\Omega} a + \frac{\sin((1-r)\Omega)}{\sin\Omega} b`
    with :math:`\cos\Omega` the cosine between the whole flattened vectors (linear when
    :math:`|\cos\Omega| > 0.9995` or a vector is zero). With ``base``, :math:`a, b` are
    the task vectors ``parent - base`` and ``base`` is added back. Non-float leaves are
    taken from ``parent_a``.

    Args:
      parent_a: First parent :math:`\theta_A`.
      parent_b: Second parent :math:`\theta_B`, same structure, shapes and dtypes.
      split_point: The split :math:`s` in ``[0, N]``, an int (may be traced); 0 or
        :math:`N` mix every entry with one ratio.
      mix_ratio: :math:`w \in [0, 1]`, the weight on ``parent_a`` before the split.
      base: Optional common base :math:`\theta_0`: interpolate task vectors.
      interpolation: ``"slerp"`` (the paper's code) or ``"linear"``.

    Returns:
      The child, with the parents' structure and dtypes.

    Raises:
      ValueError: if the parents (or ``base``) differ in structure, shape or dtype, the
        interpolation is unknown, or a concrete ``mix_ratio`` lies outside [0, 1].

    Examples:
      >>> import jax.numpy as jnp
      >>> a = {"w": jnp.zeros(4)}
      >>> b = {"w": jnp.ones(4)}
      >>> crossover(a, b, split_point=1, mix_ratio=0.75, interpolation="linear")
      {'w': Array([0.25, 0.75, 0.75, 0.75], dtype=float32)}

    References:
      Abrantes, Lange and Tang, `Competition and Attraction Improve Model Fusion
      <https://arxiv.org/abs/2508.16204>`_, GECCO 2025
    """
    _check_interpolation(interpolation)
    validation.check_same_structure(parent_a, parent_b, "parent_b", "parent_a")
    if base is not None:
        validation.check_same_structure(parent_a, base, "base", "parent_a")
    validation.check_hparam("mix_ratio", mix_ratio, lower=0.0, upper=1.0)
    validation.check_hparam("split_point", split_point, lower=0.0)
    return _crossover(
        parent_a,
        parent_b,
        base,
        jnp.asarray(split_point, jnp.int32),
        jnp.asarray(mix_ratio, jnp.float32),
        interpolation,
    )


def _check_interpolation(interpolation: str) -> None:
    if interpolation not in ("slerp", "linear"):
        raise ValueError(f"interpolation must be 'slerp' or 'linear', got {interpolation!r}.")


def _is_float(x) -> bool:
    return pytrees.is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact)


def num_float_params(params: Params) -> int:
    """Length :math:`N` of the flattened float parameters (the range of split points)."""
    return int(sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params) if _is_float(x)))


def _crossover(a, b, base, split, ratio, interpolation):
    leaves_a, treedef = jax.tree.flatten(a)
    leaves_b = jax.tree.leaves(b)
    leaves_0 = [None] * len(leaves_a) if base is None else jax.tree.leaves(base)
    floats = [i for i, x in enumerate(leaves_a) if _is_float(x)]
    # Task vectors (or the parameters) of the float leaves, in compute dtype.
    va, vb, rs = {}, {}, {}
    offset = 0
    for i in floats:
        x, y, x0 = leaves_a[i], leaves_b[i], leaves_0[i]
        dt = validation.compute_dtype(x.dtype)
        x, y = jnp.asarray(x, dt), jnp.asarray(y, dt)
        if x0 is not None:
            x0 = jnp.asarray(x0, dt)
            x, y = x - x0, y - x0
        va[i], vb[i] = x, y
        # Every entry's position in the flattened vector (row-major within the leaf).
        index = offset + jnp.arange(x.size, dtype=jnp.int32).reshape(x.shape)
        rs[i] = jnp.where(index < split, ratio, 1.0 - ratio).astype(dt)
        offset += x.size
    if interpolation == "slerp" and floats:
        dot = sum(jnp.vdot(va[i], vb[i], precision=_HIGHEST).astype(jnp.float32) for i in floats)
        na = jnp.sqrt(sum(jnp.vdot(va[i], va[i], precision=_HIGHEST).astype(jnp.float32)
                          for i in floats))
        nb = jnp.sqrt(sum(jnp.vdot(vb[i], vb[i], precision=_HIGHEST).astype(jnp.float32)
                          for i in floats))
        denom = na * nb
        safe = denom > 0
        cos = jnp.clip(dot / jnp.where(safe, denom, 1.0), -1.0, 1.0)
        use_lerp = (~safe) | (jnp.abs(cos) > _COLLINEAR)
        omega = jnp.arccos(jnp.where(use_lerp, 0.0, cos))
        sin = jnp.sin(jnp.where(use_lerp, 1.0, omega))
    out = list(leaves_a)
    for i in floats:
        r = rs[i]
        if interpolation == "slerp":
            om, sn = omega.astype(r.dtype), sin.astype(r.dtype)
            ca = jnp.where(use_lerp, r, jnp.sin(r * om) / sn)
            cb = jnp.where(use_lerp, 1.0 - r, jnp.sin((1.0 - r) * om) / sn)
        else:
            ca, cb = r, 1.0 - r
        child = ca * va[i] + cb * vb[i]
        if leaves_0[i] is not None:
            child = child + jnp.asarray(leaves_0[i], child.dtype)
        out[i] = child.astype(leaves_a[i].dtype)
    return jax.tree.unflatten(treedef, out)


# -- The evolutionary loop ---------------------------------------------------------------


def _draw(key, weights, occupied):
    """One index with probability proportional to ``weights`` (uniform over occupied if 0)."""
    w = jnp.where(occupied, weights, 0.0)
    fallback = occupied.astype(w.dtype)
    w = jnp.where(jnp.sum(w) > 0, w, fallback)
    return jax.random.categorical(key, jnp.log(w))


def _sample_parents(key, scores, occupied, alpha, use_attraction):
    k1, k2 = jax.random.split(key)
    shared = _shared(scores, alpha)
    fitness = jnp.sum(shared, axis=1)
    a = _draw(k1, fitness, occupied)
    if use_attraction:
        g = jnp.where(occupied, _attraction(shared, a), 0.0)
        weights = jnp.where(jnp.sum(g) > 0, g, fitness)
    else:
        weights = fitness
    return a, _draw(k2, weights, occupied)


def _insert(state, child, alpha, elitist):
    """Adds ``child = (params, scores, valid)``, evicting the least fit of P + 1.

    An invalid child (padding) changes nothing.
    """
    archive, scores, occupied = state
    params, score, valid = child
    p = scores.shape[0]
    score = jnp.where(valid, score, 0.0)
    ext = jnp.concatenate([scores, score[None, :]], axis=0)
    occ = jnp.concatenate([occupied, valid[None]])
    fitness = jnp.sum(_shared(ext, alpha), axis=1)
    fitness = jnp.where(occ, fitness, -jnp.inf)  # empty slots go first
    if elitist:
        best = jnp.argmax(jnp.where(occ, jnp.sum(ext, axis=1), -jnp.inf))
        fitness = fitness.at[best].set(jnp.inf)
    worst = jnp.argmin(fitness)
    accept = (worst < p) & valid
    slot = jnp.minimum(worst, p - 1)

    def put(stacked, new):
        old = jax.lax.dynamic_index_in_dim(stacked, slot, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(stacked, jnp.where(accept, new, old), slot, 0)

    archive = jax.tree.map(put, archive, params)
    scores = put(scores, score)
    occupied = put(occupied, jnp.ones((), bool))
    return (archive, scores, occupied), accept


def _insert_all(state, children, alpha, elitist):
    def body(state, child):
        return _insert(state, child, alpha, elitist)

    return jax.lax.scan(body, state, children)


def _best(scores, occupied):
    mean = jnp.mean(scores, axis=1)
    return jnp.where(occupied, mean, -jnp.inf)


@functools.partial(
    jax.jit,
    static_argnames=(
        "static", "archive_size", "generations", "children", "interpolation",
        "use_attraction", "elitist",
    ),
)
def _evolve(
    dynamic, models, base, key, alpha, *, static, archive_size, generations, children,
    interpolation, use_attraction, elitist,
):
    score_fn = pytrees.jit_combine(dynamic, static)
    score_many = jax.vmap(lambda p: jnp.asarray(score_fn(p), jnp.float32))
    first = jax.tree.map(lambda x: x[0], models)
    n = jax.eval_shape(score_fn, first).shape[0]
    archive = jax.tree.map(
        lambda x: jnp.zeros((archive_size, *x.shape[1:]), x.dtype), models
    )
    state = (archive, jnp.zeros((archive_size, n), jnp.float32), jnp.zeros((archive_size,), bool))
    n_float = max(sum(x[0].size for x in jax.tree.leaves(models) if _is_float(x)), 1)
    # The starting models enter through the generations' own step (one copy of the
    # scoring and insertion in the program): the first ``first_steps`` steps take them
    # ``children`` at a time (padding marked invalid) instead of breeding.
    m = jax.tree.leaves(models)[0].shape[0]
    first_steps = -(-m // children)
    pad = first_steps * children - m
    chunks = jax.tree.map(
        lambda x: jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]).reshape(
            first_steps, children, *x.shape[1:]
        ),
        models,
    )
    valid_first = (jnp.arange(first_steps * children) < m).reshape(first_steps, children)

    def step(state, t):
        archive, scores, occupied = state

        def from_models():
            i = jnp.minimum(t, first_steps - 1)
            return jax.tree.map(lambda x: x[i], chunks), valid_first[i]

        def make_child(k):
            kp, ks, kw = jax.random.split(k, 3)
            a, b = _sample_parents(kp, scores, occupied, alpha, use_attraction)
            pa = jax.tree.map(lambda x: x[a], archive)
            pb = jax.tree.map(lambda x: x[b], archive)
            split = jax.random.randint(ks, (), 0, n_float)
            ratio = jax.random.uniform(kw, (), jnp.float32)
            return _crossover(pa, pb, base, split, ratio, interpolation)

        def bred():
            keys = jax.random.split(jax.random.fold_in(key, t - first_steps), children)
            return jax.vmap(make_child)(keys), jnp.ones((children,), bool)

        kids, valid = jax.lax.cond(t < first_steps, from_models, bred)
        state, accepted = _insert_all(state, (kids, score_many(kids), valid), alpha, elitist)
        best = jnp.max(_best(state[1], state[2]))
        return state, (best, jnp.sum(accepted.astype(jnp.int32)))

    steps = jnp.arange(first_steps + generations, dtype=jnp.int32)
    state, (history, accepted) = jax.lax.scan(step, state, steps)
    history, accepted = history[first_steps:], accepted[first_steps:]
    archive, scores, occupied = state
    top = jnp.argmax(_best(scores, occupied))
    params = jax.tree.map(lambda x: x[top], archive)
    fitness = jnp.where(occupied, jnp.sum(_shared(scores, alpha), axis=1), 0.0)
    return M2N2Output(params, archive, scores, fitness, occupied, history, accepted)


def m2n2(
    models: Sequence[Params],
    score_fn: ScoreFn,
    *,
    generations: int,
    archive_size: int,
    alpha: ArrayLike = 1.0,
    key: PRNGKey,
    base: Params | None = None,
    children: int = 1,
    interpolation: Interpolation = "slerp",
    attraction: bool = True,
    elitist: bool = True,
) -> M2N2Output:
    r"""M2N2: evolve an archive of models by split-point crossover, competition and attraction.

    The models are scored and inserted into an empty archive of ``archive_size``
    slots; then each of ``generations`` steps draws ``children`` parent pairs (first
    parent by shared fitness, second by attraction to the first), builds each child with
    :func:`crossover` at a random split point and mixing ratio, scores it with
    ``score_fn`` and inserts it, evicting the least fit of the archive plus the child
    (see the module docstring for the formulas). ``children=1`` is the paper's
    steady-state loop; more children per generation are drawn from the same archive
    and scored in one ``vmap``.

    The fitness data (what ``score_fn`` scores on) must not be the data the merged model
    is finally evaluated on: on the digits testbed the demo scores the first 200
    training examples of every task, the validation slice the data-free rows tune
    :math:`\lambda` on.

    Args:
      models: The starting models (e.g. fine-tuned from one base), one structure.
      score_fn: ``score_fn(params) -> [n]`` non-negative per-example scores (e.g.
        correctness on a validation set); pure, jittable and ``vmap``-able. A
        :class:`jax.tree_util.Partial` with its data as arguments compiles once for
        every call with equal shapes.
      generations: Number of generations (``lax.scan`` steps), ``>= 0``.
      archive_size: Archive slots :math:`P \ge 2`.
      alpha: Competition strength :math:`\alpha \ge 0` of :func:`shared_fitness`;
        0 switches competition off.
      key: PRNG key (required): parents, split points and ratios.
      base: Optional common base: crossover interpolates task vectors (see
        :func:`crossover`).
      children: Children per generation.
      interpolation: ``"slerp"`` (the paper's code) or ``"linear"``.
      attraction: Draw the second parent by attraction (``False``: by fitness, the
        paper's "no matchmaking" ablation).
      elitist: Never evict the member with the highest total score.

    Returns:
      An :class:`M2N2Output`; ``params`` is the member with the best mean score.

    Raises:
      TypeError: if ``models`` is not a list or tuple, or ``score_fn`` is not callable.
      ValueError: on an empty ``models``, models that differ in structure, shape or
        dtype, a bad hyperparameter, or a ``score_fn`` that does not return ``[n]``.

    Examples:
      A toy problem: two "models" each right on half the points; the archive finds a
      child right on more (``score_fn`` checks the sign of each entry)::

        score = lambda p: (p["w"] > 0).astype(jnp.float32)
        out = fj.learned.m2n2(models, score, generations=50, archive_size=4,
                              key=jax.random.key(0))
        out.history[-1]   # best mean score

    References:
      Abrantes, Lange and Tang, `Competition and Attraction Improve Model Fusion
      <https://arxiv.org/abs/2508.16204>`_, GECCO 2025 (code:
      https://github.com/SakanaAI/natural_niches)
    """
    validation.check_nonempty(models, "models")
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}.")
    generations = validation.check_int("generations", generations, lower=0)
    archive_size = validation.check_int("archive_size", archive_size, lower=2)
    children = validation.check_int("children", children, lower=1)
    validation.check_hparam("alpha", alpha, lower=0.0)
    _check_interpolation(interpolation)
    key = keys_lib.require_key(key, "m2n2")
    for i, m in enumerate(models):
        validation.check_same_structure(models[0], m, f"models[{i}]", "models[0]")
    validation.check_passthrough_equal(models[0], models, "models")
    if base is not None:
        validation.check_same_structure(models[0], base, "base", "models[0]")
    out = jax.eval_shape(score_fn, models[0])
    if not hasattr(out, "shape") or len(out.shape) != 1 or out.shape[0] == 0:
        raise ValueError(
            "score_fn must return one score per data point, [n] with n >= 1; got "
            f"{getattr(out, 'shape', type(out).__name__)}."
        )
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
    dynamic, static = pytrees.jit_partition(score_fn)
    try:
        hash(static)
    except TypeError:
        raise TypeError(
            "score_fn holds unhashable non-array values; pass a function or a "
            "jax.tree_util.Partial whose extra arguments are arrays or hashable."
        ) from None
    return _evolve(
        dynamic,
        stacked,
        base,
        key,
        jnp.asarray(alpha, jnp.float32),
        static=static,
        archive_size=archive_size,
        generations=generations,
        children=children,
        interpolation=interpolation,
        use_attraction=bool(attraction),
        elitist=bool(elitist),
    )
