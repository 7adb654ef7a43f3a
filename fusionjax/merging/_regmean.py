r"""RegMean: merging linear layers by solving their merged regression problem."""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp

from fusionjax._src import validation
from fusionjax._src.base import MISSING
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Step
from fusionjax.merging._linear import sum_rows

keystr = jax.tree_util.keystr
_HIGHEST = jax.lax.Precision.HIGHEST


_MISSING = MISSING


@jax.jit
def _gram(x: jax.Array) -> jax.Array:
    x = x.reshape(-1, x.shape[-1]).astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.matmul(x.T, x, precision=_HIGHEST)


def gram_matrices(batches: Iterable[Any], *, normalize: bool = True) -> Any:
    r"""Accumulates the Gram matrices :math:`X^\top X` of layer inputs over batches.

    Every element of ``batches`` is a pytree (all with one structure) holding, at
    each linear layer, that layer's inputs in one batch, ``[..., d_in]`` (all
    leading axes are flattened into rows), and ``None`` elsewhere, such as the
    output of :func:`fusionjax.interop.capture_dense_inputs`. For every such leaf
    this returns

    .. math::
      G = \sum_b X_b^\top X_b

    over the batches :math:`b`, divided by the number of rows :math:`n` of that
    leaf when ``normalize`` is set. Products are taken in float32
    (at least) with ``Precision.HIGHEST`` by a jitted function. ``batches`` may
    be a generator, so the inputs of only one batch are held at a time.

    Args:
      batches: Iterable of captured-input pytrees, e.g.
        ``(capture_dense_inputs(model, v, xb) for xb in loader)``.
      normalize: Divide by the number of rows, as the reference implementation
        does, so every model's Gram is an average and models count equally in
        :func:`regmean`. ``False`` keeps the plain sum of the paper's formula,
        which weights models by how much data their Grams saw.

    Returns:
      A pytree of the same structure with a ``[d_in, d_in]`` float32 Gram matrix
      at every leaf that had inputs and ``None`` elsewhere. Stack one per model
      with :func:`fusionjax.stack` to get the ``grams`` of :func:`regmean`.

    Raises:
      ValueError: if ``batches`` is empty, the batches differ in structure or
        feature size, or a leaf is not an array of rank >= 1 (the path is named).

    Examples:
      >>> import jax.numpy as jnp
      >>> xs = [{"dense": {"kernel": jnp.ones((4, 3)), "bias": None}}] * 2
      >>> gram_matrices(xs, normalize=False)["dense"]["kernel"]
      Array([[8., 8., 8.],
             [8., 8., 8.],
             [8., 8., 8.]], dtype=float32)

    References:
      Jin et al, `Dataless Knowledge Fusion by Merging Weights of Language Models
      <https://arxiv.org/abs/2212.09849>`_, ICLR 2023
    """
    treedef, sums, rows = None, None, None
    for b, batch in enumerate(batches):
        flat, td = jax.tree_util.tree_flatten_with_path(batch)
        if treedef is None:
            treedef = td
            sums, rows = [None] * len(flat), [0] * len(flat)
        elif td != treedef:
            raise ValueError(
                f"batch {b} has a different tree structure from batch 0: {td} != {treedef}."
            )
        for i, (path, x) in enumerate(flat):
            x = jnp.asarray(x)
            if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.inexact):
                raise ValueError(
                    f"batch {b} at {keystr(path)}: expected floating-point inputs [..., d_in], "
                    f"got {x.dtype} array of shape {x.shape}."
                )
            if sums[i] is not None and sums[i].shape[0] != x.shape[-1]:
                raise ValueError(
                    f"batch {b} at {keystr(path)}: inputs have {x.shape[-1]} features, "
                    f"earlier batches had {sums[i].shape[0]}."
                )
            g = _gram(x)
            sums[i] = g if sums[i] is None else sums[i] + g
            rows[i] += math.prod(x.shape[:-1])
    if treedef is None:
        raise ValueError("batches is empty: gram_matrices needs at least one batch.")
    if normalize:
        sums = [s / jnp.asarray(max(r, 1), s.dtype) for s, r in zip(sums, rows, strict=False)]
    return treedef.unflatten(sums)


