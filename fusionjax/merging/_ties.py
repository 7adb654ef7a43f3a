"""TIES-merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import quantile
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Statistic
from fusionjax._src.base import Step
from fusionjax._src.merge import chain
from fusionjax.merging import _linear
from fusionjax.merging._linear import scale
from fusionjax.merging._linear import sum_rows

Scope = Literal["leaf", "model"]
Count = Literal["ceil", "mergekit"]
Convention = Literal["fusionjax", "mergekit"]


def check_choice(name: str, value, choices) -> None:
    """Raises ``ValueError`` naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}.")


def convention_default(convention: str, value, *, fusionjax, mergekit):
    """``value`` if given, else the default of the chosen convention."""
    check_choice("convention", convention, ("fusionjax", "mergekit"))
    if value is not None:
        return value
    return mergekit if convention == "mergekit" else fusionjax


def num_kept_mergekit(density: ArrayLike, n: int) -> jax.Array:
    """The kept count of mergekit, ``max(1, int(density * n))`` (``n`` when density >= 1)."""
    if validation.is_concrete(density):
        d = np.asarray(density, np.float64)
        k = np.maximum(1, np.floor(d * n)).astype(np.int64)
        return np.where(d >= 1.0, n, k).astype(np.int32)
    d = jnp.asarray(density, jnp.float32)
    k = jnp.maximum(1, jnp.floor(d * n)).astype(jnp.int32)
    return jnp.where(d >= 1.0, n, k)


def descending_ranks(a: jax.Array) -> jax.Array:
    """Rank of each entry of each row ``a[t]`` in decreasing order, ties by index.

    Rank 0 is the largest; among equal values the lower flat index ranks first
    (a stable sort), as ``torch.argsort(descending=True)`` on CPU orders them.
    """
    t = a.shape[0]
    flat = a.reshape(t, -1)
    order = jnp.argsort(-flat, axis=-1, stable=True)
    n = flat.shape[1]
    ranks = jnp.zeros_like(order).at[jnp.arange(t)[:, None], order].set(
        jnp.broadcast_to(jnp.arange(n, dtype=order.dtype), (t, n))
    )
    return ranks.reshape(a.shape)


def ascending_ranks(a: jax.Array) -> jax.Array:
    """Rank of each entry of each row ``a[t]`` in increasing order, ties by index."""
    t = a.shape[0]
    flat = a.reshape(t, -1)
    order = jnp.argsort(flat, axis=-1, stable=True)
    n = flat.shape[1]
    ranks = jnp.zeros_like(order).at[jnp.arange(t)[:, None], order].set(
        jnp.broadcast_to(jnp.arange(n, dtype=order.dtype), (t, n))
    )
    return ranks.reshape(a.shape)


def l1_rescale(x: jax.Array, masked: jax.Array, eps: float = 1e-7) -> jax.Array:
    r"""Each row of ``masked`` scaled to the L1 norm of ``x``'s row (mergekit's ``rescale``).

    :math:`\hat\tau_t = m_t\odot\tau_t\cdot\|\tau_t\|_1/\|m_t\odot\tau_t\|_1`,
    left unscaled when either norm is below ``eps`` (1e-7, as mergekit's
    ``rescaled_masked_tensor`` with ``RescaleNorm.l1``).

    Args:
      x: Stacked task vectors ``[T, ...]`` before masking.
      masked: The same, masked (zeros where dropped).
      eps: Norms below it leave the row unscaled.

    Returns:
      ``masked`` with each row rescaled, ``[T, ...]``.
    """
    axes = tuple(range(1, x.ndim))
    before = jnp.sum(jnp.abs(x), axis=axes)
    after = jnp.sum(jnp.abs(masked), axis=axes)
    ok = (before >= eps) & (after >= eps)
    factor = jnp.where(ok, before / jnp.where(ok, after, 1.0), 1.0).astype(x.dtype)
    return masked * factor.reshape((-1,) + (1,) * (x.ndim - 1))


def num_kept(density: ArrayLike, n: int) -> jax.Array:
    """Entries kept out of ``n`` at a given density: ``ceil(density * n)``, per entry.

    A concrete density is rounded in float64 (so 0.3 of 90 is 27, not the 28 a
    float32 product gives) on the host; a traced one in float32.
    """
    if validation.is_concrete(density):
        d = np.asarray(density, np.float64)
        return np.ceil(np.round(d * n, 9)).astype(np.int32)
    return jnp.ceil(jnp.asarray(density, jnp.float32) * n).astype(jnp.int32)


