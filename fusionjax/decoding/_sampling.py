r"""Choosing the next token from log-probabilities ``[B, V]``: greedy, temperature, top-k, top-p.

A :class:`SamplingConfig` is a pytree: its numbers are traced (a temperature sweep reuses
one compiled loop), while which filters are present (``None`` or not) is its structure. The
filters compose in the order of Holtzman et al.'s and Hugging Face's samplers:

1. temperature :math:`\tau`: :math:`z = \log p / \tau` (:math:`\tau = 0` is greedy);
2. top-k: keep the :math:`k` largest :math:`z` (ties broken towards the lower token id, as
   ``argmax`` does, so ``top_k=1`` is greedy for every key);
3. top-p (nucleus): keep the smallest set of the largest :math:`z` whose probability
   :math:`\mathrm{softmax}(z)` adds up to at least :math:`p` (the first token always stays);

then draw :math:`y \sim \mathrm{softmax}(z)` with ``jax.random.categorical``. Filtered
entries become :math:`-\infty`; inputs may hold :math:`-\infty` already (a fusion rule that
rules tokens out) and never produce NaN: a row that is all :math:`-\infty` yields token 0.
Top-k and top-p share one sort of the vocabulary per step.

References:
  Fan et al., `Hierarchical Neural Story Generation <https://arxiv.org/abs/1805.04833>`_,
  ACL 2018 (top-k); Holtzman et al., `The Curious Case of Neural Text Degeneration
  <https://arxiv.org/abs/1904.09751>`_, ICLR 2020 (top-p).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src.base import ArrayLike


class SamplingConfig(NamedTuple):
    r"""How to pick a token from log-probabilities: :func:`greedy` or :func:`sampling` make one.

    Attributes:
      temperature: ``None`` for greedy decoding (``argmax``), else :math:`\tau \ge 0`
        (``0`` is greedy too, chosen at run time).
      top_k: ``None``, or the number of most probable tokens kept (``>= 1``).
      top_p: ``None``, or the probability mass of the nucleus kept (in ``(0, 1]``).
    """

    temperature: ArrayLike | None = None
    top_k: ArrayLike | None = None
    top_p: ArrayLike | None = None

    @property
    def is_greedy(self) -> bool:
        """Whether no key is needed: greedy by structure (``temperature is None``)."""
        return self.temperature is None


def greedy() -> SamplingConfig:
    """Greedy decoding: the most probable token, no key needed.

    Returns:
      ``SamplingConfig(temperature=None)``.
    """
    return SamplingConfig()


def sampling(
    *,
    temperature: ArrayLike = 1.0,
    top_k: ArrayLike | None = None,
    top_p: ArrayLike | None = None,
) -> SamplingConfig:
    r"""Ancestral sampling at a temperature, optionally restricted to the top-k and/or top-p.

    Args:
      temperature: :math:`\tau \ge 0`; divides the log-probabilities (higher is more
        random, ``0`` is greedy).
      top_k: Keep only the ``top_k`` most probable tokens (``>= 1``); ``None`` keeps all.
      top_p: Keep the smallest set of most probable tokens with mass ``>= top_p``
        (``0 < top_p <= 1``); ``None`` keeps all.

    Returns:
      A :class:`SamplingConfig`.

    Raises:
      ValueError: If a Python-number setting is out of range (traced values are not checked).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fusionjax import decoding
      >>> log_probs = jnp.log(jnp.array([[0.1, 0.6, 0.3]]))
      >>> decoding.sample(jax.random.key(0), log_probs, decoding.sampling(top_k=1))
      Array([1], dtype=int32)
    """
    config = SamplingConfig(temperature, top_k, top_p)
    check_sampling(config)
    return config


def check_sampling(config: SamplingConfig, who: str = "sampling") -> None:
    """Raises ``ValueError`` for concrete settings out of range (traced ones pass).

    Args:
      config: The settings.
      who: Name of the argument, for the message.
    """
    if not isinstance(config, SamplingConfig):
        raise TypeError(
            f"{who} must be a SamplingConfig (decoding.greedy() or decoding.sampling(...)), "
            f"got {type(config).__name__}."
        )
    t, k, p = (_concrete(v) for v in config)
    if t is not None and not (np.ndim(t) == 0 and t >= 0):
        raise ValueError(f"{who}: temperature must be a scalar >= 0, got {t}.")
    if k is not None and not (np.ndim(k) == 0 and k >= 1 and float(k) == int(k)):
        raise ValueError(f"{who}: top_k must be an integer >= 1, got {k}.")
    if p is not None and not (np.ndim(p) == 0 and 0 < p <= 1):
        raise ValueError(f"{who}: top_p must be in (0, 1], got {p}.")
    if t is None and (config.top_k is not None or config.top_p is not None):
        raise ValueError(f"{who}: top_k/top_p need a temperature; greedy decoding ignores them.")


def _concrete(value):
    if value is None or isinstance(value, numbers.Number):
        return value
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def scale_by_temperature(log_probs: jax.Array, temperature: ArrayLike) -> jax.Array:
    r"""Logits :math:`\log p / \tau`; ``-inf`` stays ``-inf``; :math:`\tau = 0` returns the input.

    Args:
      log_probs: ``[..., V]`` log-probabilities (or logits).
      temperature: :math:`\tau \ge 0`, a scalar (or broadcastable to ``[..., 1]``).

    Returns:
      ``[..., V]`` scaled logits.
    """
    t = jnp.asarray(temperature, log_probs.dtype)
    safe = jnp.where(t > 0, t, jnp.ones_like(t))
    return log_probs / safe


def mask_top_k(logits: jax.Array, top_k: ArrayLike) -> jax.Array:
    """Sets all but the ``top_k`` largest entries of each row to ``-inf``.

    Exactly ``top_k`` entries stay (ties go to the lower index, as ``argmax``'s do).

    Args:
      logits: ``[B, V]``.
      top_k: ``k >= 1`` (traced values allowed).

    Returns:
      ``[B, V]`` logits.
    """
    return _filter(logits, top_k, None)


def mask_top_p(logits: jax.Array, top_p: ArrayLike) -> jax.Array:
    """Keeps each row's nucleus: the fewest largest entries with softmax mass ``>= top_p``.

    Args:
      logits: ``[B, V]``.
      top_p: ``0 < p <= 1`` (traced values allowed).

    Returns:
      ``[B, V]`` logits, ``-inf`` outside the nucleus.
    """
    return _filter(logits, None, top_p)


def _filter(logits, top_k, top_p):
    """Top-k then top-p over one stable sort of each row."""
    b, v = logits.shape
    order = jnp.argsort(-logits, axis=-1, stable=True)  # descending, ties by index
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    keep = jnp.ones((b, v), bool)
    if top_k is not None:
        keep = jnp.arange(v)[None, :] < jnp.asarray(top_k, jnp.int32)
        keep = jnp.broadcast_to(keep, (b, v))
        ranked = jnp.where(keep, ranked, -jnp.inf)
    if top_p is not None:
        probs = jax.nn.softmax(_finite_rows(ranked), axis=-1)
        probs = jnp.where(jnp.isneginf(ranked), jnp.zeros_like(probs), probs)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each entry
        keep = keep & (before < jnp.asarray(top_p, probs.dtype))
        keep = keep.at[:, 0].set(True)
    rows = jnp.arange(b)[:, None]
    keep_vocab = jnp.zeros((b, v), bool).at[rows, order].set(keep)
    return jnp.where(keep_vocab, logits, -jnp.inf)


def _finite_rows(z):
    """``z`` with all-``-inf`` rows replaced by zeros (so softmax of them is not NaN)."""
    dead = jnp.all(jnp.isneginf(z), axis=-1, keepdims=True)
    return jnp.where(dead, jnp.zeros_like(z), z)


def sample(key: jax.Array | None, log_probs: jax.Array, config: SamplingConfig) -> jax.Array:
    """Draws one token per row of ``log_probs [B, V]`` as ``config`` says.

    Args:
      key: A PRNG key; may be ``None`` only for :func:`greedy`.
      log_probs: ``[B, V]`` log-probabilities (``-inf`` allowed).
      config: From :func:`greedy` or :func:`sampling`.

    Returns:
      ``[B]`` int32 token ids.

    Raises:
      ValueError: If a key is needed and missing.
    """
    greedy_tokens = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    if config.is_greedy:
        return greedy_tokens
    if key is None:
        raise ValueError("sampling is random and needs a PRNG key, e.g. key=jax.random.key(0).")
    z = scale_by_temperature(log_probs, config.temperature)
    if config.top_k is not None or config.top_p is not None:
        z = _filter(z, config.top_k, config.top_p)
    drawn = jax.random.categorical(key, _finite_rows(z), axis=-1).astype(jnp.int32)
    drawn = jnp.where(jnp.all(jnp.isneginf(z), axis=-1), jnp.zeros_like(drawn), drawn)
    return jnp.where(jnp.asarray(config.temperature) > 0, drawn, greedy_tokens)
