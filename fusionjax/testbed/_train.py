"""Training: denoising pretraining of the encoder, then per-task fine-tuning."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusionjax._src import training
from fusionjax.testbed import _model
from fusionjax.testbed import _tasks

Params = Any


@dataclasses.dataclass(frozen=True)
class Config:
    r"""Hyperparameters of the testbed; all of them key the on-disk cache.

    Attributes:
      test_fraction: Fraction of the images held out for testing (same split for all tasks).
      widths: Dense widths of the encoder; the last is the feature dimension ``d``.
      pretrain_steps: Adam steps of denoising pretraining.
      pretrain_batch_size: Images per pretraining step.
      pretrain_learning_rate: Adam learning rate of pretraining.
      mask_rate: Fraction of pixels replaced by 0.5 in pretraining inputs.
      noise_std: Standard deviation of the Gaussian noise added to pretraining inputs.
      head_shots: Labelled training examples per class that make a head's prototype.
      semantic_weight: Weight :math:`\epsilon` of the prototype in each head row (the rest
        is a direction in the feature "gap"); small values make pretrained logits
        low-contrast, as CLIP's zero-shot logits are.
      gap_dim: Dimension of the gap subspace the head directions are drawn from.
      logit_scale: Multiplier of the cosine logits (CLIP's 100).
      finetune_steps: SGD steps per task.
      finetune_batch_size: Examples per fine-tuning step.
      finetune_learning_rate: SGD learning rate.
      finetune_momentum: SGD (heavy-ball) momentum.
    """

    test_fraction: float = 0.3
    widths: tuple[int, ...] = (512, 512, 128)
    pretrain_steps: int = 1000
    pretrain_batch_size: int = 128
    pretrain_learning_rate: float = 1e-3
    mask_rate: float = 0.5
    noise_std: float = 0.2
    head_shots: int = 1
    semantic_weight: float = 0.1
    gap_dim: int = 64
    logit_scale: float = 100.0
    finetune_steps: int = 300
    finetune_batch_size: int = 32
    finetune_learning_rate: float = 2e-3
    finetune_momentum: float = 0.9


def _dihedral_permutations() -> np.ndarray:
    """Pixel permutations of the 8 rotations/flips of an 8x8 image, ``[8, 64]``."""
    index = np.arange(_tasks.NUM_PIXELS).reshape(_tasks.IMAGE_SIDE, _tasks.IMAGE_SIDE)
    perms = []
    for r in range(4):
        rotated = np.rot90(index, r)
        perms += [rotated.ravel(), rotated[:, ::-1].ravel()]
    return np.stack(perms).astype(np.int32)


_PERMUTATIONS = _dihedral_permutations()


def all_views(x: np.ndarray) -> np.ndarray:
    """The 16 pretraining views of ``[n, 64]`` images: 8 rotations/flips x inversion.

    Returns:
      ``[16, n, 64]`` views.
    """
    views = [x[:, perm] for perm in _PERMUTATIONS]
    return np.stack(views + [1.0 - v for v in views])


def _random_view(key: jax.Array, x: jax.Array) -> jax.Array:
    """One random view (rotation/flip, then maybe inversion) per ``[b, 64]`` image."""
    k_perm, k_invert = jax.random.split(key)
    b = x.shape[0]
    perm = jnp.asarray(_PERMUTATIONS)[jax.random.randint(k_perm, (b,), 0, len(_PERMUTATIONS))]
    view = jnp.take_along_axis(x, perm, axis=1)
    invert = jax.random.bernoulli(k_invert, 0.5, (b, 1))
    return jnp.where(invert, 1.0 - view, view)


def _corrupt(key: jax.Array, x: jax.Array, config: Config) -> jax.Array:
    k_mask, k_noise = jax.random.split(key)
    keep = jax.random.bernoulli(k_mask, 1.0 - config.mask_rate, x.shape)
    return jnp.where(keep, x, 0.5) + config.noise_std * jax.random.normal(k_noise, x.shape)


@functools.partial(jax.jit, static_argnums=0)
def pretrain(config: Config, images: jax.Array, key: jax.Array) -> tuple[Params, jax.Array]:
    """Denoising-autoencoder pretraining over random views of unlabelled images.

    Each step takes a batch of training images, applies a random rotation/flip/inversion,
    masks pixels and adds noise, and reconstructs the clean view with a linear decoder on
    the encoder's features. The decoder is discarded.

    Args:
      config: Hyperparameters (static).
      images: ``[n, 64]`` unlabelled training images.
      key: PRNG key.

    Returns:
      ``(params, losses)``: the encoder's ``params`` collection and ``[steps]`` losses.
    """
    return _pretrain(config, images, key)


def _pretrain(config: Config, images: jax.Array, key: jax.Array) -> tuple[Params, jax.Array]:
    encoder = _model.Encoder(config.widths)
    k_init, k_dec, k_train = jax.random.split(key, 3)
    d = config.widths[-1]
    params = {
        "encoder": encoder.init(k_init, jnp.zeros((1, _tasks.NUM_PIXELS), jnp.float32))["params"],
        "decoder": {
            "kernel": jax.random.normal(k_dec, (d, _tasks.NUM_PIXELS)) / jnp.sqrt(float(d)),
            "bias": jnp.zeros((1, _tasks.NUM_PIXELS), jnp.float32),
        },
    }
    # optax's Adam mixes int32 step counts with floats, which strict promotion (as in our
    # test suite) rejects: the optimizer runs under standard promotion.
    optimizer = training.standard_promotion(optax.adam(config.pretrain_learning_rate))

    def loss_fn(params, key):
        k_batch, k_view, k_corrupt = jax.random.split(key, 3)
        batch = jax.random.randint(k_batch, (config.pretrain_batch_size,), 0, images.shape[0])
        clean = _random_view(k_view, images[batch])
        features = encoder.apply({"params": params["encoder"]}, _corrupt(k_corrupt, clean, config))
        recon = features @ params["decoder"]["kernel"] + params["decoder"]["bias"]
        return jnp.mean((recon - clean) ** 2)

    def step(carry, key):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, state = optimizer.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    keys = jax.random.split(k_train, config.pretrain_steps)
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), keys)
    return params["encoder"], losses


@functools.partial(jax.jit, static_argnums=0)
def finetune(
    config: Config,
    params: Params,
    head: jax.Array,
    valid: jax.Array,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
) -> Params:
    """Fine-tunes the encoder on one task through its fixed head (SGD with momentum).

    Args:
      config: Hyperparameters (static).
      params: Encoder params to start from (the pretrained ones).
      head: ``[C_max, d]`` fixed head, zero-padded to the largest class count so that
        every task shares one compiled function.
      valid: ``[C_max]`` bool, which head rows are real classes.
      x: ``[n, 64]`` training inputs.
      y: ``[n]`` int32 labels.
      key: PRNG key for the minibatches.

    Returns:
      The fine-tuned encoder params; the head is not trained.
    """
    return _finetune(config, params, head, valid, x, y, key)


def _finetune(config, params, head, valid, x, y, key):
    encoder = _model.Encoder(config.widths)
    optimizer = optax.sgd(config.finetune_learning_rate, momentum=config.finetune_momentum)
    optimizer = training.standard_promotion(optimizer)
    penalty = jnp.where(valid, 0.0, -1e9)[None, :]

    def loss_fn(params, key):
        batch = jax.random.randint(key, (config.finetune_batch_size,), 0, x.shape[0])
        features = encoder.apply({"params": params}, x[batch])
        logits = _model.head_logits(features, head, config.logit_scale) + penalty
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[batch]).mean()

    def step(carry, key):
        params, state = carry
        grads = jax.grad(loss_fn)(params, key)
        updates, state = optimizer.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    keys = jax.random.split(key, config.finetune_steps)
    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), keys)
    return params