def _prepare_trim(hp, info):
    return {"k": num_kept(hp["density"], info.size)}


def _prepare_trim_mergekit(hp, info):
    return {"k": num_kept_mergekit(hp["density"], info.size)}


def _trim_mergekit(x, *, k, rescale, **_):
    # Exactly k entries per model: ranks by decreasing magnitude, ties by index.
    ranks = descending_ranks(jnp.abs(x))
    keep = ranks < k.reshape((-1,) + (1,) * (x.ndim - 1))
    masked = jnp.where(keep, x, jnp.zeros((), x.dtype))
    return l1_rescale(x, masked) if rescale == "l1" else masked


def _trim(x, *, k, **_):
    # kth_largest ranks |x| of the unflattened x itself, and the rows are
    # masked one by one: XLA then fuses each row with the arithmetic that
    # produced it and materialises no [T, ...] temporary (on XLA:CPU the
    # stacked form costs two extra [T, ...] buffers).
    thr = quantile.kth_largest([x], k)
    zero = jnp.zeros((), x.dtype)
    return jnp.stack([jnp.where(jnp.abs(x[t]) >= thr[t], x[t], zero) for t in range(x.shape[0])])


def _prepare_trim_model(hp, info):
    # The kept count over the whole model, from the float64 density (exact).
    return {"k": num_kept(hp["density"], info.model_size), "threshold": hp["threshold"]}


def _trim_model(x, *, threshold, **_):
    thr = threshold.astype(x.dtype)
    zero = jnp.zeros((), x.dtype)
    return jnp.stack([jnp.where(jnp.abs(x[t]) >= thr[t], x[t], zero) for t in range(x.shape[0])])


@dataclasses.dataclass(frozen=True)
class _MagnitudeThreshold(Statistic):
    """The exact k-th largest magnitude of each task vector over the whole model.

    A radix select over the float32 bit patterns, streamed: each pass adds every
    leaf's histogram of the next digit (additive over leaves), then picks the
    digit (see :mod:`fusionjax._src.quantile`). Two passes for float32.
    """

    num_passes: int = len(quantile.DIGITS_F32)
    output: str = "threshold"

    def init(self, hparams, infos):
        n = sum(info.size for info in infos)
        return quantile.stream_init(jnp.asarray(hparams["k"], jnp.int32), n)

    def begin(self, state, pass_index):
        return quantile.stream_begin(state, pass_index)

    def update(self, state, x, pass_index):
        return quantile.stream_update(state, x.astype(jnp.float32), pass_index)

    def end(self, state, pass_index):
        return quantile.stream_end(state, pass_index)

    def result(self, state):
        values = quantile.stream_result(state)  # [T, number of ranks]
        return {self.output: values[:, 0] if self.output == "threshold" else values}


