r"""Independently trained digit classifiers: the alignment testbed.

Alignment (Git Re-Basin, OTFusion) starts from networks of one architecture trained
on the same data from *different random initialisations* (and different batch
orders). Their hidden units are in unrelated orders, so averaging them directly
fails, while permuting one onto the other first lets them be interpolated.

:func:`train_classifiers` trains such networks (any :mod:`fusionjax.zoo` model, or
any linen module mapping ``[B, 8, 8, 1]`` images to 10 logits) on the 10-class
digit task of ``sklearn.datasets.load_digits`` with the merging testbed's fixed
70/30 split: Adam, batches of 64, one compiled loop vmapped over the seeds, so a
few seconds on two CPU cores for small widths. Models with BatchNorm are trained
in train mode and evaluated with their running statistics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusionjax._src import training
from fusionjax._src import tree as tree_lib
from fusionjax._src.base import Params
from fusionjax.testbed._tasks import load_images
from fusionjax.testbed._tasks import split_indices


class Digits(NamedTuple):
    """The 8x8 digits as ``[N, 8, 8, 1]`` images in ``[0, 1]`` with labels ``0..9``."""

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array


@functools.lru_cache(maxsize=1)
def digits() -> Digits:
    """The digit-identity task on the testbed's fixed 70/30 train/test split."""
    images, labels = load_images()
    train, test = split_indices(0.3)
    x = jnp.asarray(images.reshape(-1, 8, 8, 1), jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    return Digits(x[train], y[train], x[test], y[test])


def _uses_batch_norm(variables: Params) -> bool:
    return "batch_stats" in variables


def logits(model: nn.Module, variables: Params, x: jax.Array) -> jax.Array:
    """Evaluation-mode logits (BatchNorm with its running statistics)."""
    if _uses_batch_norm(variables):
        return model.apply(variables, x, train=False)
    return model.apply(variables, x)


def metrics(model: nn.Module, variables: Params, x: jax.Array, y: jax.Array) -> dict:
    """``{"loss": mean cross-entropy, "accuracy": fraction correct}`` on ``(x, y)``."""
    out = logits(model, variables, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(out, -1) == y)}


@functools.partial(jax.jit, static_argnums=0)
def evaluate(model: nn.Module, variables: Params, x: jax.Array, y: jax.Array) -> dict:
    """Jitted :func:`metrics`."""
    return metrics(model, variables, x, y)


def _loss(model, params, state, x, y):
    if state:
        out, state = model.apply({"params": params, **state}, x, train=True, mutable=list(state))
    else:
        out = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), state


def _has_convolutions(model: nn.Module, x: jax.Array) -> bool:
    jaxpr = jax.make_jaxpr(lambda x: model.init(jax.random.key(0), x))(x[:1])
    return "conv_general_dilated" in str(jaxpr)


@functools.lru_cache(maxsize=32)
def _trainer(model: nn.Module, learning_rate: float, chunk: int):
    """Jitted ``init(key, x)`` and ``run(carry, batches, x, y)``, vmapped over seeds.

    ``run`` takes one Adam step per row of ``batches`` (``[seeds, chunk, batch]`` example
    indices), in a ``lax.fori_loop`` unless ``chunk == 1``. Built once per configuration:
    a closure has no static arguments to hash per call.
    """
    opt = training.standard_promotion(optax.adam(learning_rate))

    def step(carry, idx, x, y):
        params, state, opt_state = carry
        grads, state = jax.grad(functools.partial(_loss, model), has_aux=True)(
            params, state, x[idx], y[idx]
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state

    def run_one(carry, batches, x, y):
        if chunk == 1:
            return step(carry, batches[0], x, y)
        body = lambda i, c: step(c, batches[i], x, y)  # noqa: E731
        return jax.lax.fori_loop(0, chunk, body, carry)

    run = jax.jit(jax.vmap(run_one, in_axes=(0, 0, None, None)), donate_argnums=0)
    return jax.jit(model.init), run, jax.jit(jax.vmap(opt.init))


def _batches(seed: int, n: int, steps: int, batch_size: int) -> np.ndarray:
    """``[steps, batch_size]`` example indices: seeded epochs, no repeats within one."""
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // n) + 1
    order = np.concatenate([rng.permutation(n)[: n - n % batch_size] for _ in range(epochs)])
    return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def _train(model, seeds, steps, batch_size, learning_rate, data, chunk):
    init, run, opt_init = _trainer(model, learning_rate, chunk)
    variables = [init(jax.random.key(int(s)), data.x_train[:1]) for s in seeds]
    variables = tree_lib.stack(variables)
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    batches = np.stack([_batches(int(s), data.x_train.shape[0], steps, batch_size) for s in seeds])
    # The optimizer runs under standard promotion (training.standard_promotion), whatever
    # the user's (or the test suite's) setting.
    carry = (params, state, opt_init(params))
    for t0 in range(0, steps, chunk):
        carry = run(carry, batches[:, t0 : t0 + chunk], data.x_train, data.y_train)
    params, state, _ = carry
    return tree_lib.unstack({"params": params, **state})


def train_classifiers(
    model: nn.Module,
    seeds: Sequence[int],
    *,
    steps: int = 600,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    data: Digits | None = None,
) -> list[Params]:
    """Trains one copy of ``model`` per seed (initialisation and batch order differ).

    Args:
      model: A linen module mapping ``[B, 8, 8, 1]`` images to logits; if it has
        BatchNorm it must take ``train=`` and keep statistics in ``batch_stats``.
      seeds: One integer per model.
      steps: Adam steps.
      batch_size: Examples per step (epochs of a seeded shuffle of the training set).
      learning_rate: Adam's learning rate.
      data: The data; default :func:`digits`.

    Returns:
      A list of linen variables dicts, one per seed.
    """
    data = digits() if data is None else data
    if not _has_convolutions(model, data.x_train):
        # All seeds at once (vmapped), 50 steps per compiled call.
        chunk = math.gcd(steps, 50)
        return _train(model, seeds, steps, batch_size, learning_rate, data, chunk)
    # Convolutional models one seed at a time and one step per call: on XLA:CPU, a
    # convolution inside a loop ran ~3x slower than dispatched from Python, and a
    # vmapped (batch-grouped) one ~3x slower than one model at a time (ResNet, measured).
    return [
        _train(model, [s], steps, batch_size, learning_rate, data, 1)[0] for s in seeds
    ]


def accuracy(model: nn.Module, variables: Params, data: Digits | None = None) -> float:
    """Test accuracy of one model."""
    data = digits() if data is None else data
    return float(evaluate(model, variables, data.x_test, data.y_test)["accuracy"])


def describe(model: nn.Module, variables: Params) -> str:
    """``"MLP, 12.3k params"``: a one-line description for tables."""
    n = sum(int(np.size(v)) for v in jax.tree.leaves(variables.get("params", variables)))
    return f"{type(model).__name__}, {n / 1e3:.1f}k params"
