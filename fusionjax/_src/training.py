"""The optax loop driver every training loop uses, and optax under strict dtype promotion.

:func:`run_steps` runs ``step(s, params, opt_state, *args) -> (params, opt_state, loss)``
``steps`` times (step ``s`` draws its own batches, e.g. from ``jax.random.fold_in(key,
s)``). Compiled, ``chunk`` steps form one ``lax.fori_loop`` per call and progress is
reported between calls; the large inputs (task vectors, data) are ``args`` of the
compiled function, never constants baked into the program.

What costs time, and what is done about it: compiling the loop (seconds) rather than
running it. The compiled chunk is shared by every call whose ``step`` has the same
*static* part: a ``step`` that is a pytree (a :class:`jax.tree_util.Partial` of a
module-level function) has its array leaves passed as arguments and the rest (the
function, Python numbers and callables) as the cache key, as ``equinox.filter_jit``
partitions a pytree. So a loop whose step is ``Partial(step_fn, logits_fn, optimizer,
batch_size)`` compiles once for every model of one shape, even when ``logits_fn`` is
itself a ``Partial`` holding per-model arrays (e.g. a testbed's heads). A plain closure
is its own key (it compiles once per closure object, and the compiled function is
dropped with it).

:func:`standard_promotion` is the one place that runs optax under standard dtype
promotion: optax mixes Python floats with int32 step counts (Adam's bias correction),
which ``jax_numpy_dtype_promotion="strict"`` (this project's tests) rejects.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusionjax._src import pytrees
from fusionjax._src import validation
from fusionjax._src.progress import Progress

Step = Callable[..., tuple[Any, Any, jax.Array]]


def standard_promotion(
    optimizer: optax.GradientTransformation,
) -> optax.GradientTransformation:
    r"""``optimizer`` with its ``init`` and ``update`` traced under standard dtype promotion.

    Everything else (the loss, the gradients, :func:`optax.apply_updates`) keeps the
    caller's promotion mode; only optax's own arithmetic, which mixes int32 counts and
    Python floats, is exempted. The numbers are the optimizer's, bit for bit. Wrapping
    the same optimizer object twice returns the same wrapper (so compiled loops keyed by
    it are reused).

    Args:
      optimizer: Any optax ``GradientTransformation`` (extra-args ones too).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with the same ``init`` and ``update``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> opt = standard_promotion(optax.adam(1e-2))
      >>> params = {"w": jnp.ones(3)}
      >>> with jax.numpy_dtype_promotion("strict"):
      ...     state = opt.init(params)
      ...     updates, state = opt.update({"w": jnp.ones(3)}, state, params)
      >>> [round(float(w), 4) for w in optax.apply_updates(params, updates)["w"]]
      [0.99, 0.99, 0.99]
    """
    if getattr(optimizer, "_fusionjax_standard_promotion", False):
        return optimizer
    try:
        return _wrap_cached(optimizer)
    except TypeError:  # an unhashable optimizer: wrap it anew
        return _wrap(optimizer)


class _Standard(optax.GradientTransformationExtraArgs):
    _fusionjax_standard_promotion = True


@functools.lru_cache(maxsize=64)
def _wrap_cached(optimizer):
    return _wrap(optimizer)


def _wrap(optimizer):
    optimizer = optax.with_extra_args_support(optimizer)

    def init(params):
        with jax.numpy_dtype_promotion("standard"):
            return optimizer.init(params)

    def update(updates, state, params=None, **extra_args):
        with jax.numpy_dtype_promotion("standard"):
            return optimizer.update(updates, state, params, **extra_args)

    return _Standard(init, update)


def run_steps(
    step: Step,
    params: Any,
    opt_state: Any,
    args: tuple,
    *,
    steps: int,
    jit: bool = True,
    chunk: int = 50,
    progress: Any = None,
    desc: str = "training",
) -> tuple[Any, Any, np.ndarray]:
    """Runs ``steps`` optimizer steps, compiled in chunks or eagerly, with progress.

    Args:
      step: ``step(s, params, opt_state, *args) -> (params, opt_state, loss)``, ``s`` an
        int32 scalar. A pytree (e.g. a :class:`jax.tree_util.Partial`) has its array
        leaves passed to the compiled loop as arguments, and its other leaves and
        structure key the compiled code, so equal steps share one compilation.
      params: The trained parameters (coefficients, routers, a Portland).
      opt_state: The optimizer state.
      args: Everything else the step reads, passed as arguments of the compiled function.
      steps: Number of steps.
      jit: Compile the loop; ``False`` runs the same steps op by op.
      chunk: Steps per compiled call.
      progress: ``None``, a callable (called with a message per chunk), or a tqdm-like bar
        or class (updated by steps).
      desc: The progress bar's label.

    Returns:
      ``(params, opt_state, losses)`` with the loss of every step, ``[steps]`` float32.

    Raises:
      ValueError: if ``steps`` is negative or ``chunk`` is not positive.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> opt = standard_promotion(optax.sgd(0.1))
      >>> def step(s, w, state, target):
      ...     loss, g = jax.value_and_grad(lambda w: jnp.sum((w - target) ** 2))(w)
      ...     updates, state = opt.update(g, state, w)
      ...     return optax.apply_updates(w, updates), state, loss
      >>> w, _, losses = run_steps(step, jnp.zeros(2), opt.init(jnp.zeros(2)),
      ...                          (jnp.ones(2),), steps=40, chunk=16)
      >>> bool(jnp.allclose(w, 1.0, atol=1e-3)), losses.shape
      (True, (40,))
    """
    validation.check_hparam("steps", steps, lower=0)
    validation.check_hparam("chunk", chunk, lower=1)
    steps, chunk = int(steps), int(chunk)
    losses = np.zeros(steps, np.float32)
    bar = Progress(progress, total=steps, desc=desc)
    try:
        if not jit:
            for s in range(steps):
                params, opt_state, loss = step(jnp.asarray(s, jnp.int32), params, opt_state, *args)
                losses[s] = float(loss)
                bar.done()
        else:
            run = compiled_chunk(step, chunk)
            for start in range(0, steps, chunk):
                n = min(chunk, steps - start)
                params, opt_state, out = run(
                    jnp.asarray(start, jnp.int32),
                    jnp.asarray(n, jnp.int32),
                    params,
                    opt_state,
                    args,
                )
                losses[start : start + n] = np.asarray(out)[:n]
                bar.start(f"step {start + n}/{steps}, loss {losses[start + n - 1]:.4f}")
                for _ in range(n):
                    bar.done()
    finally:
        bar.close()
    return params, opt_state, losses


def compiled_chunk(step: Step, chunk: int) -> Callable[..., tuple[Any, Any, jax.Array]]:
    """The compiled ``run(start, n, params, opt_state, args)`` of :func:`run_steps`.

    Runs steps ``start .. start + n - 1`` (``n <= chunk``) in one ``lax.fori_loop`` and
    returns ``(params, opt_state, losses[chunk])`` (entries past ``n`` are zero). Compiled
    once per static part of ``step`` (see :func:`run_steps`), chunk and argument shapes.

    Args:
      step: As in :func:`run_steps`.
      chunk: Steps per call (the length of the returned losses).

    Returns:
      ``run(start, n, params, opt_state, args)``; ``start`` and ``n`` are int32 scalars.
    """
    dynamic, static = pytrees.jit_partition(step)
    try:
        hash(static)
    except TypeError:
        static = None
    if static is None or (not dynamic and not isinstance(step, jax.tree_util.Partial)):
        # A plain closure: compile for this object only (the compiled code goes with it).
        run = jax.jit(functools.partial(_run_chunk, step, int(chunk)))
        return lambda start, n, params, opt_state, args: run(start, n, params, opt_state, args)
    return functools.partial(_run_chunk_shared, static, int(chunk), dynamic)


def _run_chunk(step, chunk, start, n, params, opt_state, args):
    def body(i, carry):
        params, opt_state, losses = carry
        params, opt_state, loss = step(start + i, params, opt_state, *args)
        return params, opt_state, losses.at[i].set(loss)

    losses = jnp.zeros((chunk,), jnp.float32)
    return jax.lax.fori_loop(0, n, body, (params, opt_state, losses))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _run_chunk_shared(static, chunk, dynamic, start, n, params, opt_state, args):
    step = pytrees.jit_combine(dynamic, static)
    return _run_chunk(step, chunk, start, n, params, opt_state, args)