def trim(
    *,
    density: ArrayLike = 0.2,
    scope: Scope = "leaf",
    count: Count = "ceil",
    rescale: Literal["none", "l1"] = "none",
) -> Step:
    r"""Keeps the ``density`` fraction of largest-magnitude entries of each task vector.

    Entry :math:`\tau_{t,i}` is kept when :math:`|\tau_{t,i}|` is among the
    :math:`\lceil \rho n\rceil` largest of task vector :math:`t`; the rest are
    zeroed (ties with the threshold are kept). The threshold is exact (found by a
    radix select over the float bit patterns, not by sorting).

    Args:
      density: :math:`\rho\in(0, 1]`, the fraction kept (:math:`k` in TIES); one
        value, or one per model (shape ``[T]``).
      scope: ``"leaf"`` ranks entries within each parameter leaf (each layer
        keeps ``density`` of its entries); ``"model"`` ranks them over the whole
        model, as the TIES reference code and FusionBench do: a model-wide
        statistic, streamed (two extra reads of every leaf for float32), where
        layers with small updates, such as biases and norms, may be emptied.
      count: ``"ceil"`` keeps :math:`\lceil\rho n\rceil` entries and every entry
        tied with the threshold; ``"mergekit"`` keeps exactly
        :math:`k=\max(1, \lfloor\rho n\rfloor)` entries (all when
        :math:`\rho\ge1`), ties broken by index (the lower flat index is kept),
        as mergekit's ``magnitude`` sparsification. (mergekit sorts with torch's
        unstable ``argsort``, which breaks ties in no fixed order; on tie-free
        data, e.g. float32 task vectors, the kept set is mergekit's exactly.)
        Leaf scope only.
      rescale: ``"none"``, or ``"l1"`` (mergekit's ``rescale: true``): each trimmed
        task vector is scaled back to its L1 norm before trimming (see
        :func:`l1_rescale`). Needs ``count="mergekit"``.

    Returns:
      A task-vector :class:`fusionjax.Step` ``[T, ...] -> [T, ...]``.

    References:
      Yadav et al, `TIES-Merging <https://arxiv.org/abs/2306.01708>`_, NeurIPS 2023
    """
    validation.check_hparam("density", density, lower=0.0, upper=1.0, lower_open=True)
    check_choice("scope", scope, ("leaf", "model"))
    check_choice("count", count, ("ceil", "mergekit"))
    check_choice("rescale", rescale, ("none", "l1"))
    if count == "mergekit" and scope != "leaf":
        raise ValueError("count='mergekit' ranks within each tensor: it needs scope='leaf'.")
    if rescale != "none" and count != "mergekit":
        raise ValueError("rescale='l1' is mergekit's: it needs count='mergekit'.")
    if count == "mergekit":
        return Step(
            "trim(mergekit)",
            _trim_mergekit,
            flat=True,
            reduces=False,
            hparams={"density": density},
            options={"rescale": rescale},
            per_model=("density",),
            prepare=_prepare_trim_mergekit,
        )
    if scope == "leaf":
        return Step(
            "trim",
            _trim,
            flat=True,
            reduces=False,
            hparams={"density": density},
            per_model=("density",),
            prepare=_prepare_trim,
        )
    return Step(
        "trim(model)",
        _trim_model,
        flat=True,
        reduces=False,
        hparams={"density": density, "threshold": 0.0},
        per_model=("density", "threshold"),
        prepare=_prepare_trim_model,
        statistic=_MagnitudeThreshold(),
    )


def _elect_sign(x, *, method, zero="drop", weights=None, uniform=True, majority=None, **_):
    # Row by row (same values as the stacked form), so that XLA fuses the
    # chain instead of materialising [T, ...] intermediates.
    rows = [x[t] for t in range(x.shape[0])]
    if not uniform:  # mergekit elects on the weighted task vectors w_t tau_t
        w = weights.astype(x.dtype)
        rows = [w[t] * r for t, r in enumerate(rows)]
    votes = rows if method == "mass" else [jnp.sign(r) for r in rows]
    total = functools.reduce(operator.add, votes)
    if zero == "positive":
        sign = jnp.where(total >= 0, jnp.ones((), x.dtype), -jnp.ones((), x.dtype))
    else:
        sign = jnp.sign(total)
        if zero == "majority":
            sign = jnp.where(sign == 0, majority.astype(x.dtype), sign)
    zero_ = jnp.zeros((), x.dtype)
    return jnp.stack(
        [jnp.where((jnp.sign(r) == sign) & (sign != 0), x[t], zero_) for t, r in enumerate(rows)]
    )


@dataclasses.dataclass(frozen=True)
class _MajoritySign(Statistic):
    """FusionBench's tie-break: the sign of the sum of the elected signs over the model."""

    method: str = "mass"

    def init(self, hparams, infos):
        return jnp.zeros((), jnp.float32)

    def update(self, state, x, pass_index):
        rows = [x[t] for t in range(x.shape[0])]
        votes = rows if self.method == "mass" else [jnp.sign(r) for r in rows]
        return state + jnp.sum(jnp.sign(functools.reduce(operator.add, votes))).astype(
            jnp.float32
        )

    def result(self, state):
        return {"majority": jnp.sign(state)}