def _check_grams(g, x) -> tuple[jax.Array, int]:
    """Validates a stacked Gram leaf against a stacked kernel; returns it and ``d_in``."""
    t = x.shape[0]
    g = jnp.asarray(g)
    if x.ndim < 3:
        raise ValueError(
            f"grams has a value for a parameter of shape {x.shape[1:]}, but Gram matrices "
            "apply to kernels [d_in, d_out] only; put None there (it is averaged)."
        )
    if g.ndim != 3 or g.shape[1] != g.shape[2]:
        raise ValueError(
            f"grams must hold stacked square Gram matrices [T, d_in, d_in], got shape {g.shape}."
        )
    if g.shape[0] != t:
        raise ValueError(f"grams has {g.shape[0]} Gram matrices for {t} models (shape {g.shape}).")
    if not jnp.issubdtype(g.dtype, jnp.floating):
        raise TypeError(f"grams must be floating point, got dtype {g.dtype}.")
    kshape = x.shape[1:]
    m = g.shape[1]
    prefixes = [math.prod(kshape[:j]) for j in range(1, len(kshape))]
    if m not in prefixes:
        raise ValueError(
            f"grams has shape {g.shape}, which does not fit the kernel of shape {kshape}: "
            f"d_in must be the product of the kernel's leading dims, e.g. "
            f"({t}, {kshape[0]}, {kshape[0]})."
        )
    return g.astype(x.dtype), m


def _model_weights(weights, uniform, dtype):
    if uniform:
        return None
    w = weights.astype(dtype)
    return w / sum_rows(w)


def _average(x, w):
    t = x.shape[0]
    if w is None:
        return sum_rows(x) / jnp.asarray(t, x.dtype)
    return functools.reduce(operator.add, [w[i] * x[i] for i in range(t)])


def _regmean(x, *, grams, alpha, weights, uniform, **_):
    if grams is _MISSING:
        raise TypeError(
            "regmean needs the Gram matrices of the layer inputs: pass "
            "grams=fusionjax.stack([grams_0, ..., grams_T-1]) to fusionjax.merge "
            "(None at leaves without one), e.g. from fusionjax.interop.dense_grams."
        )
    t = x.shape[0]
    w = _model_weights(weights, uniform, x.dtype)
    if grams is None:
        return _average(x, w)
    g, m = _check_grams(grams, x)
    tau = x.reshape(t, m, -1)  # [T, d_in, d_out]
    eye = jnp.eye(m, dtype=x.dtype)
    a = alpha.astype(x.dtype)
    g = g * (a + (1 - a) * eye)[None]  # alpha * G + (1 - alpha) * diag(G)
    if w is not None:
        g = g * w[:, None, None]
    lhs = sum_rows(g)
    rhs = functools.reduce(
        operator.add, [jnp.matmul(g[i], tau[i], precision=_HIGHEST) for i in range(t)]
    )
    # Dead features (zero diagonal) decouple: give their rows the plain average.
    d = jnp.diagonal(lhs)
    live = d > 0
    s = jnp.where(live, jax.lax.rsqrt(jnp.where(live, d, 1)), 1)
    both = live[:, None] & live[None, :]
    lhs = jnp.where(both, s[:, None] * lhs * s[None, :], 0) + jnp.diag(
        jnp.where(live, 0, 1).astype(x.dtype)
    )
    rhs = jnp.where(live[:, None], s[:, None] * rhs, _average(tau, w))
    with jax.default_matmul_precision("highest"):
        y = jnp.linalg.solve(lhs, rhs)
    return (s[:, None] * y).reshape(x.shape[1:])


