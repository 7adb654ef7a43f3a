r"""The interface a decoder offers the fused loop, and adapters for flax linen and nnx.

A :class:`DecoderModel` is two pure functions:

* ``apply(params, tokens [B, L], cache, positions [B, L]) -> (logits [B, L, V], cache)``:
  the logits of ``tokens`` at ``positions`` given the keys and values already in ``cache``,
  and the cache with the new ones written at ``positions``. A position of ``-1`` marks a
  left pad: it is neither written nor attended to, and its logits are meaningless.
* ``init_cache(batch_size, length) -> cache``: an empty cache for ``batch_size`` rows of
  positions ``0 .. length - 1``, made without parameters (so the loop allocates it inside
  ``jax.jit``).

Nothing else is assumed: the cache is any pytree, ``params`` any pytree (a stacked group of
experts gives every leaf a leading ``[E]`` axis and is run by ``jax.vmap``), and the model
may be linen, nnx, equinox or hand-written. :func:`from_linen` and :func:`from_nnx` cover the
two flax APIs; :attr:`DecoderModel.max_length` (``None``: unknown) lets
:func:`fusionjax.decoding.generate` refuse a prompt that would run past the model's
positions before anything is computed.

Wrapping a gemma- or t5x-style sampler's transformer
----------------------------------------------------
Those samplers keep the transformer apart from the sampling loop, so only the transformer
is wrapped; the sampler itself is replaced by :func:`fusionjax.decoding.generate`.

**gemma** (``gemma/transformer.py``, linen ``Transformer``):
``logits, cache = transformer.apply({"params": p}, tokens, positions, cache, mask)``
with ``mask [B, L, S]`` over cache *slots*, and ``config.init_cache(batch_size, dtype,
cache_length=S)``. gemma writes each call at the cache's ``end_index`` (one counter for
the whole batch), so a left pad occupies a slot; the wrapper keeps which slots hold real
tokens next to gemma's cache and turns the loop's ``-1`` positions into that mask::

    def init_cache(batch_size, length):
        return {"kv": config.init_cache(batch_size, jnp.float32, cache_length=length),
                "real": jnp.zeros((batch_size, length), bool)}

    def apply(params, tokens, cache, positions):
        start = cache["kv"]["layer_0"]["end_index"][0]       # slots used so far
        real = jax.lax.dynamic_update_slice(cache["real"], positions >= 0, (0, start))
        slots = start + jnp.arange(tokens.shape[1])
        causal = jnp.arange(real.shape[1])[None, :] <= slots[:, None]   # [L, S]
        mask = real[:, None, :] & causal[None]                          # [B, L, S]
        logits, kv = transformer.apply({"params": params}, tokens,
                                       jnp.maximum(positions, 0), cache["kv"], mask)
        return logits, {"kv": kv, "real": real}

    gemma = DecoderModel(apply, init_cache, max_length=None)

The loop sizes caches as ``prompt length + max_new_tokens`` slots, which is exactly what
this wrapper uses (pads included).

**t5x** (``DecoderOnlyModel`` over a ``network.DecoderWrapper``): the cache is the flax
``"cache"`` collection, made once with ``module.init(..., decode=True)`` at the cache
length (its ``"cache"`` entry, zeros), and a decoding call takes one token::

    def apply(params, tokens, cache, positions):
        def one(cache, column):                    # prefill feeds the prompt token by token
            logits, new = module.apply({"params": params, "cache": cache}, column[:, None],
                                       column[:, None], decode=True, enable_dropout=False,
                                       mutable=["cache"])
            return new["cache"], logits[:, 0]
        cache, logits = jax.lax.scan(one, cache, tokens.T)
        return jnp.moveaxis(logits, 0, 1), cache

t5x's cache index is one counter for the batch and its decode step attends to every slot
below it: ``positions`` are ignored and pads would be attended, so give every row of a
t5x member the same prompt length (members may still differ from one another).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax

Cache = Any
"""Any pytree of arrays: a model's keys and values."""


class DecoderModel(NamedTuple):
    """A causal language model as two pure functions (see the module docstring).

    Attributes:
      apply: ``apply(params, tokens [B, L], cache, positions [B, L]) -> (logits [B, L, V],
        cache)``; ``-1`` positions are left pads.
      init_cache: ``init_cache(batch_size, length) -> cache`` for positions
        ``0 .. length - 1``, without parameters.
      max_length: The largest number of positions the model supports, or ``None`` if
        unknown; :func:`fusionjax.decoding.generate` checks prompts against it.
    """

    apply: Callable[[Any, jax.Array, Cache, jax.Array], tuple[jax.Array, Cache]]
    init_cache: Callable[[int, int], Cache]
    max_length: int | None = None


