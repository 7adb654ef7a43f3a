r"""PCB-merging: parameter competition balancing (Du et al., NeurIPS 2024).

Every entry of every task vector :math:`\tau_t` (:math:`T` tasks, a leaf of :math:`d`
entries) gets a score from two balances, the lowest-scoring entries are dropped and
the rest are averaged with their scores as weights:

1. *Outlier clamp*: :math:`a_t = \mathrm{clip}(|\tau_t|, q_{lo}, q_{hi})`, where
   :math:`q_{lo}, q_{hi}` are the entries of rank :math:`\lfloor d\epsilon\rfloor` and
   :math:`\lfloor d(1-\epsilon) - 1\rfloor` of :math:`|\tau_t|` sorted ascending
   (:math:`\epsilon` = ``outlier``, 1e-4 in the reference); :math:`\hat\tau_t =
   \mathrm{sgn}(\tau_t)\,a_t` is what gets merged.
2. *Intra-balancing* (within a task): :math:`\beta^{intra}_t = \exp\big(T\,
   \mathcal N(a_t)^2\big)`, :math:`\mathcal N` the min-max normalisation over the
   task's entries. (The paper writes a softmax; its denominator is one positive
   constant per task, which step 4's min-max normalisation cancels.)
3. *Inter-balancing* (across tasks): ``inter="sum"`` (the released ``pcb-merging.py``,
   and the issue's formula): :math:`\beta^{inter}_t = \tanh\big(\tau_t \odot
   \sum_s \tau_s\big)`; ``inter="pairwise"`` (the released ``pcb_ES.py``, the paper's
   sum over task pairs): :math:`\beta^{inter}_t = \sum_s \tanh(n_t \odot n_s)` with
   :math:`n_t = \mathrm{sgn}(\tau_t)\,\mathcal N(a_t)`.
4. *Drop and rescale*: :math:`\beta_t = \beta^{intra}_t\odot\beta^{inter}_t`, clipped from
   below at its entry of rank :math:`\lfloor d(1-r)\rfloor` (ascending; :math:`r` =
   ``ratio``), then min-max normalised: :math:`\hat\beta_t \in [0, 1]`, zero for every
   entry at or below that rank. So the top :math:`r` fraction of each task's entries
   survives, weighted by how far its score is above the cut.
5. *Merge*: :math:`\tau = \sum_t \hat\beta_t\hat\tau_t / \max(\sum_t\hat\beta_t,
   10^{-12})`, :math:`\theta = \theta_0 + \lambda\tau`.

Note on ``ratio``: in the reference code (``pcb_ratio``) it is the fraction *kept*
(``clamp(beta, min_ratio=1 - pcb_ratio)``), as TIES' :math:`k`; the paper's vision
experiments use 0.05 with evolutionary search of :math:`\lambda`, FusionBench-style
ports 0.1.

Scope: the reference flattens the whole model into one row per task, so every
quantile and min-max above is over all parameters. Here they are over each *leaf*
(parameter tensor): the step is leafwise and streams from checkpoints, and no layer is
emptied because its updates are small in absolute terms. On a model that is a single
leaf both are the same (the differential test checks that case too).

Where a normalisation has no range (max = min, e.g. a leaf no model changed), the
reference divides 0 by 0 (NaN); here the normalised values are 0, so that leaf's
merged update is 0.

What costs time, and what is done about it: four order statistics per leaf and task
(the two clamp bounds of :math:`|\tau_t|`, and the cut of the signed :math:`\beta_t`
from two selections of its positive and negative parts), found exactly by the radix
select of :mod:`fusionjax._src.quantile` (two passes over the leaf per call, three
calls) instead of sorting: on the digits testbed a first version with ``jnp.sort``
took 1.4 s per merge against TIES' 0.07 s. The rank positions are computed exactly on
the host from the leaf size, so the kernel is compiled once per leaf shape.
:func:`pcb_scaling_search` computes the balanced components once and only re-weights
them for every candidate :math:`\lambda`; its cost is the evaluations of the caller's
``score``.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import quantile
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax._src.base import Step
from fusionjax._src.merge import chain
from fusionjax._src.tree import is_mergeable
from fusionjax.merging._linear import scale
from fusionjax.merging._ties import check_choice

_TINY = 1e-12
Inter = Literal["sum", "pairwise"]


def _rank_index(value, fraction_of: Callable[[Any], Any], n: int):
    """``int(...)`` of a host float64 expression, or its float32 version when traced."""
    if validation.is_concrete(value):
        v = float(np.asarray(value, np.float64))
        return np.asarray(int(fraction_of(v) if n else 0), np.int32)
    return jnp.asarray(fraction_of(jnp.asarray(value, jnp.float32)), jnp.float32).astype(
        jnp.int32
    )


def _prepare(hp, info):
    d = info.size
    out = dict(hp)
    out["lo_index"] = _rank_index(hp["outlier"], lambda e: d * e, d)
    out["hi_index"] = _rank_index(hp["outlier"], lambda e: d * (1 - e) - 1, d)
    out["keep_index"] = _rank_index(hp["ratio"], lambda r: d * (1 - r), d)
    return out


def _minmax(v, lo, hi):
    rng = hi - lo
    ok = rng > 0
    safe = jnp.where(ok, rng, jnp.ones((), v.dtype))
    return jnp.where(ok, (v - lo) / safe, jnp.zeros((), v.dtype))


def _rows(index, t):
    return jnp.broadcast_to(jnp.asarray(index, jnp.int32), (t,))


def _ascending(a, index):
    """Entry ``index`` (0-based) of each row of ``a >= 0`` sorted ascending, as ``[T, 1]``.

    The ``(d - index)``-th largest, by the exact radix select of
    :mod:`fusionjax._src.quantile` (no sort).
    """
    t, d = a.shape
    return quantile.kth_largest([a], d - _rows(index, t))[:, None]


def _ascending_signed(b, index):
    r"""Entry ``index`` of each row of a signed ``b`` sorted ascending, as ``[T, 1]``.

    With :math:`K = d - index` and :math:`P` positive entries: the :math:`K`-th largest
    of :math:`\max(b, 0)` when :math:`K\le P`; else minus the ``(index + 1)``-th largest
    of :math:`\max(-b, 0)` (the positive entries count as zeros there, below every
    negative magnitude).
    """
    t, d = b.shape
    zero = jnp.zeros((), b.dtype)
    big = d - _rows(index, t)
    pos = quantile.kth_largest([jnp.maximum(b, zero)], big)
    neg = quantile.kth_largest([jnp.maximum(-b, zero)], _rows(index, t) + 1)
    npos = jnp.sum((b > 0).astype(jnp.int32), axis=1)
    return jnp.where(big <= npos, pos, -neg)[:, None]


def pcb_components(x, lo_index, hi_index, keep_index, inter: str):
    r"""The clamped task vectors and the normalised scores of one stacked leaf.

    Args:
      x: Stacked task vectors ``[T, ...]`` of one leaf.
      lo_index: Ascending rank of the lower clamp bound of :math:`|\tau_t|`.
      hi_index: Ascending rank of the upper clamp bound.
      keep_index: Ascending rank of the score cut (entries at or below it get weight 0).
      inter: ``"sum"`` or ``"pairwise"``, see :mod:`fusionjax.merging._pcb`.

    Returns:
      ``(clamped, weights)``, both ``[T, d]``: :math:`\hat\tau_t` and :math:`\hat\beta_t`.
    """
    t = x.shape[0]
    flat = x.reshape(t, -1)
    a = jnp.abs(flat)
    lo, hi = _ascending(a, lo_index), _ascending(a, hi_index)
    a = jnp.clip(a, lo, hi)
    clamped = jnp.sign(flat) * a
    norm = _minmax(a, jnp.min(a, axis=1, keepdims=True), jnp.max(a, axis=1, keepdims=True))
    intra = jnp.exp(t * norm * norm)
    if inter == "sum":
        total = functools.reduce(operator.add, [flat[i] for i in range(t)])
        cross = jnp.tanh(flat * total[None])
    else:
        n = jnp.sign(flat) * norm
        cross = jnp.stack(
            [functools.reduce(operator.add, [jnp.tanh(n[i] * n[j]) for j in range(t)])
             for i in range(t)]
        )
    beta = intra * cross
    cut = _ascending_signed(beta, keep_index)
    top = jnp.max(beta, axis=1, keepdims=True)
    weights = _minmax(jnp.clip(beta, cut, top), cut, top)
    return clamped, weights


def _pcb(x, *, lo_index, hi_index, keep_index, inter, **_):
    clamped, w = pcb_components(x, lo_index, hi_index, keep_index, inter)
    num = jnp.sum(clamped * w, axis=0)
    den = jnp.maximum(jnp.sum(w, axis=0), jnp.asarray(_TINY, w.dtype))
    return (num / den).reshape(x.shape[1:])


def _check(ratio, outlier, inter):
    validation.check_hparam("ratio", ratio, lower=0.0, upper=1.0, lower_open=True)
    validation.check_hparam("outlier", outlier, lower=0.0, upper=0.5, upper_open=True)
    check_choice("inter", inter, ("sum", "pairwise"))


def pcb_balance(*, ratio: ArrayLike = 0.1, outlier: ArrayLike = 1e-4, inter: Inter = "sum") -> Step:
    r"""PCB's merger without the final scaling: balance, drop, weighted average.

    See :mod:`fusionjax.merging._pcb` for the math; :func:`pcb_merging` is this step
    followed by :func:`fusionjax.merging.scale`.

    Args:
      ratio: :math:`r\in(0, 1]`, the fraction of each task vector's entries kept
        (the reference's ``pcb_ratio``).
      outlier: :math:`\epsilon\in[0, 0.5)`, the fraction of each end of
        :math:`|\tau_t|` clamped (1e-4 in ``pcb-merging.py``, 0.01 in ``pcb_ES.py``).
      inter: ``"sum"`` (:math:`\tanh(\tau_t\odot\sum_s\tau_s)`, default) or
        ``"pairwise"`` (:math:`\sum_s\tanh(n_t\odot n_s)`).

    Returns:
      A leafwise merger :class:`fusionjax.Step` ``[T, ...] -> [...]``.

    Raises:
      ValueError: naming the parameter, if a value is out of range or unknown.
    """
    _check(ratio, outlier, inter)
    return Step(
        "pcb",
        _pcb,
        reduces=True,
        hparams={"ratio": ratio, "outlier": outlier},
        options={"inter": inter},
        prepare=_prepare,
    )


def pcb_merging(
    *,
    ratio: ArrayLike = 0.1,
    scaling: ArrayLike = 1.0,
    outlier: ArrayLike = 1e-4,
    inter: Inter = "sum",
) -> Step:
    r"""PCB-merging: intra- and inter-balancing scores, drop by ratio, weighted merge.

    Per leaf and task, with :math:`a_t` the outlier-clamped :math:`|\tau_t|` and
    :math:`\mathcal N` min-max normalisation over the leaf:

    .. math::
       \beta_t = \exp\!\big(T\,\mathcal N(a_t)^2\big)\odot\tanh\!\big(\tau_t\odot
       \textstyle\sum_s\tau_s\big),\quad
       \hat\beta_t = \mathcal N\big(\max(\beta_t, \beta_{t,(\lfloor d(1-r)\rfloor)})\big),
       \quad \theta = \theta_0 + \lambda\,\frac{\sum_t\hat\beta_t\hat\tau_t}
       {\sum_t\hat\beta_t}.

    The balancing is per leaf (the reference flattens the whole model; see
    :mod:`fusionjax.merging._pcb`), so the merge streams leaf by leaf.

    Args:
      ratio: :math:`r`, the fraction of each task vector's entries kept (``pcb_ratio``;
        0.1 by default, 0.05 in the paper's vision runs).
      scaling: :math:`\lambda`; the paper tunes it on validation data (see
        :func:`pcb_scaling_search` for per-task values).
      outlier: :math:`\epsilon`, the fraction clamped at each end of :math:`|\tau_t|`.
      inter: ``"sum"`` or ``"pairwise"``, see :func:`pcb_balance`.

    Returns:
      A merger for :func:`fusionjax.merge`.

    Raises:
      ValueError: naming the parameter, if a value is out of range or unknown.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(4)}
      >>> fts = [{"w": jnp.array([1.0, -2.0, 0.5, 0.0])}, {"w": jnp.array([1.0, -2.0, 0.5, 0.0])}]
      >>> out = fj.merge(base, fts, fj.merging.pcb_merging(ratio=1.0))
      >>> [round(v, 3) for v in out["w"].tolist()]  # two equal models: the clamped model back
      [1.0, -1.0, 0.5, 0.0]

    References:
      Du et al, `Parameter Competition Balancing for Model Merging
      <https://arxiv.org/abs/2410.02396>`_, NeurIPS 2024
    """
    return chain(pcb_balance(ratio=ratio, outlier=outlier, inter=inter), scale(scaling))


# -- gradient-free search of per-task scalings on validation data -------------------


class PCBSearchOutput(NamedTuple):
    r"""What :func:`pcb_scaling_search` found.

    Attributes:
      params: The merged parameters at the best scalings found.
      scalings: The best per-task scalings :math:`\lambda_t`, ``[T]`` (NumPy).
      score: The caller's score at ``scalings``.
      history: Every ``(scalings, score)`` evaluated, in order.
    """

    params: Params
    scalings: np.ndarray
    score: float
    history: list


@functools.partial(jax.jit, static_argnums=(4,))
def _weighted_components(x, lo_index, hi_index, keep_index, inter):
    clamped, w = pcb_components(x, lo_index, hi_index, keep_index, inter)
    den = jnp.maximum(jnp.sum(w, axis=0), jnp.asarray(_TINY, w.dtype))
    return (clamped * w / den[None]).reshape(x.shape)


@jax.jit
def _combine(base, parts, lam):
    def one(b, p):
        if p is None:
            return b
        lam_ = lam.astype(p.dtype).reshape((-1,) + (1,) * (p.ndim - 1))
        return (b.astype(p.dtype) + jnp.sum(lam_ * p, axis=0)).astype(b.dtype)

    return jax.tree.map(one, base, parts, is_leaf=lambda v: v is None)


def pcb_scaling_search(
    base: Params,
    finetuned: Sequence[Params],
    score: Callable[[Params], float],
    *,
    ratio: float = 0.1,
    outlier: float = 1e-4,
    inter: Inter = "sum",
    grid: Sequence[float] = (0.6, 0.8, 1.0, 1.2, 1.4),
    num_steps: int = 20,
    step_size: float = 0.1,
    bounds: tuple[float, float] = (0.5, 2.0),
    key: jax.Array | None = None,
) -> PCBSearchOutput:
    r"""PCB-merging with per-task scalings searched on validation data, without gradients.

    The merged model at scalings :math:`\lambda\in\mathbb R^T` is
    :math:`\theta(\lambda) = \theta_0 + \sum_t \lambda_t\,\hat\beta_t\hat\tau_t /
    \sum_s\hat\beta_s` (the reference's ``compute_acc`` in ``pcb_ES.py``); the balanced
    components :math:`\hat\beta_t\hat\tau_t/\sum_s\hat\beta_s` are computed once.

    The search: first every common value of ``grid`` (:math:`\lambda_t = g`), then
    ``num_steps`` steps of a (1+1) evolution strategy from the best of them: a
    candidate :math:`\lambda' = \mathrm{clip}(\lambda + \sigma z, \text{bounds})`,
    :math:`z\sim\mathcal N(0, I)`, replaces :math:`\lambda` if it scores strictly
    higher; :math:`\sigma` (``step_size`` at first) grows by 1.5 on a success and
    shrinks by :math:`1.5^{-1/4}` on a failure (the 1/5th success rule). The paper
    uses nevergrad's ``NGOpt`` (CMA-ES family) with 100 evaluations in
    :math:`[0.8, 1.3]^T`; this is a simpler, dependency-free strategy of the same kind,
    not a reproduction of it. ``score`` must use validation data only.

    Args:
      base: Base parameters :math:`\theta_0`.
      finetuned: The fine-tuned models.
      score: ``score(params) -> float``, higher is better (e.g. mean validation accuracy).
      ratio: Fraction of entries kept, see :func:`pcb_merging`.
      outlier: Outlier clamp fraction, see :func:`pcb_merging`.
      inter: ``"sum"`` or ``"pairwise"``, see :func:`pcb_balance`.
      grid: Common scalings tried first (non-empty).
      num_steps: Evolution steps after the grid (0 for the grid alone).
      step_size: The initial :math:`\sigma` (> 0).
      bounds: ``(lower, upper)`` for every :math:`\lambda_t`, ``lower < upper``.
      key: PRNG key for the evolution steps (needed when ``num_steps > 0``).

    Returns:
      A :class:`PCBSearchOutput`; ``len(history) == len(grid) + num_steps``.

    Raises:
      ValueError: naming the parameter, if a value is out of range, or the models differ.

    Examples:
      >>> import jax, jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(3)}
      >>> fts = [{"w": jnp.array([1.0, 0.0, 0.5])}, {"w": jnp.array([0.0, 1.0, 0.5])}]
      >>> out = fj.merging.pcb_scaling_search(
      ...     base, fts, lambda p: -float(jnp.sum((p["w"] - 1.0) ** 2)), ratio=1.0,
      ...     grid=(1.0, 2.0), num_steps=0)
      >>> out.scalings.tolist()
      [2.0, 2.0]

    References:
      Du et al, `Parameter Competition Balancing for Model Merging
      <https://arxiv.org/abs/2410.02396>`_, NeurIPS 2024 (and its ``pcb_ES.py``)
    """
    _check(ratio, outlier, inter)
    if not callable(score):
        raise TypeError(f"score must be a callable params -> float, got {type(score).__name__}.")
    grid = [float(g) for g in grid]
    if not grid:
        raise ValueError("grid must hold at least one scaling.")
    num_steps = validation.check_int("num_steps", num_steps, lower=0)
    validation.check_hparam("step_size", step_size, lower=0.0, lower_open=True)
    if len(bounds) != 2 or not float(bounds[0]) < float(bounds[1]):
        raise ValueError(f"bounds must be (lower, upper) with lower < upper, got {bounds!r}.")
    if num_steps > 0 and key is None:
        raise ValueError("key is needed for the evolution steps (num_steps > 0).")
    validation.check_models(base, finetuned)
    lower, upper = float(bounds[0]), float(bounds[1])

    t = len(finetuned)
    flat_base, treedef = jax.tree_util.tree_flatten(base)
    flat_fts = [jax.tree.leaves(f) for f in finetuned]
    parts = []
    for i, b in enumerate(flat_base):
        if not is_mergeable(b):
            parts.append(None)
            continue
        dt = validation.compute_dtype(b.dtype)
        x = jnp.stack([jnp.asarray(f[i], dt) - jnp.asarray(b, dt) for f in flat_fts])
        d = math.prod(np.shape(b))
        idx = (
            np.int32(int(d * outlier)),
            np.int32(int(d * (1 - outlier) - 1)),
            np.int32(int(d * (1 - ratio))),
        )
        parts.append(_weighted_components(x, *idx, inter))
    parts_tree = treedef.unflatten(parts)

    def params_at(lam):
        return _combine(base, parts_tree, jnp.asarray(lam, jnp.float32))

    history: list = []

    def evaluate(lam):
        s = float(score(params_at(lam)))
        history.append((np.asarray(lam, np.float64).copy(), s))
        return s

    best_lam, best = None, -math.inf
    for g in grid:
        lam = np.full(t, g, np.float64)
        s = evaluate(lam)
        if s > best:
            best_lam, best = lam, s
    sigma = float(step_size)
    for j in range(num_steps):
        z = np.asarray(jax.random.normal(jax.random.fold_in(key, j), (t,)), np.float64)
        cand = np.clip(best_lam + sigma * z, lower, upper)
        s = evaluate(cand)
        if s > best:
            best_lam, best = cand, s
            sigma *= 1.5
        else:
            sigma *= 1.5 ** -0.25
    return PCBSearchOutput(params_at(best_lam), best_lam, best, history)
