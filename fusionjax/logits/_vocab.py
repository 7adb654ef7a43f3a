r"""Vocabulary-size mismatches, handled explicitly: pad with ``-inf`` or truncate.

Models of one family often differ in vocabulary size only by padding rows of the
embedding (a 32000-token model padded to 32064) or by a few added special tokens at
the end. Nothing here guesses: :func:`match_vocab` brings one array to a given size
in the direction its ``mode`` names, and :func:`stack_logits` stacks a list of
``[..., V_i]`` logits into ``[M, ..., V]`` — with differing :math:`V_i` only when a
``mode`` says how. A padded token gets ``-inf`` (probability 0), which every
combiner in :mod:`fusionjax.logits` treats as a masked token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from fusionjax._src.base import ArrayLike
from fusionjax.logits import _checks

Mode = Literal["truncate", "pad"]
_MODES = ("truncate", "pad")


def match_vocab(logits: ArrayLike, size: int, *, mode: Mode) -> jax.Array:
    r"""Brings logits ``[..., V]`` to ``[..., size]`` by truncating or padding with ``-inf``.

    Args:
      logits: ``[..., V]`` logits or log-probabilities.
      size: The vocabulary size wanted; a positive Python int.
      mode: ``"truncate"`` keeps the first ``size`` tokens (needs ``V >= size``);
        ``"pad"`` appends ``size - V`` tokens with logit ``-inf`` (needs ``V <= size``).

    Returns:
      ``[..., size]`` logits (float32 or wider). Padded tokens are ``-inf``, so they get
      probability 0 and stay masked through every function of this package.

    Raises:
      ValueError: If ``mode`` is unknown, or asks for the wrong direction (padding a
        larger vocabulary down, truncating a smaller one up).

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> fj.logits.match_vocab(jnp.array([1.0, 2.0]), 3, mode="pad")
      Array([  1.,   2., -inf], dtype=float32)
      >>> fj.logits.match_vocab(jnp.array([1.0, 2.0, 3.0]), 2, mode="truncate")
      Array([1., 2.], dtype=float32)
    """
    x = _checks.as_logits(logits, "logits")
    if mode not in _MODES:
        raise ValueError(f"mode must be 'truncate' or 'pad', got {mode!r}.")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive Python int, got {size!r}.")
    v = x.shape[-1]
    if v == size:
        return x
    if mode == "truncate":
        if v < size:
            raise ValueError(
                f"mode='truncate' cannot grow the vocabulary from {v} to {size}; use mode='pad'."
            )
        return x[..., :size]
    if v > size:
        raise ValueError(
            f"mode='pad' cannot shrink the vocabulary from {v} to {size}; use mode='truncate'."
        )
    pad = jnp.full(x.shape[:-1] + (size - v,), -jnp.inf, x.dtype)
    return jnp.concatenate([x, pad], axis=-1)


def stack_logits(
    logits: Sequence[ArrayLike], *, mode: Mode | None = None, name: str = "logits"
) -> jax.Array:
    r"""Stacks :math:`M` models' logits ``[..., V_i]`` into ``[M, ..., V]``.

    With ``mode=None`` every :math:`V_i` must be equal; ``"truncate"`` cuts every
    model to :math:`\min_i V_i` tokens, ``"pad"`` extends every model to
    :math:`\max_i V_i` with ``-inf`` (see :func:`match_vocab`).

    Args:
      logits: A non-empty list or tuple of arrays ``[..., V_i]`` with the same batch shape.
      mode: ``None`` (sizes must agree), ``"truncate"`` or ``"pad"``.
      name: How the list is named in error messages.

    Returns:
      ``[M, ..., V]`` logits in float32 (float64 if any input is float64).

    Raises:
      ValueError: If the list is empty, batch shapes differ, or vocabulary sizes differ
        and ``mode`` is ``None``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> fj.logits.stack_logits([jnp.zeros(2), jnp.ones(3)], mode="pad").shape
      (2, 3)
    """
    if not isinstance(logits, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of arrays, got {type(logits).__name__}.")
    if len(logits) == 0:
        raise ValueError(f"{name} is empty: at least one model's logits are needed.")
    arrays = [_checks.as_logits(x, f"{name}[{i}]") for i, x in enumerate(logits)]
    batch = arrays[0].shape[:-1]
    for i, x in enumerate(arrays):
        if x.shape[:-1] != batch:
            raise ValueError(
                f"{name}[{i}] has batch shape {x.shape[:-1]}, but {name}[0] has {batch}: every "
                "model must score the same positions."
            )
    sizes = [x.shape[-1] for x in arrays]
    if mode is None and len(set(sizes)) > 1:
        raise ValueError(
            f"{name} have different vocabulary sizes {sizes}; pass mode='truncate' (keep the "
            f"first {min(sizes)} tokens) or mode='pad' (pad to {max(sizes)} with -inf)."
        )
    if mode is not None and mode not in _MODES:
        raise ValueError(f"mode must be None, 'truncate' or 'pad', got {mode!r}.")
    size = min(sizes) if mode == "truncate" else max(sizes)
    dtype = jnp.float64 if any(x.dtype == jnp.float64 for x in arrays) else jnp.float32
    arrays = [match_vocab(x, size, mode=mode or "pad").astype(dtype) for x in arrays]
    return jnp.stack(arrays)


def as_stacked(logits, name: str = "logits") -> jax.Array:
    """Stacked ``[M, ..., V]`` logits from an array or a list of equal-``V`` arrays."""
    if isinstance(logits, (list, tuple)):
        return stack_logits(logits, name=name)
    return _checks.as_logits(logits, name, min_ndim=2)
