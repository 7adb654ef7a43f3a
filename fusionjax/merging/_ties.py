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


def trim(*, density: ArrayLike = 0.2, scope: Scope = "leaf") -> Step:
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

    Returns:
      A task-vector :class:`fusionjax.Step` ``[T, ...] -> [T, ...]``.

    References:
      Yadav et al, `TIES-Merging <https://arxiv.org/abs/2306.01708>`_, NeurIPS 2023
    """
    validation.check_hparam("density", density, lower=0.0, upper=1.0, lower_open=True)
    if scope not in ("leaf", "model"):
        raise ValueError(f"scope must be 'leaf' or 'model', got {scope!r}.")
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


def _elect_sign(x, *, method, **_):
    # Row by row (same values as the stacked form), so that XLA fuses the
    # chain instead of materialising [T, ...] intermediates.
    rows = [x[t] for t in range(x.shape[0])]
    votes = rows if method == "mass" else [jnp.sign(r) for r in rows]
    sign = jnp.sign(functools.reduce(operator.add, votes))
    zero = jnp.zeros((), x.dtype)
    return jnp.stack([jnp.where((jnp.sign(r) == sign) & (sign != 0), r, zero) for r in rows])


def elect_sign(*, method: Literal["mass", "count"] = "mass") -> Step:
    r"""Elects a sign per entry and zeroes the entries of each task vector that disagree.

    ``"mass"`` (TIES): :math:`\gamma = \mathrm{sgn}\sum_t \tau_t`, the sign with
    the larger total magnitude. ``"count"``: the sign of the majority,
    :math:`\mathrm{sgn}\sum_t\mathrm{sgn}\,\tau_t`. Entries where the election
    ties (:math:`\gamma = 0`) are zeroed in every task vector.

    Args:
      method: ``"mass"`` or ``"count"``.

    Returns:
      A task-vector :class:`fusionjax.Step` ``[T, ...] -> [T, ...]``.

    References:
      Yadav et al, `TIES-Merging <https://arxiv.org/abs/2306.01708>`_, NeurIPS 2023
    """
    if method not in ("mass", "count"):
        raise ValueError(f"method must be 'mass' or 'count', got {method!r}.")
    return Step(
        f"elect_sign({method})",
        _elect_sign,
        reduces=False,
        options={"method": method},
        flat=True,
    )


def _disjoint_mean(x, **_):
    # Row by row, so that XLA fuses it with the steps before it.
    count = functools.reduce(operator.add, [(x[t] != 0).astype(x.dtype) for t in range(x.shape[0])])
    return sum_rows(x) / jnp.maximum(count, 1)


def disjoint_mean() -> Step:
    r"""Merger: the mean over the task vectors where each entry is nonzero.

    :math:`\tau_i = \sum_t \tau_{t,i} / \max(1, \#\{t: \tau_{t,i}\ne0\})`.

    Returns:
      A leafwise merger :class:`fusionjax.Step` ``[T, ...] -> [...]``.
    """
    return Step("disjoint_mean", _disjoint_mean, reduces=True, flat=True)


def ties(
    *,
    density: ArrayLike = 0.2,
    scaling: ArrayLike = 1.0,
    merge: Literal["mean", "sum"] = "mean",
    scope: Scope = "leaf",
) -> Step:
    r"""TIES-merging: trim, elect sign, disjoint merge, scale.

    1. Trim: keep the top ``density`` of :math:`|\tau_t|` per task vector.
    2. Elect: :math:`\gamma = \mathrm{sgn}\sum_t\hat\tau_t`.
    3. Disjoint merge: average (or sum) the trimmed entries that agree with
       :math:`\gamma`.
    4. :math:`\theta = \theta_0 + \lambda\tau`.

    Trimming is per leaf by default: every layer keeps the same fraction, the
    merge streams leaf by leaf with bounded memory and no layer is emptied
    because its updates are small in absolute terms (biases, norms). The TIES
    reference code trims over the whole flattened model: pass ``scope="model"``.

    Args:
      density: Fraction of entries kept per task vector (:math:`k` = 20% in the
        paper).
      scaling: :math:`\lambda`; the paper uses 1 when no validation set is used.
      merge: ``"mean"`` (disjoint mean, the paper) or ``"sum"``.
      scope: ``"leaf"`` or ``"model"``, see :func:`trim`.

    Returns:
      A merger for :func:`fusionjax.merge`.

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
    if merge not in ("mean", "sum"):
        raise ValueError(f"merge must be 'mean' or 'sum', got {merge!r}.")
    merger = disjoint_mean() if merge == "mean" else _linear.sum()
    return chain(trim(density=density, scope=scope), elect_sign(), merger, scale(scaling))
