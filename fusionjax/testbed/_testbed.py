"""The :class:`Testbed` and :func:`load`: build (or read from the cache) all trained models."""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from fusionjax._src.progress import Progress as _Progress
from fusionjax.testbed import _cache
from fusionjax.testbed import _model
from fusionjax.testbed import _tasks
from fusionjax.testbed import _train
from fusionjax.testbed._tasks import Task
from fusionjax.testbed._train import Config

Params = Any

# Keys the cache together with the config and the source of the training modules (so any
# edit of the tasks, objective or heads invalidates old files).
_VERSION = "1"
_SOURCES = (_tasks, _model, _train, sys.modules[__name__])


@dataclasses.dataclass(frozen=True, eq=False)
class Testbed:
    """A pretrained encoder, one fine-tuned copy per task, and the tasks' fixed heads.

    Attributes:
      tasks: The :class:`Task` s, in order.
      pretrained: Encoder params (the flax linen ``params`` collection), a nested dict
        ``{'Dense_0': {'kernel', 'bias'}, ...}`` of float32 arrays.
      finetuned: One params tree per task, same structure, fine-tuned from
        ``pretrained`` on that task only.
      heads: One fixed ``[num_classes, d]`` float32 head per task, unit rows; shared by
        every model and never trained or merged.
      encoder: The :class:`Encoder` module (``encoder.apply({'params': p}, x)``).
      config: The :class:`Config` it was built with.
      seed: The seed it was built with.
    """

    tasks: tuple[Task, ...]
    pretrained: Params
    finetuned: tuple[Params, ...]
    heads: tuple[jax.Array, ...]
    encoder: _model.Encoder
    config: Config
    seed: int

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks' names, in order."""
        return tuple(t.name for t in self.tasks)

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.tasks)

    @functools.cached_property
    def features(self) -> Partial:
        """``features(params, x) -> [..., d]``: unnormalized features of ``[..., 64]`` inputs.

        A :class:`jax.tree_util.Partial` with no array leaves (see :attr:`logits`).
        """
        return Partial(_model.features_fn(self.config.widths))

    @functools.cached_property
    def logits(self) -> Partial:
        """``logits(params, task_index, x) -> [..., C]``: encoder features through a task's head.

        Pure and differentiable in ``params`` (which may be traced): use it under
        ``jax.jit(tb.logits, static_argnums=1)``, ``jax.grad`` or ``jax.vmap``. The logits are
        ``logit_scale * cos(features, head rows)`` of the fixed head ``tb.heads[task_index]``
        (``task_index`` a Python int) for inputs ``x``, ``[..., 64]`` (a batch ``[n, 64]`` or
        one example ``[64]``).

        It is a :class:`jax.tree_util.Partial` whose array leaves are the heads: a loop
        that takes it as an argument of its compiled function (as the learned loops do)
        compiles once for every seed, whose testbeds differ in their heads only.
        """
        return Partial(_model.logits_fn(self.config.widths, self.config.logit_scale), self.heads)

    def task_logits(self, task_index: int) -> Partial:
        """``fn(params, x) -> [..., C]``: one task's logits (``tb.logits`` with ``task_index`` set).

        A :class:`jax.tree_util.Partial` whose one array leaf is the task's head, so tasks
        with the same number of classes share a compiled function that takes it as an
        argument (e.g. :func:`fusionjax.interop.dense_fisher_diagonal`).

        Args:
          task_index: Which task's head; a Python int.

        Returns:
          The function.
        """
        fn = _model.task_logits_fn(self.config.widths, self.config.logit_scale)
        return Partial(fn, self.heads[task_index])

    @functools.cached_property
    def head_logits(self) -> Partial:
        """``head_logits(task_index, features) -> [..., C]``: a task's fixed head on features.

        ``tb.logits(params, t, x) == tb.head_logits(t, tb.features(params, x))``: methods
        that mix features before the head (Neural Ligand's ensemble) use the two halves.
        A :class:`jax.tree_util.Partial` whose array leaves are the heads.
        """
        return Partial(_model.head_logits_fn(self.config.logit_scale), self.heads)

    def evaluate(self, params: Params) -> np.ndarray:
        """Test accuracy of an encoder on every task, ``[num_tasks]`` float64 in ``[0, 1]``."""
        x, y, heads, valid = self._eval_arrays
        widths, scale = self.config.widths, self.config.logit_scale
        return np.asarray(_accuracies(widths, scale, params, heads, valid, x, y), np.float64)

    @functools.cached_property
    def _eval_arrays(self):
        c_max = max(t.num_classes for t in self.tasks)
        heads = np.zeros((self.num_tasks, c_max, self.config.widths[-1]), np.float32)
        valid = np.zeros((self.num_tasks, c_max), bool)
        for i, (task, head) in enumerate(zip(self.tasks, self.heads, strict=False)):
            heads[i, : task.num_classes] = np.asarray(head)
            valid[i, : task.num_classes] = True
        x = np.stack([t.x_test for t in self.tasks])
        y = np.stack([t.y_test for t in self.tasks])
        return jnp.asarray(x), jnp.asarray(y), jnp.asarray(heads), jnp.asarray(valid)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _accuracies(widths, scale, params, heads, valid, x, y):
    encoder = _model.Encoder(widths)

    def one(head, valid, x, y):
        logits = _model.head_logits(encoder.apply({"params": params}, x), head, scale)
        logits = jnp.where(valid[None, :], logits, -jnp.inf)
        return jnp.mean(jnp.argmax(logits, axis=-1) == y)

    return jax.vmap(one)(heads, valid, x, y)


