"""Linear mergers: sum, (weighted) mean, scaling; task arithmetic and model soups."""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Step
from fusionjax._src.merge import chain


def sum_rows(x: jax.Array) -> jax.Array:
    """Sums the leading (model) axis of ``[T, ...]`` by adding its ``T`` rows.

    On XLA:CPU ``jnp.sum(x, axis=0)`` over a short leading axis was measured
    ~60x slower than adding the rows; ``T`` is small, so the unrolled sum is cheap.
    """
    return functools.reduce(operator.add, [x[t] for t in range(x.shape[0])])


def _scale(x, *, scaling, **_):
    return x * scaling.astype(x.dtype)


def _sum(x, *, weights=None, uniform=True, **_):
    if uniform:
        return sum_rows(x)
    w = weights.astype(x.dtype)
    return functools.reduce(operator.add, [w[t] * x[t] for t in range(x.shape[0])])


def _mean(x, *, weights, uniform, **_):
    n = x.shape[0]
    if uniform:
        return sum_rows(x) / jnp.asarray(n, x.dtype)
    w = weights.astype(x.dtype)
    w = w / sum_rows(w)
    return functools.reduce(operator.add, [w[t] * x[t] for t in range(n)])


def scale(scaling: ArrayLike) -> Step:
    r"""Multiplies task vectors (stacked or merged) by :math:`\lambda`.

    Elementwise, so it may follow a merger in a :func:`fusionjax.chain`.

    Args:
      scaling: The factor :math:`\lambda`; a scalar (it may be traced, so a sweep
        over it can be vmapped).

    Returns:
      A :class:`fusionjax.Step`.
    """
    validation.check_hparam("scaling", scaling)
    return Step(
        "scale", _scale, reduces=False, hparams={"scaling": scaling}, elementwise=True, flat=True
    )


def _round_to(x, *, dtype, **_):
    return x.astype(dtype).astype(x.dtype)


def round_to(dtype) -> Step:
    r"""Rounds task vectors (stacked or merged) to ``dtype`` and back: :math:`\mathrm{rd}(\tau)`.

    Merges compute in at least float32. mergekit computes in the checkpoint's
    dtype: its task vectors are :math:`\mathrm{rd}_{bf16}(\theta_t - \theta_0)`, and
    magnitude ranks (with many ties in bf16) are taken on those.
    ``chain(round_to("bfloat16"), ties(..., convention="mergekit"))`` starts from
    the same task vectors as mergekit on a bf16 checkpoint. Elementwise.

    Args:
      dtype: A floating dtype (name or dtype), e.g. ``"bfloat16"``.

    Returns:
      An elementwise task-vector :class:`fusionjax.Step`.

    Raises:
      TypeError: if ``dtype`` is not a floating-point dtype.
    """
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype!r}.") from None
    if not jnp.issubdtype(dt, jnp.floating):
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype!r}.")
    return Step(
        "round_to", _round_to, reduces=False, options={"dtype": dt.name}, elementwise=True,
        flat=True,
    )


def sum(weights: ArrayLike | None = None) -> Step:  # pylint: disable=redefined-builtin
    r"""Merger :math:`\tau = \sum_t w_t\tau_t` (:math:`w_t = 1` without weights).

    Unnormalised: mergekit's ``task_arithmetic`` / ``dare_linear`` / ``breadcrumbs``
    with ``normalize: false`` are ``chain(..., sum(weights), scale(lambda))``.

    Args:
      weights: Optional per-model weights ``[T]`` (any sign).

    Returns:
      A leafwise :class:`fusionjax.Step` that reduces ``[T, ...] -> [...]``.
    """
    return weighted_merger("sum", _sum, weights)


def weighted_merger(name: str, fn: Any, weights: ArrayLike | None) -> Step:
    """A flat merger step with optional per-model ``weights`` (checked, ``[T]``).

    Without weights the step has no hyperparameter; ``fn`` then gets
    ``uniform=True`` and ignores ``weights``.
    """
    validation.check_hparam("weights", weights)
    if weights is None:
        return Step(name, fn, reduces=True, flat=True)
    return Step(
        name,
        fn,
        reduces=True,
        flat=True,
        hparams={"weights": weights},
        options={"uniform": False},
        per_model=("weights",),
    )


def mean(weights: ArrayLike | None = None) -> Step:
    r"""Merger :math:`\tau = \sum_t w_t \tau_t / \sum_t w_t` (uniform if no weights).

    In parameter space this is the weighted average
    :math:`\theta = \sum_t w_t\theta_t / \sum_t w_t` of the fine-tuned models.

    Args:
      weights: Optional non-negative weights ``[T]``, one per model (the model
        axis); they are normalised to sum to one.

    Returns:
      A leafwise :class:`fusionjax.Step` that reduces ``[T, ...] -> [...]``.
    """
    validation.check_weights(weights)
    return Step(
        "mean",
        _mean,
        reduces=True,
        flat=True,
        hparams={"weights": 1.0 if weights is None else weights},
        options={"uniform": weights is None},
        per_model=("weights",),
    )


def weighted_average(weights: ArrayLike) -> Step:
    r"""Weighted parameter average :math:`\theta = \sum_t w_t\theta_t / \sum_t w_t`.

    Args:
      weights: Non-negative weights ``[T]``, one per fine-tuned model.

    Returns:
      A merger for :func:`fusionjax.merge`.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(2)}
      >>> fts = [{"w": jnp.ones(2)}, {"w": 4 * jnp.ones(2)}]
      >>> fj.merge(base, fts, fj.merging.weighted_average(jnp.array([3.0, 1.0])))
      {'w': Array([1.75, 1.75], dtype=float32)}

    References:
      Wortsman et al, `Model soups <https://arxiv.org/abs/2203.05482>`_, ICML 2022
    """
    return mean(weights)


def uniform_soup() -> Step:
    r"""Uniform model soup: the plain average :math:`\frac1T\sum_t\theta_t`.

    Returns:
      A merger for :func:`fusionjax.merge`.

    References:
      Wortsman et al, `Model soups <https://arxiv.org/abs/2203.05482>`_, ICML 2022
    """
    return mean()


def task_arithmetic(*, scaling: ArrayLike = 0.3) -> Step:
    r"""Task arithmetic: :math:`\theta = \theta_0 + \lambda\sum_t\tau_t`.

    Args:
      scaling: :math:`\lambda`. The paper picks it on validation data from
        :math:`\{0, 0.05, \dots, 1\}`; 0.3 is the common default for 8 tasks.
        ``1/T`` gives the plain average.

    Returns:
      A merger for :func:`fusionjax.merge`.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(2)}
      >>> fts = [{"w": jnp.ones(2)}, {"w": -jnp.ones(2)}]
      >>> fj.merge(base, fts, fj.merging.task_arithmetic(scaling=1.0))
      {'w': Array([0., 0.], dtype=float32)}

    References:
      Ilharco et al, `Editing Models with Task Arithmetic
      <https://arxiv.org/abs/2212.04089>`_, ICLR 2023
    """
    return chain(sum(), scale(scaling))
