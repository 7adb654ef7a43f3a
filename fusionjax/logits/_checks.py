"""Shape and dtype checks shared by the logit-fusion functions (static facts only).

Every check reads shapes and dtypes, never traced values, so the functions stay
jit-able; messages name the argument and say what was expected and what came.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike


def as_logits(x: ArrayLike, name: str, *, min_ndim: int = 1) -> jax.Array:
    """``x`` as a floating-point array of at least ``min_ndim`` axes, in the compute dtype."""
    if isinstance(x, (list, tuple)):
        raise TypeError(
            f"{name} must be an array, got a {type(x).__name__}; stack a list of logits with "
            "fusionjax.logits.stack_logits first."
        )
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got {dtype}.")
    x = jnp.asarray(x)
    if x.ndim < min_ndim:
        layout = "[M, ..., V]" if min_ndim > 1 else "[..., V]"
        raise ValueError(
            f"{name} must have at least {min_ndim} axes ({layout}), got shape {x.shape}."
        )
    return x.astype(validation.compute_dtype(x.dtype))


def same_shape(x: jax.Array, name: str, ref: jax.Array, ref_name: str) -> None:
    """Raises ``ValueError`` unless ``x`` has the shape of ``ref``."""
    if x.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name}, {ref.shape}, got {x.shape}. Logits of "
            "different vocabulary sizes go through fusionjax.logits.match_vocab first."
        )


def model_weights(weights: Any, logits: jax.Array, *, name: str = "weights") -> jax.Array:
    """Weights ``[M]`` or ``[M, ...]`` for stacked ``logits [M, ..., V]``, as ``[M, ..., 1]``.

    ``None`` means equal weights. Only the two documented shapes are accepted:
    one weight per model (``[M]``) or one per model and example (``logits.shape[:-1]``).
    """
    m, batch = logits.shape[0], logits.shape[1:-1]
    if weights is None:
        return jnp.ones((m,) + (1,) * (len(batch) + 1), logits.dtype)
    dtype = jnp.result_type(weights)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise TypeError(f"{name} must be real numbers, got {dtype}.")
    w = jnp.asarray(weights).astype(logits.dtype)
    if w.shape == (m,):
        return w.reshape((m,) + (1,) * (len(batch) + 1))
    if w.shape == (m, *batch):
        return w[..., None]
    raise ValueError(
        f"{name} must have shape [M] = {(m,)} (one per model) or [M, ...] = {(m, *batch)} "
        f"(one per model and example) for logits of shape {logits.shape}, got {w.shape}."
    )


def vocab_mask(where: Any, shape: tuple[int, ...], *, name: str = "where") -> jax.Array | None:
    """A boolean vocabulary mask of shape ``[V]`` or ``shape`` (``[..., V]``), or ``None``."""
    if where is None:
        return None
    w = jnp.asarray(where)
    if w.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean mask (True = allowed token), got {w.dtype}.")
    if w.shape == shape[-1:] or w.shape == tuple(shape):
        return w
    raise ValueError(
        f"{name} must have shape [V] = {shape[-1:]} or [..., V] = {tuple(shape)}, got {w.shape}."
    )


def per_example(value: Any, batch: tuple[int, ...], name: str, dtype) -> jax.Array:
    """A scalar or a ``[...]`` per-example value, returned broadcastable against ``[..., V]``."""
    v = jnp.asarray(value)
    if not (jnp.issubdtype(v.dtype, jnp.floating) or jnp.issubdtype(v.dtype, jnp.integer)):
        raise TypeError(f"{name} must be real numbers, got {v.dtype}.")
    v = v.astype(dtype)
    if v.shape == ():
        return v
    if v.shape == tuple(batch):
        return v[..., None]
    raise ValueError(
        f"{name} must be a scalar or have the batch shape [...] = {tuple(batch)} (one per "
        f"example), got {v.shape}."
    )


def apply_mask(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    """``x`` with ``-inf`` where ``mask`` is False (``mask`` broadcasts over leading axes)."""
    if mask is None:
        return x
    return jnp.where(mask, x, -jnp.inf)


def masked_difference(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""``a - b`` for log-probabilities that may hold ``-inf``, and the tokens it masks.

    Where both are ``-inf`` the difference is 0 (neither model has evidence); where
    exactly one is, the difference is set to 0 and the token is reported in the mask
    (the caller masks it: one model rules the token out). Never NaN or ``inf``.

    Returns:
      ``(difference, masked)``: a finite array and a boolean array of the same shape.
    """
    na, nb = jnp.isneginf(a), jnp.isneginf(b)
    diff = jnp.where(na | nb, 0.0, a - b).astype(a.dtype)
    return diff, na != nb


def log_softmax(x: jax.Array) -> jax.Array:
    """``log_softmax`` over the last axis (``-inf`` entries stay ``-inf``)."""
    return jax.nn.log_softmax(x, axis=-1)