def _features(widths: tuple[int, ...], params: Params, x: np.ndarray) -> np.ndarray:
    return np.asarray(_apply(widths, params, jnp.asarray(x)))


@functools.partial(jax.jit, static_argnums=0)
def _apply(widths, params, x):
    return _model.Encoder(widths).apply({"params": params}, x)


def make_heads(
    config: Config, seed: int, tasks: tuple[Task, ...], pretrained: Params
) -> tuple[np.ndarray, ...]:
    """Builds the fixed heads from the pretrained encoder (deterministic in ``seed``).

    For each task, class prototypes are the mean unit-normalized pretrained features of
    ``config.head_shots`` random training examples per class; see :func:`make_head` for
    how the gap directions are mixed in. The gap subspace is estimated on the training
    images under the 16 pretraining views.

    Returns:
      One ``[num_classes, d]`` float32 head per task.
    """
    rng = np.random.default_rng([seed, 1])
    train, _ = _tasks.split_indices(config.test_fraction)
    images = _tasks.load_images()[0][train].reshape(-1, _tasks.NUM_PIXELS)
    views = _train.all_views(images).reshape(-1, _tasks.NUM_PIXELS)
    gap = _model.gap_basis(_features(config.widths, pretrained, views), config.gap_dim)
    heads = []
    for task in tasks:
        shots = np.concatenate(
            [
                rng.choice(np.flatnonzero(task.y_train == c), config.head_shots, replace=False)
                for c in range(task.num_classes)
            ]
        )
        # Features of the whole training set: one compiled shape for every task.
        f = np.asarray(_model.normalize(_features(config.widths, pretrained, task.x_train)))[shots]
        prototypes = f.reshape(task.num_classes, config.head_shots, -1).mean(axis=1)
        heads.append(_model.make_head(prototypes, gap, config.semantic_weight, rng))
    return tuple(heads)


def _cache_path(config: Config, seed: int) -> str:
    spec = {
        "config": dataclasses.asdict(config),
        "tasks": [s[0] for s in _tasks.TASK_SPECS],
    }
    return _cache.path("testbed", _VERSION, spec, _SOURCES, seed)


def _save(path: str, pretrained: Params, finetuned, heads) -> None:
    arrays = {f"pretrained/{i}": np.asarray(a) for i, a in enumerate(jax.tree.leaves(pretrained))}
    for t, params in enumerate(finetuned):
        leaves = jax.tree.leaves(params)
        arrays.update({f"finetuned/{t}/{i}": np.asarray(a) for i, a in enumerate(leaves)})
    arrays.update({f"heads/{t}": np.asarray(h) for t, h in enumerate(heads)})
    _cache.save(path, arrays)