def from_linen(
    module: Any,
    method: str = "decode",
    *,
    init_cache: Callable[[int, int], Cache] | None = None,
    max_length: int | None = None,
) -> DecoderModel:
    """A :class:`DecoderModel` for a flax linen module with a functional cache.

    ``module.apply(variables, tokens, positions, cache, method=method)`` must return
    ``(logits, cache)``, as :class:`fusionjax.zoo.Decoder` does; ``params`` passed to the
    model's ``apply`` are the *variables* ``module.init`` returns (``{"params": ...}``).

    Args:
      module: The linen module (unbound).
      method: Name of the decoding method.
      init_cache: ``(batch_size, length) -> cache``; ``module.init_cache`` by default.
      max_length: Positions the model supports; ``module.max_length`` if it has one.

    Returns:
      The :class:`DecoderModel`.

    Raises:
      TypeError: If ``module`` has no ``method`` or no ``init_cache`` is given or found.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fusionjax import decoding, zoo
      >>> lm = zoo.Decoder(vocab_size=16, dim=16, depth=1, heads=2, max_length=8)
      >>> variables = jax.jit(lm.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
      >>> model = decoding.from_linen(lm)
      >>> tokens = jnp.array([[1, 2, 3]])
      >>> logits, cache = jax.jit(model.apply)(variables, tokens, model.init_cache(1, 8),
      ...                                      jnp.array([[0, 1, 2]]))
      >>> logits.shape
      (1, 3, 16)
    """
    if not callable(getattr(module, method, None)):
        raise TypeError(f"from_linen: {type(module).__name__} has no method {method!r}.")
    if init_cache is None:
        init_cache = getattr(module, "init_cache", None)
        if not callable(init_cache):
            raise TypeError(
                f"from_linen: {type(module).__name__} has no init_cache; pass "
                "init_cache=lambda batch_size, length: ..."
            )
    if max_length is None:
        max_length = getattr(module, "max_length", None)

    def apply(variables, tokens, cache, positions):
        return module.apply(variables, tokens, positions, cache, method=method)

    return DecoderModel(apply, init_cache, max_length)


def from_nnx(
    model: Any,
    method: str = "__call__",
    *,
    init_cache: Callable[[int, int], Cache] | None = None,
    max_length: int | None = None,
) -> tuple[DecoderModel, Any]:
    """A :class:`DecoderModel` and its parameters for a flax nnx model with a functional cache.

    ``getattr(model, method)(tokens, positions, cache)`` must return ``(logits, cache)``.
    The model is split once, ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``:
    ``params`` (an ``nnx.State`` of the ``nnx.Param`` variables) is what the loop passes
    around, stacks for a group of experts (:func:`fusionjax.stack` of several models'
    ``params``, all split from models of one graph) and shards; ``graphdef`` and ``rest``
    (any other state: batch statistics, RNG counters) are closed over as constants, so the
    decoder sees a snapshot of them and whatever the call writes to them is dropped.
    ``apply`` rebuilds the model with ``nnx.merge(graphdef, params, rest)`` inside the
    traced function, which costs nothing at run time.

    Args:
      model: The nnx model.
      method: Name of the method taking ``(tokens, positions, cache)``.
      init_cache: ``(batch_size, length) -> cache``; ``model.init_cache`` by default.
      max_length: Positions the model supports; ``model.max_length`` if it has one.

    Returns:
      ``(decoder_model, params)``.

    Raises:
      TypeError: If ``model`` has no ``method`` or no ``init_cache`` is given or found.
    """
    from flax import nnx

    if not callable(getattr(model, method, None)):
        raise TypeError(f"from_nnx: {type(model).__name__} has no method {method!r}.")
    if init_cache is None:
        init_cache = getattr(model, "init_cache", None)
        if not callable(init_cache):
            raise TypeError(
                f"from_nnx: {type(model).__name__} has no init_cache; pass "
                "init_cache=lambda batch_size, length: ..."
            )
    if max_length is None:
        max_length = getattr(model, "max_length", None)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply(params, tokens, cache, positions):
        return getattr(nnx.merge(graphdef, params, rest), method)(tokens, positions, cache)

    return DecoderModel(apply, init_cache, max_length), params