def regmean(*, alpha: ArrayLike = 0.9, weights: ArrayLike | None = None) -> Step:
    r"""RegMean: merge each linear layer by solving the merged regression problem.

    A linear layer :math:`y = xW` (flax's ``[d_in, d_out]`` kernel) of model
    :math:`t` saw inputs :math:`X_t`. RegMean picks the :math:`W` that best
    reproduces every model's outputs on its own inputs,
    :math:`\min_W \sum_t \lVert X_t W - X_t W_t\rVert^2`, whose solution is

    .. math::
      W^\star = \Big(\sum_t \tilde G_t\Big)^{-1} \sum_t \tilde G_t W_t, \qquad
      \tilde G_t = \alpha\,G_t + (1-\alpha)\,\mathrm{diag}(G_t), \qquad
      G_t = X_t^\top X_t .

    The off-diagonal shrinkage :math:`\alpha` regularises the problem
    (:math:`\alpha = 1` is the exact least-squares solution, :math:`\alpha = 0`
    a per-input-feature weighted average). :func:`fusionjax.merge` solves it in
    task-vector form, :math:`\tau^\star = (\sum_t\tilde G_t)^{-1}\sum_t\tilde G_t\tau_t`
    (the same model, as all models share the base), with
    :func:`jax.numpy.linalg.solve` (no explicit inverse) after a symmetric
    diagonal rescaling of the system, which leaves the solution unchanged but
    makes its conditioning independent of the input features' scales. Input
    features that are zero for every model (dead units) have no effect on any
    output; their kernel rows get the plain average. Parameters without a Gram
    matrix (biases, embeddings, norms) get the plain (weighted) average.

    The Gram matrices are a required extra argument of :func:`fusionjax.merge`:
    ``grams``, a pytree like the parameters (or a prefix of it) with stacked Grams
    ``[T, d_in, d_in]`` at every kernel to merge by regression and ``None``
    elsewhere, e.g. ``grams=fusionjax.stack([dense_grams(model, {"params": p}, x)
    for p, x in ...])`` (see :func:`fusionjax.interop.dense_grams` and
    :func:`gram_matrices`), in the order of ``finetuned``.

    Kernels with more than two dims (``DenseGeneral``, convolutions) are merged as
    the matrix ``[d_in, rest]``, reshaped in row-major order, where ``d_in`` (the
    Gram size) must be the product of the kernel's *leading* dims: e.g. a conv
    kernel ``[kh, kw, c_in, c_out]`` with Grams of its flattened
    ``(kh, kw, c_in)`` input patches (``d_in = kh*kw*c_in``), or a
    ``DenseGeneral`` kernel ``[d_in, heads, head_dim]`` with Grams of its
    ``d_in`` inputs. Anything else raises.

    Args:
      alpha: :math:`\alpha \in [0, 1]`, the factor on the off-diagonal entries of
        every Gram matrix. The reference implementation's
        ``regmean_reduce_nondiag``; its experiment configs use 0.1 (RoBERTa,
        DeBERTa, T5 on emotion/NER), 0.9 (one DeBERTa NER setting, and the demo
        notebook's suggestion for DeBERTa and T5) and 1 (DistilBERT GLUE).
        With :math:`\alpha < 1` the system is positive definite whenever each
        input feature is non-zero somewhere; with :math:`\alpha = 1` it may be
        singular (fewer rows than features, collinear features).
      weights: Optional non-negative model weights ``[T]``, multiplying each
        model's Gram (as the reference implementation's ``model_coeffs``) and
        weighting the average of the other parameters; uniform if ``None``.

    Returns:
      A leafwise :class:`fusionjax.Step` that reduces ``[T, ...] -> [...]`` and
      requires ``grams``.

    Raises:
      ValueError: (when built) ``alpha`` is outside :math:`[0, 1]`, or ``weights``
        are negative or all zero; (when merging) a Gram does not fit its kernel.
        :func:`fusionjax.merge` names the path.
      TypeError: (when merging) ``grams`` was not passed.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"kernel": jnp.zeros((2, 1)), "bias": jnp.zeros(1)}
      >>> fts = [{"kernel": jnp.array([[1.0], [0.0]]), "bias": jnp.ones(1)},
      ...        {"kernel": jnp.array([[0.0], [1.0]]), "bias": 3 * jnp.ones(1)}]
      >>> grams = {"kernel": jnp.stack([jnp.diag(jnp.array([3.0, 1.0])),
      ...                               jnp.diag(jnp.array([1.0, 3.0]))]), "bias": None}
      >>> fj.merge(base, fts, regmean(alpha=1.0), grams=grams)
      {'bias': Array([2.], dtype=float32), 'kernel': Array([[0.75],
             [0.75]], dtype=float32)}

    References:
      Jin et al, `Dataless Knowledge Fusion by Merging Weights of Language Models
      <https://arxiv.org/abs/2212.09849>`_, ICLR 2023
    """
    validation.check_hparam("alpha", alpha, lower=0.0, upper=1.0)
    validation.check_weights(weights)

    return Step(
        "regmean",
        _regmean,
        reduces=True,
        hparams={"alpha": alpha, "weights": 1.0 if weights is None else weights},
        options={"uniform": weights is None},
        per_model=("weights",),
        extras=("grams",),
    )

