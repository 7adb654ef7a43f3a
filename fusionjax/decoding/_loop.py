r"""Fused decoding: several language models, one token stream, one compiled loop.

Logit-fusion methods decode from a combination of models' next-token distributions:
proxy-tuning adds a small tuned expert's shift to a large model,
:math:`\log p \propto s_t + \alpha(\log p_{e}(\cdot) - \log p_{b}(\cdot))` (Liu et al.,
2024); DExperts, contrastive decoding and Dynamic Logit Fusion (with a per-step
:math:`\alpha_t`) are other rules of the same kind. :func:`generate` runs any such rule:

* **members** (:class:`Member`): each model has its own architecture, parameters, KV cache
  and *own prompt* (proxy-tuning's expert sees a chat-formatted prompt, the base does not),
  left-padded per member with ``prompt_lengths`` (pads get position ``-1``). Every sampled
  token is appended to every member's stream at that member's next position.
* **stacked groups**: experts of one architecture are one member with ``stacked=True``,
  params with a leading ``[E]`` axis; one ``jax.vmap`` runs the group, and the fusion rule
  receives its logits as ``[E, B, V]``. :func:`fusionjax.decoding.generate_sharded` splits
  the group over devices.
* **fuse**: ``fuse(logits, *fuse_args)`` gets the list of members' next-token logits (in
  member order) and returns log-probabilities ``[B, V]``, or ``(log_probs, aux)``; every leaf
  of ``aux`` (``[B, ...]``, e.g. Dynamic Logit Fusion's :math:`\alpha`) is recorded per step
  and returned as ``[B, N, ...]``. ``fuse_args`` are traced, so a sweep over
  :math:`\alpha` compiles once.

What costs time, and what is done about it
------------------------------------------
The whole of a call — cache allocation, each member's prefill, then ``max_new_tokens - 1``
steps of (all members' forwards on one token, ``fuse``, sampling) — is one ``jax.jit``
program: a ``lax.while_loop`` that also stops as soon as every row has produced a stop
token. A Python loop around jitted forwards pays a dispatch per model and per op of the
rule every step, and a host sync per step to test for the end;
``benchmarks/fused_decoding.py`` measures the difference.

*while_loop, not scan*: generations end early when every row has stopped (a scan always
runs ``max_new_tokens`` steps); the per-step outputs go into preallocated ``[B, N]``
buffers updated in place, so nothing is lost against ``scan``'s stacked outputs. (Reverse-
mode differentiation through the loop is not a goal of decoding.)

*Donation*: the caches are allocated *inside* the compiled program (``init_cache`` needs no
parameters) and carried by the ``while_loop``, whose carried buffers XLA updates in place;
there is no cache crossing the ``jit`` boundary, so nothing to donate and no second copy
to free. Donation matters when caches do cross a boundary every step — a Python loop
around a jitted step, as in the benchmark's baseline, which donates them
(``donate_argnums``) so each step writes the cache in place instead of allocating a new one.

Validation happens before anything runs: Python-level arguments (batch sizes, prompt
lengths against the cache and the model's ``max_length``, sampler settings, stop tokens)
in :func:`generate`, and shape facts only known by tracing (vocabulary sizes, what ``fuse``
returns) while the program is traced, each with the argument's name in the message.

References:
  Liu et al., `Tuning Language Models by Proxy <https://arxiv.org/abs/2401.08565>`_, COLM
  2024; Liu et al., `DExperts <https://arxiv.org/abs/2105.03023>`_, ACL 2021; Li et al.,
  `Contrastive Decoding <https://arxiv.org/abs/2210.15097>`_, ACL 2023; Fan et al., `On
  Giant's Shoulders: Effortless Weak to Strong by Dynamic Logits Fusion
  <https://arxiv.org/abs/2406.15480>`_, NeurIPS 2024.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax.decoding._model import DecoderModel
from fusionjax.decoding._sampling import SamplingConfig
from fusionjax.decoding._sampling import check_sampling
from fusionjax.decoding._sampling import greedy
from fusionjax.decoding._sampling import sample

FuseFn = Callable[..., Any]
"""``fuse(logits: list[[B, V] or [E, B, V]], *fuse_args) -> log_probs [B, V] | (log_probs,
aux)``."""


class Member(NamedTuple):
    """One model (or a stacked group of same-architecture experts) taking part in decoding.

    Attributes:
      model: Its :class:`fusionjax.decoding.DecoderModel`.
      params: Its parameters; with ``stacked=True`` every leaf has a leading ``[E]`` axis.
      prompt: ``[B, P]`` integer token ids, left-padded (a stacked group shares it).
      prompt_lengths: ``[B]`` real tokens per row (the last ``prompt_lengths[b]`` entries of
        row ``b``; at least 1); ``None`` means ``P`` for every row.
      stacked: Whether ``params`` hold ``E`` experts run by one ``jax.vmap``; the fusion
        rule then receives this member's logits as ``[E, B, V]``.
    """

    model: DecoderModel
    params: Params
    prompt: ArrayLike
    prompt_lengths: ArrayLike | None = None
    stacked: bool = False


class GenerateOutput(NamedTuple):
    """What :func:`generate` returns; a pytree of arrays, so it crosses ``jax.jit``.

    Attributes:
      tokens: ``[B, N]`` int32 continuation (``N = max_new_tokens``); after a row's stop
        token, and in steps never run, ``pad_token``.
      lengths: ``[B]`` int32 tokens generated per row, the stop token included.
      stopped: ``[B]`` bool, whether the row ended with a stop token.
      token_log_probs: ``[B, N]`` fused log-probability of each chosen token (``0`` after
        the end).
      aux: The rule's auxiliary output with every leaf ``[B, N, ...]`` (zeros after the
        end), or ``None`` if ``fuse`` returns log-probabilities only.
      steps: Scalar int32, the steps run (``< N`` if every row stopped early).
    """

    tokens: jax.Array
    lengths: jax.Array
    stopped: jax.Array
    token_log_probs: jax.Array
    aux: Any
    steps: jax.Array


class _Static(NamedTuple):
    model: DecoderModel
    stacked: bool
    cache_length: int


def generate(
    members: Sequence[Member],
    fuse: FuseFn,
    *,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    key: jax.Array | None = None,
    stop_tokens: Sequence[int] = (),
    pad_token: int = 0,
    fuse_args: tuple = (),
    cache_lengths: Sequence[int] | None = None,
    _placement: Any = None,
) -> GenerateOutput:
    r"""Decodes one continuation from the fused next-token distribution of several models.

    Each step, every member reads the last chosen token at its own next position, ``fuse``
    turns the members' next-token logits into log-probabilities :math:`\log p_t` ``[B, V]``,
    and a token is chosen from them (``sampling``). The first token comes from the members'
    prefills of their own prompts. Jitted end to end (one compile per shapes, rule and
    sampler structure); callable inside ``jax.jit`` too.

    Args:
      members: The models, in the order ``fuse`` receives their logits.
      fuse: ``fuse(logits, *fuse_args)``, ``logits[m]`` being ``[B, V_m]`` (``[E, B, V_m]``
        for a stacked member), returning ``log_probs [B, V]`` or ``(log_probs, aux)`` with
        ``aux`` a pytree of ``[B, ...]`` arrays. Hashable (a function, not a fresh lambda
        per call, to reuse the compiled program).
      max_new_tokens: ``N``, the most tokens generated per row.
      sampling: :func:`fusionjax.decoding.greedy` (default) or
        :func:`fusionjax.decoding.sampling`.
      key: PRNG key; required unless decoding greedily. Step ``i`` draws with
        ``jax.random.fold_in(key, i)``.
      stop_tokens: Token ids that end a row (kept in the output, counted in ``lengths``).
      pad_token: Id written after a row has ended.
      fuse_args: Extra (traced) arguments for ``fuse``, e.g. a fusion weight.
      cache_lengths: Cache slots per member; by default ``P_m + N - 1``, exactly the
        positions a prompt of ``P_m`` tokens and ``N`` new tokens use.
      _placement: Private; set by :func:`fusionjax.decoding.generate_sharded`.

    Returns:
      A :class:`GenerateOutput`.

    Raises:
      ValueError: If members disagree on the batch size, a prompt does not fit its cache or
        its model's ``max_length``, sampler settings are out of range, vocabulary sizes
        differ and ``fuse`` fails on them, or ``fuse`` returns the wrong shape; the
        message names the argument.
      TypeError: If an argument has the wrong type (e.g. a float prompt).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from fusionjax import decoding, zoo
      >>> lm = zoo.Decoder(vocab_size=16, dim=16, depth=1, heads=2, max_length=16)
      >>> variables = jax.jit(lm.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
      >>> member = decoding.Member(decoding.from_linen(lm), variables, jnp.array([[3, 1, 4]]))
      >>> out = decoding.generate([member], lambda logits: jax.nn.log_softmax(logits[0]),
      ...                         max_new_tokens=5)
      >>> out.tokens.shape, out.lengths
      ((1, 5), Array([5], dtype=int32))
    """
    sampling = greedy() if sampling is None else sampling
    check_sampling(sampling, "sampling")
    if not sampling.is_greedy and key is None:
        raise ValueError("generate: sampling is random and needs key=, e.g. jax.random.key(0).")
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    if not callable(fuse):
        raise TypeError(f"generate: fuse must be callable, got {type(fuse).__name__}.")
    stop_tokens = tuple(stop_tokens)
    if not all(isinstance(t, numbers.Integral) for t in (*stop_tokens, pad_token)):
        raise TypeError(
            f"generate: stop_tokens and pad_token must be ints, got {stop_tokens}, {pad_token!r}."
        )
    members = list(members)
    if not members:
        raise ValueError("generate: members is empty.")
    if cache_lengths is not None and len(cache_lengths) != len(members):
        raise ValueError(
            f"generate: cache_lengths has {len(cache_lengths)} entries for {len(members)} members."
        )
    statics, dynamic, batch = [], [], None
    for i, m in enumerate(members):
        if not isinstance(m, Member) or not isinstance(m.model, DecoderModel):
            raise TypeError(f"members[{i}] must be a Member(DecoderModel, params, prompt, ...).")
        prompt = jnp.asarray(m.prompt)
        if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
            raise TypeError(
                f"members[{i}].prompt must be [B, P] integer token ids, got "
                f"{prompt.dtype}{list(prompt.shape)}."
            )
        b, p = prompt.shape
        if batch is None:
            batch = b
        elif b != batch:
            raise ValueError(
                f"members[{i}].prompt has batch size {b}, but members[0].prompt has {batch}."
            )
        lengths = _check_lengths(m.prompt_lengths, b, p, i)
        if m.stacked:
            _check_stacked(m.params, i)
        needed = p + max_new_tokens - 1
        size = needed if cache_lengths is None else int(cache_lengths[i])
        if needed > size:
            raise ValueError(
                f"members[{i}].prompt has {p} tokens; with max_new_tokens={max_new_tokens} it "
                f"needs {needed} cache slots, but cache_lengths[{i}]={size}."
            )
        limit = m.model.max_length
        if limit is not None and size > limit:
            raise ValueError(
                f"members[{i}].prompt has {p} tokens; with max_new_tokens={max_new_tokens} it "
                f"needs {size} positions, more than its model's max_length={limit}."
            )
        statics.append(_Static(m.model, bool(m.stacked), size))
        dynamic.append((m.params, prompt.astype(jnp.int32), lengths))
    return _generate(
        tuple(dynamic),
        key,
        sampling,
        tuple(fuse_args),
        jnp.asarray(stop_tokens, jnp.int32).reshape(len(stop_tokens)),
        jnp.asarray(pad_token, jnp.int32),
        statics=tuple(statics),
        fuse=fuse,
        max_new_tokens=int(max_new_tokens),
        placement=_placement,
    )


def _check_lengths(lengths, b, p, i):
    if lengths is None:
        return jnp.full((b,), p, jnp.int32)
    arr = jnp.asarray(lengths)
    if arr.shape != (b,) or not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(
            f"members[{i}].prompt_lengths must be [B] = [{b}] integers, got "
            f"{arr.dtype}{list(arr.shape)}."
        )
    try:
        host = np.asarray(arr)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        host = None  # traced inside the caller's jit: not checked
    if host is not None and (host.min() < 1 or host.max() > p):
        raise ValueError(
            f"members[{i}].prompt_lengths must be in 1..{p} (the prompt's width), got "
            f"{host.tolist()}."
        )
    return arr.astype(jnp.int32)


def _check_stacked(params, i):
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    if not leaves:
        raise ValueError(f"members[{i}].params is stacked=True but has no leaves.")
    sizes = {jax.tree_util.keystr(p): (np.shape(x)[0] if np.ndim(x) else None) for p, x in leaves}
    first_path, first = next(iter(sizes.items()))
    for path, e in sizes.items():
        if e is None or e != first:
            raise ValueError(
                f"members[{i}].params is stacked=True, but leaf {path} has leading axis "
                f"{e} and {first_path} has {first}."
            )


def _prefill_positions(lengths, p):
    """``[B, P]`` positions of a left-padded prompt: ``-1`` for pads, then ``0 .. len-1``."""
    pos = jnp.arange(p, dtype=jnp.int32)[None, :] - (p - lengths)[:, None]
    return jnp.where(pos >= 0, pos, -1)


def _vmapped_last(apply, params, tokens, cache, positions):
    logits, cache = jax.vmap(apply, in_axes=(0, None, 0, None))(params, tokens, cache, positions)
    return logits[..., -1, :], cache


def _init_cache(static, params, batch, placement):
    cache = static.model.init_cache(batch, static.cache_length)
    if not static.stacked:
        return cache
    e = jax.tree.leaves(params)[0].shape[0]
    cache = jax.tree.map(lambda x: jnp.broadcast_to(x, (e, *x.shape)), cache)
    return cache if placement is None else placement.place(cache)


def _forward(static, params, tokens, cache, positions, placement):
    """Next-token logits ``[B, V]`` (``[E, B, V]`` stacked) at the last column, and the cache."""
    if not static.stacked:
        logits, cache = static.model.apply(params, tokens, cache, positions)
        return logits[:, -1, :], cache
    if placement is None:
        return _vmapped_last(static.model.apply, params, tokens, cache, positions)
    apply = static.model.apply
    return placement.apply_group(_vmapped_last, apply, params, tokens, cache, positions)


def _call_fuse(fuse, logits, fuse_args, batch, statics):
    vocabs = [x.shape[-1] for x in logits]
    try:
        out = fuse(list(logits), *fuse_args)
    except Exception as e:
        if len(set(vocabs)) > 1:
            raise ValueError(
                f"generate: members have vocabulary sizes {vocabs} and fuse failed on them "
                f"({type(e).__name__}: {e}); map them to one vocabulary in fuse, or use "
                "models that share one."
            ) from e
        raise
    if isinstance(out, tuple) and len(out) != 2:
        raise ValueError(
            f"generate: fuse must return log_probs or (log_probs, aux), got a tuple of {len(out)}."
        )
    log_probs, aux = out if isinstance(out, tuple) else (out, None)
    if np.ndim(log_probs) != 2 or np.shape(log_probs)[0] != batch:
        raise ValueError(
            f"generate: fuse must return log-probabilities [B, V] = [{batch}, V], got shape "
            f"{tuple(np.shape(log_probs))} (logits came in as "
            f"{[tuple(x.shape) for x in logits]})."
        )
    if not jnp.issubdtype(log_probs.dtype, jnp.floating):
        raise ValueError(f"generate: fuse returned {log_probs.dtype} log-probabilities.")
    for path, leaf in jax.tree_util.tree_flatten_with_path(aux)[0]:
        if np.ndim(leaf) < 1 or np.shape(leaf)[0] != batch:
            raise ValueError(
                f"generate: every leaf of fuse's aux must be [B, ...] = [{batch}, ...]; "
                f"aux{jax.tree_util.keystr(path)} has shape {tuple(np.shape(leaf))}."
            )
    return log_probs, aux


@functools.partial(
    jax.jit,
    static_argnames=("statics", "fuse", "max_new_tokens", "placement"),
)
def _generate(
    dynamic, key, sampling, fuse_args, stops, pad_token, *, statics, fuse, max_new_tokens, placement
):
    # Stop and pad ids are traced (a new stop list of the same length reuses the program).
    n = max_new_tokens
    batch = dynamic[0][1].shape[0]
    caches, logits = [], []
    for static, (params, prompt, lengths) in zip(statics, dynamic, strict=True):
        cache = _init_cache(static, params, batch, placement)
        pos = _prefill_positions(lengths, prompt.shape[1])
        last, cache = _forward(static, params, prompt, cache, pos, placement)
        caches.append(cache)
        logits.append(last)

    def choose(step, logits):
        log_probs, aux = _call_fuse(fuse, logits, fuse_args, batch, statics)
        step_key = None if key is None else jax.random.fold_in(key, step)
        token = sample(step_key, log_probs, sampling)
        chosen = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
        return token, chosen, aux

    def record(state, step, token, chosen, aux):
        tokens, logps, aux_buf, lengths, done = state
        live = ~done
        tokens = tokens.at[:, step].set(jnp.where(live, token, pad_token))
        logps = logps.at[:, step].set(jnp.where(live, chosen, jnp.zeros_like(chosen)))

        def put(buf, leaf):
            mask = live.reshape(live.shape + (1,) * (leaf.ndim - 1))
            return buf.at[:, step].set(jnp.where(mask, leaf, jnp.zeros_like(leaf)))

        aux_buf = jax.tree.map(put, aux_buf, aux)
        lengths = lengths + live.astype(jnp.int32)
        if stops.shape[0]:
            done = done | (live & jnp.any(token[:, None] == stops[None, :], axis=-1))
        return tokens, logps, aux_buf, lengths, done

    token, chosen, aux = choose(0, logits)
    aux_buf = jax.tree.map(lambda a: jnp.zeros((batch, n, *a.shape[1:]), a.dtype), aux)
    outputs = (
        jnp.full((batch, n), pad_token, jnp.int32),
        jnp.zeros((batch, n), chosen.dtype),
        aux_buf,
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
    )
    outputs = record(outputs, 0, token, chosen, aux)
    prompt_lengths = [d[2] for d in dynamic]

    def cond(carry):
        step, _, _, outputs = carry
        return (step < n) & ~jnp.all(outputs[4])

    def body(carry):
        step, caches, token, outputs = carry
        new_caches, logits = [], []
        for static, (params, _, _), cache, lengths in zip(
            statics, dynamic, caches, prompt_lengths, strict=True
        ):
            pos = (lengths + (step - 1))[:, None]
            last, cache = _forward(static, params, token[:, None], cache, pos, placement)
            new_caches.append(cache)
            logits.append(last)
        token, chosen, aux = choose(step, logits)
        outputs = record(outputs, step, token, chosen, aux)
        return step + 1, new_caches, token, outputs

    step, _, _, outputs = jax.lax.while_loop(
        cond, body, (jnp.asarray(1, jnp.int32), caches, token, outputs)
    )
    tokens, logps, aux_buf, lengths, done = outputs
    return GenerateOutput(tokens, lengths, done, logps, aux_buf, step)