def elect_sign(
    *,
    method: Literal["mass", "count"] = "mass",
    zero: Literal["drop", "positive", "majority"] = "drop",
    weights: ArrayLike | None = None,
) -> Step:
    r"""Elects a sign per entry and zeroes the entries of each task vector that disagree.

    ``"mass"`` (TIES): :math:`\gamma = \mathrm{sgn}\sum_t \tau_t`, the sign with
    the larger total magnitude. ``"count"``: the sign of the majority,
    :math:`\mathrm{sgn}\sum_t\mathrm{sgn}\,\tau_t`. With ``weights`` the
    election is over :math:`w_t\tau_t` and entry :math:`\tau_{t,i}` survives when
    :math:`\mathrm{sgn}(w_t\tau_{t,i}) = \gamma_i` (mergekit's ``get_mask`` on
    its weighted deltas). An entry that is zero never survives.

    Where the election ties (:math:`\sum = 0`) the three conventions differ:

    * ``"drop"`` (fusionjax): :math:`\gamma=0`, the entry is zeroed in every model;
    * ``"positive"`` (mergekit): :math:`\gamma = +1` whenever the sum is
      :math:`\ge 0`, so positive entries survive;
    * ``"majority"`` (FusionBench's ``resolve_sign``): :math:`\gamma` is the sign of
      :math:`\sum_i\gamma_i` over the whole model, a model-wide statistic (one
      extra streamed read of every leaf). Not with ``weights``.

    Args:
      method: ``"mass"`` or ``"count"``.
      zero: ``"drop"``, ``"positive"`` or ``"majority"``, see above.
      weights: Optional per-model weights ``[T]`` the election is weighted by.

    Returns:
      A task-vector :class:`fusionjax.Step` ``[T, ...] -> [T, ...]``.

    References:
      Yadav et al, `TIES-Merging <https://arxiv.org/abs/2306.01708>`_, NeurIPS 2023
    """
    check_choice("method", method, ("mass", "count"))
    check_choice("zero", zero, ("drop", "positive", "majority"))
    validation.check_hparam("weights", weights)
    if zero == "majority" and weights is not None:
        raise ValueError("elect_sign: zero='majority' (FusionBench) takes no weights.")
    hparams = {} if weights is None else {"weights": weights}
    statistic = None
    if zero == "majority":
        hparams["majority"] = 0.0
        statistic = _MajoritySign(method)
    name = f"elect_sign({method})" if zero == "drop" else f"elect_sign({method}, {zero})"
    return Step(
        name,
        _elect_sign,
        reduces=False,
        hparams=hparams,
        options={"method": method, "zero": zero, "uniform": weights is None}
        if (zero != "drop" or weights is not None)
        else {"method": method},
        per_model=("weights",),
        flat=True,
        statistic=statistic,
    )


def _disjoint_mean(x, *, weights=None, uniform=True, **_):
    # Row by row, so that XLA fuses it with the steps before it.
    n = x.shape[0]
    if uniform:
        count = functools.reduce(operator.add, [(x[t] != 0).astype(x.dtype) for t in range(n)])
        return sum_rows(x) / jnp.maximum(count, 1)
    w = weights.astype(x.dtype)
    wx = [w[t] * x[t] for t in range(n)]
    num = functools.reduce(operator.add, wx)
    den = functools.reduce(operator.add, [w[t] * (wx[t] != 0).astype(x.dtype) for t in range(n)])
    return num / jnp.where(den == 0, jnp.ones((), x.dtype), den)


def disjoint_mean(weights: ArrayLike | None = None) -> Step:
    r"""Merger: the mean over the task vectors where each entry is nonzero.

    :math:`\tau_i = \sum_t \tau_{t,i} / \max(1, \#\{t: \tau_{t,i}\ne0\})`. With
    per-model ``weights`` (mergekit's TIES with ``normalize: true``):
    :math:`\tau_i = \sum_t w_t\tau_{t,i} / d_i` with
    :math:`d_i = \sum_{t: w_t\tau_{t,i}\ne0} w_t`, and :math:`d_i = 1` where it is 0.

    Args:
      weights: Optional per-model weights ``[T]`` (any sign, as mergekit).

    Returns:
      A leafwise merger :class:`fusionjax.Step` ``[T, ...] -> [...]``.
    """
    return _linear.weighted_merger("disjoint_mean", _disjoint_mean, weights)


def _disjoint_max(x, **_):
    rows = [x[t] for t in range(x.shape[0])]
    mag = functools.reduce(jnp.maximum, [jnp.abs(r) for r in rows])
    return jnp.sign(functools.reduce(operator.add, rows)) * mag


def disjoint_max() -> Step:
    r"""Merger: the largest surviving magnitude with the elected sign (FusionBench's ``max``).

    After :func:`elect_sign` the nonzero entries of a position all share one sign
    :math:`\gamma_i`; :math:`\tau_i = \gamma_i\max_t|\tau_{t,i}|` (0 where none survives).

    Returns:
      A leafwise merger :class:`fusionjax.Step` ``[T, ...] -> [...]``.
    """
    return Step("disjoint_max", _disjoint_max, reduces=True, flat=True)