def _restore(path: str, config: Config, num_tasks: int):
    shapes = jax.eval_shape(
        _model.Encoder(config.widths).init,
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, _tasks.NUM_PIXELS), jnp.float32),
    )["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    with np.load(path) as data:

        def tree(prefix):
            out = [jnp.asarray(data[f"{prefix}/{i}"]) for i in range(len(leaves))]
            for a, s in zip(out, leaves, strict=False):
                if a.shape != s.shape or a.dtype != s.dtype:
                    raise ValueError(f"{path}: {prefix} is {a.shape} {a.dtype}, not {s.shape}")
            return jax.tree.unflatten(treedef, out)

        pretrained = tree("pretrained")
        finetuned = tuple(tree(f"finetuned/{t}") for t in range(num_tasks))
        heads = tuple(np.asarray(data[f"heads/{t}"]) for t in range(num_tasks))
    return pretrained, finetuned, heads


def _build(config: Config, seed: int, tasks: tuple[Task, ...], progress: _Progress):
    key_pretrain, key_finetune = jax.random.split(jax.random.key(seed))
    train, _ = _tasks.split_indices(config.test_fraction)
    progress.start("pretraining")
    images = _tasks.load_images()[0][train].reshape(-1, _tasks.NUM_PIXELS)
    pretrained, _ = _train.pretrain(config, jnp.asarray(images), key_pretrain)
    pretrained = jax.block_until_ready(pretrained)
    progress.done()
    heads = make_heads(config, seed, tasks, pretrained)
    c_max = max(t.num_classes for t in tasks)
    finetuned = []
    for t, (task, head) in enumerate(zip(tasks, heads, strict=False)):
        progress.start(f"fine-tuning {task.name}")
        padded = np.zeros((c_max, head.shape[1]), np.float32)
        padded[: task.num_classes] = head
        params = _train.finetune(
            config,
            pretrained,
            jnp.asarray(padded),
            jnp.asarray(np.arange(c_max) < task.num_classes),
            jnp.asarray(task.x_train),
            jnp.asarray(task.y_train),
            jax.random.fold_in(key_finetune, t),
        )
        finetuned.append(jax.block_until_ready(params))
        progress.done()
    return pretrained, tuple(finetuned), heads


def load(
    seed: int = 0,
    *,
    cache: bool = True,
    progress: Any | None = None,
    config: Config | None = None,
) -> Testbed:
    """Builds the digits multi-task testbed, or reads it from the on-disk cache.

    Building pretrains the encoder, builds the heads and fine-tunes one encoder per task
    (about 10-20 s on two CPU cores). Training is deterministic in ``seed``, and the cache
    returns exactly the trained arrays.

    Args:
      seed: Seed of pretraining, heads and fine-tuning (the train/test split is fixed).
      cache: Read the trained parameters from, and write them to,
        ``$FUSIONJAX_CACHE`` (default ``~/.cache/fusionjax``); the file name holds the
        seed and a hash of the config and code version.
      progress: ``None`` for silence; a callable, called with a message before each of the
        ``1 + num_tasks`` training stages; a tqdm-like bar (reset to that total, then
        updated once per stage); or a tqdm-like class, instantiated and closed here.
      config: Hyperparameters; :class:`Config` defaults if ``None``.

    Returns:
      A :class:`Testbed`.

    Examples:
      >>> from fusionjax import testbed
      >>> tb = testbed.load(seed=0)  # doctest: +SKIP
      >>> tb.evaluate(tb.finetuned[0])[0] > tb.evaluate(tb.pretrained)[0]  # doctest: +SKIP
      True
    """
    config = Config() if config is None else config
    tasks = _tasks.make_tasks(config.test_fraction)
    path = _cache_path(config, seed)
    def build():
        bar = _Progress(progress, total=1 + len(tasks), desc="testbed")
        try:
            return _build(config, seed, tasks, bar)
        finally:
            bar.close()

    built, _ = _cache.load_or_build(
        path,
        cache=cache,
        restore=lambda f: _restore(f, config, len(tasks)),
        build=build,
        save=lambda f, b: _save(f, *b),
        progress=progress,
        desc="testbed",
    )
    pretrained, finetuned, heads = built
    return Testbed(
        tasks=tasks,
        pretrained=pretrained,
        finetuned=finetuned,
        heads=tuple(jnp.asarray(h) for h in heads),
        encoder=_model.Encoder(config.widths),
        config=config,
        seed=seed,
    )
