r"""Weight-Ensembling Mixture of Experts (WEMoE): task arithmetic with input-dependent weights.

WEMoE (Tang et al., ICML 2024) merges most parameters statically, by task arithmetic
:math:`\theta = \theta_0 + \lambda\sum_k\tau_k`, and *upscales* selected dense layers
into weight-ensembling MoE modules whose weights depend on the layer's input :math:`x`:

.. math::
  W(x) = W_0 + \sum_{k=1}^{T} r_k(x)\,\tau_k^{W}, \qquad
  b(x) = b_0 + \sum_{k=1}^{T} r_k(x)\,\tau_k^{b}, \qquad
  r(x) = \mathrm{ReLU}(x A + a)\,B + \beta \in \mathbb{R}^T,

where :math:`\tau_k = \theta_k - \theta_0` are the layer's task vectors and :math:`r` is
a small router per upscaled layer. The router's last layer starts at :math:`B = 0`,
:math:`\beta = \lambda_0` (``init``), so at initialisation every input gets
:math:`r = \lambda_0` and the model *is* task arithmetic. Only the routers are trained,
by minimising the prediction entropy on unlabeled test inputs (as AdaMerging).

The output is computed without ever building a per-example weight matrix:

.. math::
  y = x W_0 + b_0 + \big(r \otimes x\big)\,\mathrm{vec}(\tau^{W}) + r\,\tau^{b},
  \qquad (r\otimes x)\in\mathbb{R}^{n\times Td},\ \mathrm{vec}(\tau^W)\in\mathbb{R}^{Td\times e},

one matrix product per layer (see :func:`moe_dense`).

Flax linen models need no rewriting: :func:`wemoe_apply` is a context manager that
intercepts (:func:`flax.linen.intercept_methods`) every call of an upscaled
``nn.Dense`` and computes the MoE output instead, reading the layer's :math:`W_0, b_0`
from the parameters the model is applied with. So any
``logits_fn(params, task_index, x)`` that calls ``model.apply({"params": params}, x)``
becomes a WEMoE model:

.. code-block:: python

  backbone, tvs, layers = fj.learned.wemoe_upscale(base, finetuned, logits_fn, unlabeled)
  routers = fj.learned.init_routers(key, tvs)
  with fj.learned.wemoe_apply(routers, tvs):
      logits = logits_fn(backbone, task_index, x)

and :func:`wemoe_loss` is the objective to train ``routers`` in any optax loop.
:func:`wemoe` runs the paper's loop. Layers are addressed by their linen module path,
which must also be their path in ``params`` (``params`` is the model's own ``params``
collection, not a larger tree holding it).

The router sees only the layer's input: tasks that share their inputs (one image
domain, several label sets) get the same weights, and entropy minimisation can then
settle on weights that make every head confident rather than right.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from fusionjax._src import training, validation
from fusionjax._src.base import ArrayLike, Params, PRNGKey, Stacked
from fusionjax._src.merge import merge
from fusionjax.learned import _coefficients, _loop
from fusionjax.learned._moe import (
    LayerPath,
    Layers,
    Routers,
    _fmt,
    _get,
    _layer_table,
    _nest,
    _replace,
    _replace_leaves,
    init_routers,
    moe_dense,
    routing_weights,
)
from fusionjax.learned._objectives import LogitsFn, entropy, task_batches
from fusionjax.merging import _linear


def _dense_interceptor(table: dict[LayerPath, tuple], batch_reduce: bool):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        entry = table.get(path)
        if entry is None:
            return next_fun(*args, **kwargs)
        router, task_kernels, task_biases = entry
        inputs = args[0] if args else kwargs["inputs"]
        kernel = module.get_variable("params", "kernel")
        if kernel is None:
            raise ValueError(
                f"the upscaled nn.Dense at {_fmt(path)} has no params {_fmt(path)}['kernel']: "
                "apply the model with parameters (WEMoE does not initialise models)."
            )
        bias = module.get_variable("params", "bias") if module.use_bias else None
        if (task_biases is None) != (bias is None):
            have = "a bias" if bias is not None else "no bias"
            raise ValueError(
                f"the nn.Dense at {_fmt(path)} has {have} but its task vectors "
                f"{'do not' if task_biases is None else 'do'}."
            )
        inputs = jnp.asarray(inputs)
        if module.dtype is not None:
            inputs = inputs.astype(module.dtype)
            kernel = kernel.astype(module.dtype)
        routing = routing_weights(router, inputs)
        if batch_reduce:
            routing = jnp.mean(routing.reshape(-1, routing.shape[-1]), axis=0)
        return moe_dense(
            inputs, routing, kernel, bias, task_kernels, task_biases,
            precision=module.precision, name=f"the upscaled layer {_fmt(path)}",
        )  # fmt: skip

    return intercept


@contextlib.contextmanager
def wemoe_apply(
    routers: Routers, task_vectors: Stacked, *, batch_reduce: bool = False
) -> Iterator[None]:
    r"""Context in which the upscaled ``nn.Dense`` layers of flax linen models are WEMoE layers.

    Inside the context, every call of an ``nn.Dense`` whose module path has an entry in
    ``task_vectors`` returns :func:`moe_dense` of its input, with the layer's own
    ``kernel``/``bias`` from the applied parameters as :math:`W_0, b_0` and the routing
    weights of its router, computed for every row (example, token) of the input. Other
    modules run unchanged. Works under :func:`jax.jit`, :func:`jax.grad` and
    :func:`jax.vmap` (it acts while the model is traced).

    Dense layers inside lifted transforms (``nn.scan``, ``nn.vmap``) and custom
    ``dot_general`` overrides are not supported.

    Args:
      routers: Router parameters (see :func:`init_routers`), a nested dict by layer path.
      task_vectors: Stacked task vectors of the upscaled layers, a nested dict by layer
        path of ``{"kernel": [T, d, e], "bias": [T, e]}`` (see :func:`wemoe_upscale`).
      batch_reduce: Average the routing weights over all rows of each call's input (one
        weight matrix per call, as FusionBench does while training) instead of routing
        every row on its own.

    Yields:
      Nothing; apply the model inside the ``with`` block.

    Raises:
      ValueError: if ``routers`` and ``task_vectors`` disagree (layers, ``T``, input size);
        the message names the layer path.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, fusionjax as fj
      >>> model = nn.Dense(2)
      >>> base = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
      >>> fts = [jax.tree.map(lambda p, i=i: p + i, base) for i in (1.0, 2.0)]
      >>> tvs = {"kernel": jnp.stack([jnp.ones((3, 2)), 2 * jnp.ones((3, 2))]),
      ...        "bias": jnp.stack([jnp.ones(2), 2 * jnp.ones(2)])}
      >>> routers = fj.learned.init_routers(jax.random.key(1), tvs, init=0.5)
      >>> with fj.learned.wemoe_apply(routers, tvs):
      ...     y = model.apply({"params": base}, jnp.ones((4, 3)))
      >>> ta = fj.merge(base, fts, fj.merging.task_arithmetic(scaling=0.5))
      >>> bool(jnp.allclose(y, model.apply({"params": ta}, jnp.ones((4, 3)))))
      True

      Here the model is one ``nn.Dense`` at the root, so its layer path is ``()`` and
      ``tvs``/``routers`` hold that layer's entry directly.

    References:
      Tang et al, `Merging Multi-Task Models via Weight-Ensembling Mixture of Experts
      <https://arxiv.org/abs/2402.00433>`_, ICML 2024
    """
    table = _layer_table(routers, task_vectors)
    with nn.intercept_methods(_dense_interceptor(table, bool(batch_reduce))):
        yield


def _discover(logits_fn: LogitsFn, params: Params, examples: Sequence[Any]) -> dict:
    """``{module path: module}`` of every linen module called by ``logits_fn``, any task."""
    found: dict[LayerPath, Any] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            found.setdefault(tuple(context.module.path), context.module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        for t, x in enumerate(examples):
            one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + np.shape(a)[1:], a.dtype), x)
            jax.eval_shape(lambda p, x, t=t: logits_fn(p, t, x), params, one)
    return found


def _as_path(layer: Any) -> LayerPath:
    if isinstance(layer, str):
        return tuple(layer.split("/"))
    if isinstance(layer, (tuple, list)) and all(isinstance(k, str) for k in layer):
        return tuple(layer)
    raise TypeError(
        "layers must be a list of module paths (a tuple of names such as ('Dense_1',), or a "
        f"string 'Encoder_0/Dense_1'), or a predicate; got the entry {layer!r}."
    )


def _select_layers(layers: Layers, modules: dict, params: Params) -> list[LayerPath]:
    dense = [p for p, m in modules.items() if isinstance(m, nn.Dense)]
    names = [_fmt(p) for p in dense]
    if layers is None:
        chosen = dense
    elif callable(layers):
        chosen = [p for p in dense if layers(p)]
    else:
        if isinstance(layers, str):
            raise TypeError(
                f"layers must be a list of module paths, got the string {layers!r}; "
                f"write [{layers!r}]."
            )
        chosen = []
        for layer in layers:
            path = _as_path(layer)
            if path not in modules:
                what = (
                    "which logits_fn never calls"
                    if _get(params, path) is not None
                    else "which is not a module of the model"
                )
                raise ValueError(
                    f"layers names {_fmt(path)}, {what}; the nn.Dense layers logits_fn calls "
                    f"are {names}."
                )
            if not isinstance(modules[path], nn.Dense):
                raise ValueError(
                    f"layers names {_fmt(path)}, a {type(modules[path]).__name__}; WEMoE "
                    f"upscales nn.Dense layers only: {names}."
                )
            if path not in chosen:
                chosen.append(path)
    if not chosen:
        raise ValueError(f"no layer to upscale: the nn.Dense layers logits_fn calls are {names}.")
    for path in chosen:
        kernel = _get(params, path + ("kernel",))
        if kernel is None or np.ndim(kernel) != 2:
            raise ValueError(
                f"the nn.Dense at {_fmt(path)} needs a 2-D params{_fmt(path)}['kernel'], got "
                f"{'none' if kernel is None else np.shape(kernel)}."
            )
    return chosen


def wemoe_upscale(
    base: Params,
    finetuned: Sequence[Params],
    logits_fn: LogitsFn,
    examples: Sequence[Any],
    *,
    layers: Layers = None,
    scaling: ArrayLike = 0.3,
) -> tuple[Params, Stacked, tuple[LayerPath, ...]]:
    r"""Splits a model into the statically merged backbone and the upscaled layers' task vectors.

    Every parameter outside the upscaled layers is merged by task arithmetic,
    :math:`\theta_0 + \lambda\sum_k\tau_k`; the upscaled layers keep :math:`W_0, b_0`
    (the base model's) in the backbone and their task vectors are returned stacked.

    Args:
      base: Base (pretrained) parameters :math:`\theta_0`, the ``params`` collection of a
        flax linen model.
      finetuned: Fine-tuned models, one per task, with the structure of ``base``.
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]``, applying the model with
        ``model.apply({"params": params}, ...)``.
      examples: One input (batch) per task, ``[n_t, ...]``; only shapes and dtypes are
        used, to trace ``logits_fn`` and find the ``nn.Dense`` layers it calls.
      layers: Which ``nn.Dense`` layers to upscale: ``None`` for every one, a list of
        module paths (``[("Dense_1",)]``, ``["Dense_1", "Dense_2"]``, ``"Enc_0/Dense_1"``)
        or a predicate ``layers(path) -> bool`` over the ``nn.Dense`` paths.
      scaling: Task-arithmetic :math:`\lambda` of the other parameters (0.3 in the paper).

    Returns:
      ``(backbone, task_vectors, layers)``: the backbone parameters, a nested dict by layer
      path of stacked task vectors ``{"kernel": [T, d, e], "bias": [T, e]}``, and the
      upscaled layer paths (in call order, or in the order ``layers`` gives).

    Raises:
      ValueError: if ``finetuned`` is empty or differs from ``base`` (the path is named),
        if a named layer does not exist, is not an ``nn.Dense`` or is never called by
        ``logits_fn``, or ``examples`` has not one entry per model.
    """
    validation.check_models(base, finetuned)
    if not isinstance(examples, (list, tuple)) or len(examples) != len(finetuned):
        got = len(examples) if isinstance(examples, (list, tuple)) else type(examples).__name__
        raise ValueError(
            f"examples must be a list with one input batch per task ({len(finetuned)}), got {got}."
        )
    modules = _discover(logits_fn, base, examples)
    paths = _select_layers(layers, modules, base)
    merger = _task_arithmetic(scaling) if isinstance(scaling, (int, float)) else None
    merger = _linear.task_arithmetic(scaling=scaling) if merger is None else merger
    backbone = merge(base, list(finetuned), merger)
    tvs = []
    for path in paths:
        layer = {k: v for k, v in _get(base, path).items() if k in ("kernel", "bias")}
        fts = [{k: _get(ft, path)[k] for k in layer} for ft in finetuned]
        tvs.append((path, _coefficients.stacked_task_vectors(layer, fts)))
        backbone = _replace(backbone, path, _replace_leaves(_get(backbone, path), layer))
    return backbone, _nest(tvs), tuple(paths)


def wemoe_loss(
    routers: Routers,
    batches: Sequence[Any] | Mapping[int, Any],
    *,
    backbone: Params,
    task_vectors: Stacked,
    logits_fn: LogitsFn,
    batch_reduce: bool = False,
) -> jax.Array:
    r"""WEMoE's test-time objective: prediction entropy of the MoE model, summed over tasks.

    .. math::
      \mathcal{L}(\phi) = \sum_t \frac{1}{|B_t|}\sum_{x\in B_t}
      H\big(\mathrm{softmax}\, f_t(x;\ \theta_{\text{backbone}}, \{r_\phi, \tau\})\big)

    The same objective as :func:`fusionjax.learned.adamerging_loss`, differentiable in the
    router parameters :math:`\phi` only.

    Args:
      routers: Router parameters (differentiated).
      batches: Unlabeled inputs, a list with one batch per task or ``{task_index: batch}``.
      backbone: The backbone parameters from :func:`wemoe_upscale`.
      task_vectors: Stacked task vectors of the upscaled layers (held fixed).
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]``.
      batch_reduce: Route each task's batch with its mean routing weights (see
        :func:`wemoe_apply`).

    Returns:
      The scalar objective.

    References:
      Tang et al, `Merging Multi-Task Models via Weight-Ensembling Mixture of Experts
      <https://arxiv.org/abs/2402.00433>`_, ICML 2024
    """
    items = task_batches(batches)
    total = jnp.zeros((), jnp.float32)
    with wemoe_apply(routers, task_vectors, batch_reduce=batch_reduce):
        for t, x in items:
            logits = logits_fn(backbone, t, x).astype(jnp.float32)
            total = total + jnp.mean(entropy(logits))
    return total


class WEMoEOutput(NamedTuple):
    r"""The result of :func:`wemoe`.

    Attributes:
      routers: The trained routers, a nested dict by layer path.
      backbone: The parameters the model is applied with: task arithmetic
        :math:`\theta_0 + \lambda\sum_k\tau_k` everywhere except the upscaled layers, which
        hold :math:`W_0, b_0`. Alone (outside :func:`wemoe_apply`) it is *not* the merged
        model.
      task_vectors: Stacked task vectors of the upscaled layers, a nested dict by layer
        path of ``{"kernel": [T, d, e], "bias": [T, e]}``; its paths are the upscaled layers.
      losses: The objective at every step (before that step's update), ``[steps]``.

    A pytree of arrays: pass it whole to a jitted function.
    """

    routers: Routers
    backbone: Params
    task_vectors: Stacked
    losses: np.ndarray


def wemoe_logits(
    result: WEMoEOutput, logits_fn: LogitsFn, task_index: int, x: ArrayLike
) -> jax.Array:
    """Logits of the WEMoE model: ``logits_fn(result.backbone, task_index, x)`` with MoE layers.

    Args:
      result: A :class:`WEMoEOutput` (from :func:`wemoe`).
      logits_fn: The ``logits_fn`` it was trained with.
      task_index: Which task's head.
      x: Inputs, ``[n, ...]``; every example (and token) is routed on its own.

    Returns:
      ``[n, C]`` logits. Jit-friendly: close over ``logits_fn`` and ``task_index``, pass
      ``result`` (a pytree) and ``x`` as arguments.
    """
    with wemoe_apply(result.routers, result.task_vectors):
        return logits_fn(result.backbone, task_index, x)


def _step(logits_fn, optimizer, batch_size, batch_reduce, s, routers, opt_state, *args):
    key, backbone, tvs, data = args
    batches = _loop.sample_batches(jax.random.fold_in(key, s), data, batch_size)
    loss, grads = jax.value_and_grad(wemoe_loss)(
        routers, batches, backbone=backbone, task_vectors=tvs, logits_fn=logits_fn,
        batch_reduce=batch_reduce,
    )  # fmt: skip
    updates, opt_state = optimizer.update(grads, opt_state, routers)
    return optax.apply_updates(routers, updates), opt_state, loss


@functools.lru_cache(maxsize=16)
def _task_arithmetic(scaling: float):
    return _linear.task_arithmetic(scaling=scaling)  # one object: merge compiles per merger


def wemoe(
    base: Params,
    finetuned: Sequence[Params],
    unlabeled: Sequence[Any],
    logits_fn: LogitsFn,
    *,
    layers: Layers = None,
    init: ArrayLike = 0.3,
    scaling: ArrayLike = 0.3,
    hidden: int | None = None,
    steps: int = 1000,
    learning_rate: float = 1e-4,
    batch_size: int = 16,
    batch_reduce: bool = True,
    optimizer: optax.GradientTransformation | None = None,
    key: PRNGKey | None = None,
    progress: Any = None,
    jit: bool = True,
    chunk: int = 50,
) -> WEMoEOutput:
    r"""WEMoE: upscale dense layers to weight-ensembling MoEs and train their routers at test time.

    Upscales the selected ``nn.Dense`` layers (:func:`wemoe_upscale`: task arithmetic
    elsewhere), initialises the routers to task arithmetic (:func:`init_routers`), then
    minimises :func:`wemoe_loss`, the summed prediction entropy of each task's unlabeled
    batch, over the routers only. Defaults are FusionBench's WEMoE configuration: Adam,
    learning rate 1e-4, 1000 steps of 16 unlabeled examples per task, routers with two
    layers of the input's width starting at 0.3, and, in training only, the routing
    weights averaged over each task's batch (``batch_reduce``); the trained model
    (:func:`wemoe_logits`) routes every example and token on its own.

    Step :math:`s` draws its batches with
    ``sample_batches(jax.random.fold_in(key_batches, s), unlabeled, batch_size)`` where
    ``key_init, key_batches = jax.random.split(key)`` (``key_init`` initialises the
    routers). The compiled loop runs ``chunk`` steps per call in a ``lax.fori_loop``; the
    backbone, task vectors and data are arguments of the compiled function.

    Args:
      base: Base parameters :math:`\theta_0` (a flax linen ``params`` collection).
      finetuned: Fine-tuned models, one per task, with the structure of ``base``.
      unlabeled: One pool of unlabeled inputs per task, ``[n_t, ...]`` (task ``t`` is
        position ``t``, the ``task_index`` given to ``logits_fn``).
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]``, applying the model with
        ``model.apply({"params": params}, ...)``.
      layers: Which ``nn.Dense`` layers to upscale (``None``: all); see
        :func:`wemoe_upscale`.
      init: Initial routing weight :math:`\lambda_0` (scalar or ``[T]``).
      scaling: Task-arithmetic :math:`\lambda` of the parameters that are not upscaled.
      hidden: Router hidden width (``None``: the layer's input size).
      steps: Optimizer steps.
      learning_rate: Adam's learning rate (ignored if ``optimizer`` is given).
      batch_size: Unlabeled examples per task per step.
      batch_reduce: Train with the routing weights averaged over each task's batch (one
        weight matrix per task and step: cheaper, FusionBench's default), or route every
        example on its own in training too (``False``).
      optimizer: Any optax optimizer, instead of Adam.
      key: PRNG key of the router initialisation and the batches (default ``key(0)``).
      progress: ``None``, a callable (called with a message per chunk), or a tqdm-like bar
        or class.
      jit: Compile the loop (``False`` runs the same steps eagerly).
      chunk: Steps per compiled call (progress is reported between calls).

    Returns:
      A :class:`WEMoEOutput`; :func:`wemoe_logits` evaluates the model.

    Raises:
      ValueError: if ``finetuned`` is empty or differs from ``base``, a named layer is
        unknown or not an ``nn.Dense``, or ``unlabeled`` has not one pool per task.

    Examples:
      >>> import fusionjax as fj
      >>> from fusionjax import testbed
      >>> tb = testbed.load(seed=0)  # doctest: +SKIP
      >>> res = fj.learned.wemoe(tb.pretrained, tb.finetuned,  # doctest: +SKIP
      ...     [t.x_test for t in tb.tasks], tb.logits)
      >>> logits = fj.learned.wemoe_logits(res, tb.logits, 0, tb.tasks[0].x_test)  # doctest: +SKIP

    References:
      Tang et al, `Merging Multi-Task Models via Weight-Ensembling Mixture of Experts
      <https://arxiv.org/abs/2402.00433>`_, ICML 2024
    """
    validation.check_hparam("steps", steps, lower=0)
    validation.check_hparam("batch_size", batch_size, lower=1)
    validation.check_hparam("chunk", chunk, lower=1)
    validation.check_nonempty(finetuned)
    if not isinstance(unlabeled, (list, tuple)) or len(unlabeled) != len(finetuned):
        got = len(unlabeled) if isinstance(unlabeled, (list, tuple)) else type(unlabeled).__name__
        raise ValueError(
            f"unlabeled must be a list with one pool of inputs per task ({len(finetuned)}), "
            f"got {got}."
        )
    for t, d in enumerate(unlabeled):
        validation.check_examples(d, None, name=f"unlabeled[{t}]")
    key = jax.random.key(0) if key is None else key
    key_init, key_batches = jax.random.split(key)
    backbone, tvs, _ = wemoe_upscale(
        base, finetuned, logits_fn, list(unlabeled), layers=layers, scaling=scaling
    )
    routers = init_routers(key_init, tvs, init=init, hidden=hidden)
    opt = _loop.adam(float(learning_rate)) if optimizer is None else optimizer
    opt = training.standard_promotion(opt)
    opt_state = opt.init(routers)
    data = list(unlabeled)
    step = Partial(_step, logits_fn, opt, int(batch_size), bool(batch_reduce))
    routers, _, losses = training.run_steps(
        step,
        routers,
        opt_state,
        (key_batches, backbone, tvs, data),
        steps=steps,
        jit=jit,
        chunk=chunk,
        progress=progress,
        desc="wemoe",
    )
    return WEMoEOutput(routers=routers, backbone=backbone, task_vectors=tvs, losses=losses)