def ties(
    *,
    density: ArrayLike = 0.2,
    scaling: ArrayLike = 1.0,
    merge: Literal["mean", "sum", "max"] = "mean",
    scope: Scope = "leaf",
    weights: ArrayLike | None = None,
    count: Count | None = None,
    zero_sign: Literal["drop", "positive", "majority"] | None = None,
    rescale: Literal["none", "l1"] = "none",
    convention: Convention = "fusionjax",
) -> Step:
    r"""TIES-merging: trim, elect sign, disjoint merge, scale.

    1. Trim: keep the top ``density`` of :math:`|\tau_t|` per task vector.
    2. Elect: :math:`\gamma = \mathrm{sgn}\sum_t w_t\hat\tau_t`.
    3. Disjoint merge: average (or sum, or take the largest magnitude of) the
       trimmed entries that agree with :math:`\gamma`.
    4. :math:`\theta = \theta_0 + \lambda\tau`.

    Trimming is per leaf by default: every layer keeps the same fraction, the
    merge streams leaf by leaf with bounded memory and no layer is emptied
    because its updates are small in absolute terms (biases, norms). The TIES
    reference code trims over the whole flattened model: pass ``scope="model"``.

    ``convention="mergekit"`` reproduces mergekit's ``ties`` (see the table in
    :mod:`fusionjax.merging`): ``count="mergekit"`` and ``zero_sign="positive"``;
    mergekit's ``normalize: true/false`` is ``merge="mean"/"sum"``, its per-model
    ``weight`` is ``weights``, its ``lambda`` is ``scaling``, ``rescale: true`` is
    ``rescale="l1"``. FusionBench's ``merge_func`` is ``merge`` (``"max"`` too) with
    ``scope="model"`` and ``zero_sign="majority"``.

    Args:
      density: Fraction of entries kept per task vector (:math:`k` = 20% in the
        paper); one value or one per model.
      scaling: :math:`\lambda`; the paper uses 1 when no validation set is used.
      merge: ``"mean"`` (disjoint mean, the paper), ``"sum"`` or ``"max"``
        (:func:`disjoint_max`).
      scope: ``"leaf"`` or ``"model"``, see :func:`trim`.
      weights: Optional per-model weights :math:`w_t` (mergekit's ``weight``):
        the election and the merge are over :math:`w_t\hat\tau_t`, and the mean
        divides by the summed weights of the surviving entries.
      count: ``"ceil"`` or ``"mergekit"``, see :func:`trim`; default by convention.
      zero_sign: Tie rule of the election, see :func:`elect_sign`; default by
        convention (``"drop"``, mergekit ``"positive"``).
      rescale: ``"none"`` or ``"l1"``, see :func:`trim`.
      convention: ``"fusionjax"`` or ``"mergekit"``: the defaults of ``count``
        and ``zero_sign``.

    Returns:
      A merger for :func:`fusionjax.merge`.

    Raises:
      ValueError: naming the parameter, if an option is unknown or they conflict.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(4)}
      >>> fts = [{"w": jnp.array([1.0, -2.0, 0.1, 0.0])},
      ...        {"w": jnp.array([3.0, 1.0, 0.0, -0.1])}]
      >>> fj.merge(base, fts, fj.merging.ties(density=0.5))
      {'w': Array([ 2., -2.,  0.,  0.], dtype=float32)}

    References:
      Yadav et al, `TIES-Merging <https://arxiv.org/abs/2306.01708>`_, NeurIPS 2023
    """
    count = convention_default(convention, count, fusionjax="ceil", mergekit="mergekit")
    zero_sign = convention_default(convention, zero_sign, fusionjax="drop", mergekit="positive")
    check_choice("merge", merge, ("mean", "sum", "max"))
    if merge == "max" and weights is not None:
        raise ValueError("ties: merge='max' takes no weights.")
    return chain(
        trim(density=density, scope=scope, count=count, rescale=rescale),
        elect_sign(zero=zero_sign, weights=weights),
        _merger(merge, weights),
        scale(scaling),
    )


def _merger(merge: str, weights) -> Step:
    if merge == "mean":
        return disjoint_mean(weights)
    if merge == "max":
        return disjoint_max()
    return _linear.sum(weights)
