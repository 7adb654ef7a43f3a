"""The optax loop every learned method runs: compiled in chunks, or eagerly, with progress.

A method supplies ``step(s, params, opt_state, *args) -> (params, opt_state, loss)`` (step
``s`` draws its own batches from ``jax.random.fold_in(key, s)``); :func:`run_steps` runs it
``steps`` times. Compiled, ``chunk`` steps form one ``lax.fori_loop`` per call, and the
large inputs (task vectors, data) are ``args`` of the compiled function, never constants
baked into the program; progress is reported between calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusionjax._src import validation
from fusionjax._src.progress import Progress

Step = Callable[..., tuple[Any, Any, jax.Array]]


def init_optimizer(optimizer: optax.GradientTransformation, params: Any) -> Any:
    """``optimizer.init(params)`` under standard dtype promotion (see :func:`apply_optimizer`)."""
    with jax.numpy_dtype_promotion("standard"):
        return optimizer.init(params)


def apply_optimizer(
    optimizer: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any
) -> tuple[Any, Any]:
    """One optax update, returning ``(new_params, new_opt_state)``.

    optax mixes Python floats with int32 step counts (Adam's bias correction), which fails
    under ``jax_numpy_dtype_promotion="strict"``; the update runs with standard rules.
    """
    with jax.numpy_dtype_promotion("standard"):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


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
    """Runs ``steps`` optimizer steps.

    Args:
      step: ``step(s, params, opt_state, *args) -> (params, opt_state, loss)``, ``s`` an
        int32 scalar.
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
            run = _compiled_chunk(step, chunk)
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


def _compiled_chunk(step: Step, chunk: int):
    @jax.jit
    def run(start, n, params, opt_state, args):
        def body(i, carry):
            params, opt_state, losses = carry
            params, opt_state, loss = step(start + i, params, opt_state, *args)
            return params, opt_state, losses.at[i].set(loss)

        losses = jnp.zeros((chunk,), jnp.float32)
        return jax.lax.fori_loop(0, n, body, (params, opt_state, losses))

    return run
