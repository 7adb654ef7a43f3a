r"""Twin-Merging: a shared expert plus SVD-compressed exclusive knowledge, mixed per input.

Twin-Merging (Lu et al., NeurIPS 2024) splits the knowledge of :math:`T` fine-tuned models
:math:`\theta_t` into a *shared* expert and per-task *exclusive* parts:

.. math::
  \theta_{\text{shared}} = \mathrm{merge}(\theta_0; \theta_1, \dots, \theta_T), \qquad
  \Delta_t = \theta_t - \theta_{\text{shared}},

where the merge is any data-free :class:`fusionjax.Step` (task arithmetic by default,
TIES as in the paper's other variant). Each exclusive matrix (the kernel
:math:`\Delta_t^W\in\mathbb{R}^{d\times e}` of every routed ``nn.Dense``) is compressed by a
rank-:math:`r` truncated SVD, :math:`\Delta_t^W \approx U_t S_t V_t^\top`
(:func:`exclusive_factors`); the exclusive biases are 1-D and kept whole, as the
reference code keeps every 1-D tensor. A router, a small MLP on the shared expert's
features :math:`f(\theta_{\text{shared}}, x)` (the paper's router reads the shared
model's last hidden state), is trained by cross-entropy on a small labeled validation set
to predict which task an input comes from. At inference each input gets its own model

.. math::
  \theta(x) = \theta_{\text{shared}} + \sum_{t=1}^{T} w_t(x)\,\Delta_t, \qquad
  w(x) = \mathrm{softmax}\big(R(f(\theta_{\text{shared}}, x))\big),

and a routed dense layer computes its output for input :math:`h` (a row of :math:`x`'s
hidden states) as

.. math::
  y = h W_{\text{shared}} + b_{\text{shared}}
      + \sum_t w_t(x)\,\big((h U_t) S_t\big) V_t^\top + \sum_t w_t(x)\,\Delta_t^b,

never building a per-input weight matrix (:func:`twin_dense`). With full rank and a
one-hot :math:`w` the model *is* the chosen fine-tuned model.

Flax linen models need no rewriting: :func:`twin_apply` intercepts the routed
``nn.Dense`` calls (their own call computes :math:`hW_{\text{shared}}+b_{\text{shared}}`,
the interceptor adds the exclusive term), as :func:`fusionjax.learned.wemoe_apply` does.
Parameters outside the routed ``nn.Dense`` layers (normalisation scales, embeddings, a
head's parameters when the features function does not call it) keep the shared value:
their exclusive parts are dropped, because mixing them per input would need one
parameter copy per input.

What costs time, and what is done about it: one SVD per routed matrix and task (batched
over tasks, compiled once per matrix shape and rank), the router's training (on features
computed once: the shared expert is fixed, so the loop never runs the model; one compiled
``lax.fori_loop`` per chunk, keyed by the optimizer and shapes, so seeds and models of one
shape share it) and the routed forward, which costs
:math:`O(n\,T\,r\,(d+e))` more than the shared model's per layer instead of the
:math:`O(n\,d\,e)` per input of materialised weights. :func:`twin_features` is compiled
once per static part of the features function (a :class:`jax.tree_util.Partial` has its
arrays passed as arguments).

References:
  Lu et al, `Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging
  <https://arxiv.org/abs/2406.15479>`_, NeurIPS 2024
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from fusionjax._src import keys as keys_lib
from fusionjax._src import pytrees
from fusionjax._src import training
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax._src.base import PRNGKey
from fusionjax._src.base import Step
from fusionjax._src.merge import merge
from fusionjax.learned import _loop
from fusionjax.learned._ensemble import features_of
from fusionjax.learned._moe import LayerPath
from fusionjax.learned._moe import Layers
from fusionjax.learned._moe import _fmt
from fusionjax.learned._moe import _get
from fusionjax.learned._moe import _nest
from fusionjax.learned._moe import _walk
from fusionjax.learned._wemoe import _discover
from fusionjax.learned._wemoe import _select_layers
from fusionjax.logits._features import FeaturesFn
from fusionjax.merging import _linear

Factors = Any
"""A nested dict by layer path of ``{"u": [T, d, r], "s": [T, r], "vt": [T, r, e]}`` plus
``"bias": [T, e]`` where the layer has a bias."""

_TA = _linear.task_arithmetic(scaling=0.3)  # the default shared expert, one object


def _is_factor_layer(node: Any) -> bool:
    return isinstance(node, dict) and "u" in node and not isinstance(node["u"], dict)


@functools.partial(jax.jit, static_argnums=0)
def _layer_factors(rank: int, kernels, kernel, biases, bias):
    """One layer's factors: the stacked differences, their truncated SVD, the bias differences."""
    deltas = jnp.stack([_diff(k, kernel) for k in kernels])
    u, s, vt = jnp.linalg.svd(deltas, full_matrices=False)
    entry = {"u": u[..., :rank], "s": s[..., :rank], "vt": vt[..., :rank, :]}
    if bias is not None:
        entry["bias"] = jnp.stack([_diff(b, bias) for b in biases])
    return entry


def exclusive_factors(
    shared: Params,
    finetuned: Sequence[Params],
    *,
    layers: Sequence[LayerPath],
    rank: int,
) -> Factors:
    r"""Rank-``rank`` SVD factors of each model's exclusive knowledge in the given dense layers.

    For layer :math:`\ell` and task :math:`t`: :math:`\Delta_t = W^\ell_t -
    W^\ell_{\text{shared}} \approx U_t\,\mathrm{diag}(S_t)\,V_t^\top`, the best rank-:math:`r`
    approximation (Eckart-Young) with :math:`r = \min(\text{rank}, d, e)`; the bias
    difference :math:`b^\ell_t - b^\ell_{\text{shared}}` is kept whole. Computed in float32.

    Args:
      shared: The shared expert :math:`\theta_{\text{shared}}`.
      finetuned: The fine-tuned models :math:`\theta_t`, with the structure of ``shared``.
      layers: Module paths of the dense layers, e.g. ``[("Dense_0",), ("Dense_1",)]``;
        each must hold a 2-D ``kernel`` (and optionally a ``bias``).
      rank: Kept singular values per matrix (``r``; :math:`\ge 1`).

    Returns:
      A nested dict by layer path of ``{"u": [T, d, r], "s": [T, r], "vt": [T, r, e]}``
      (and ``"bias": [T, e]``), singular values in descending order.

    Raises:
      ValueError: if ``finetuned`` is empty or differs from ``shared``, a layer has no 2-D
        kernel, or ``rank`` is not a positive integer (TypeError for a non-integer).

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> shared = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
      >>> ft = {"dense": {"kernel": jnp.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]),
      ...                 "bias": jnp.ones(2)}}
      >>> f = fj.learned.exclusive_factors(shared, [ft], layers=[("dense",)], rank=1)
      >>> f["dense"]["u"].shape, f["dense"]["s"].tolist()
      ((1, 3, 1), [[2.0]])
    """
    rank = validation.check_int("rank", rank, lower=1)
    validation.check_models(shared, finetuned)
    if not layers:
        raise ValueError("layers is empty: name at least one dense layer to compress.")
    items = []
    for layer in layers:
        path = tuple(layer)
        node = _get(shared, path)
        kernel = None if node is None else _get(node, ("kernel",))
        if kernel is None or np.ndim(kernel) != 2:
            raise ValueError(
                f"layers names {_fmt(path)}, which needs a 2-D params{_fmt(path)}['kernel']; "
                f"got {'none' if kernel is None else np.shape(kernel)}."
            )
        d, e = np.shape(kernel)
        bias = _get(node, ("bias",))
        biases = None if bias is None else tuple(_get(ft, path)["bias"] for ft in finetuned)
        kernels = tuple(_get(ft, path)["kernel"] for ft in finetuned)
        entry = _layer_factors(min(rank, d, e), kernels, kernel, biases, bias)
        items.append((path, entry))
    return _nest(items)


def _diff(a: ArrayLike, b: ArrayLike) -> jax.Array:
    return jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)


def _check_weights(weights: jax.Array, num_tasks: int, rows: int, where: str) -> jax.Array:
    w = jnp.asarray(weights)
    if w.ndim != 2 or w.shape[1] != num_tasks:
        raise ValueError(
            f"weights must be [n, T] with T = {num_tasks} (one weight per exclusive part), got "
            f"shape {w.shape} ({where})."
        )
    if w.shape[0] != rows:
        raise ValueError(
            f"weights has {w.shape[0]} rows but {where} gets inputs with {rows} examples on "
            "their leading axis: give one weight vector per input."
        )
    return w


def _check_factor(entry: Any, where: str) -> tuple[int, int, int, int]:
    u, s, vt = entry["u"], entry["s"], entry["vt"]
    if np.ndim(u) != 3 or np.ndim(s) != 2 or np.ndim(vt) != 3:
        raise ValueError(
            f"factors at {where} must be u [T, d, r], s [T, r], vt [T, r, e]; got shapes "
            f"{np.shape(u)}, {np.shape(s)}, {np.shape(vt)}."
        )
    t, d, r = np.shape(u)
    if np.shape(s) != (t, r) or np.shape(vt)[:2] != (t, r):
        raise ValueError(
            f"factors at {where} disagree: u {np.shape(u)}, s {np.shape(s)}, vt {np.shape(vt)} "
            "(expected [T, d, r], [T, r], [T, r, e])."
        )
    e = np.shape(vt)[2]
    bias = entry.get("bias")
    if bias is not None and np.shape(bias) != (t, e):
        raise ValueError(
            f"factors at {where}: bias must be [T, e] = {(t, e)}, got {np.shape(bias)}."
        )
    return t, d, r, e


def _exclusive_term(x: jax.Array, w: jax.Array, entry: Any, precision) -> jax.Array:
    r"""The exclusive term :math:`\sum_t w_t((xU_t)S_t)V_t^\top + \sum_t w_t\Delta^b_t`."""
    u, s, vt = entry["u"], entry["s"], entry["vt"]
    dtype = jnp.promote_types(x.dtype, u.dtype)
    n, d = x.shape[0], x.shape[-1]
    middle = x.shape[1:-1]
    rows = x.reshape(n, -1, d).astype(dtype)  # [n, m, d]
    w = w.astype(dtype)
    proj = jnp.einsum("nmd,tdr->nmtr", rows, u.astype(dtype), precision=precision)
    scale = s.astype(dtype)[None, None] * w[:, None, :, None]  # [n, 1, T, r]
    out = jnp.einsum("nmtr,tre->nme", proj * scale, vt.astype(dtype), precision=precision)
    bias = entry.get("bias")
    if bias is not None:
        out = out + jnp.dot(w, bias.astype(dtype), precision=precision)[:, None, :]
    return out.reshape((n,) + middle + (out.shape[-1],))


def twin_dense(
    x: ArrayLike,
    weights: ArrayLike,
    kernel: ArrayLike,
    bias: ArrayLike | None,
    factors: Any,
    *,
    precision: Any = None,
) -> jax.Array:
    r"""A Twin-Merging dense layer: the shared layer plus the weighted low-rank exclusive parts.

    .. math::
      y_i = x_i W + b + \sum_t w_{it}\,\big((x_i U_t)\,\mathrm{diag}(S_t)\big) V_t^\top
            + \sum_t w_{it}\,\Delta^b_t,

    i.e. :math:`x_i\,(W + \sum_t w_{it}U_tS_tV_t^\top) + b + \sum_t w_{it}\Delta^b_t`
    computed without any per-input weight matrix: :math:`O(n\,T\,r\,(d+e))` extra work.

    Args:
      x: Inputs ``[n, ..., d]``; all rows of example ``i`` (tokens) use its weights.
      weights: Per-input weights ``[n, T]`` (e.g. the router's softmax).
      kernel: The shared kernel :math:`W` ``[d, e]``.
      bias: The shared bias :math:`b` ``[e]``, or ``None``.
      factors: One layer's entry of :func:`exclusive_factors`: ``{"u": [T, d, r],
        "s": [T, r], "vt": [T, r, e]}`` and optionally ``"bias": [T, e]``.
      precision: ``jax.lax.Precision`` of the products.

    Returns:
      ``[n, ..., e]`` outputs.

    Raises:
      ValueError: if the shapes of ``x``, ``weights``, ``kernel`` and ``factors`` disagree.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> f = {"u": jnp.ones((2, 3, 1)), "s": jnp.ones((2, 1)), "vt": jnp.ones((2, 1, 2))}
      >>> fj.learned.twin_dense(jnp.ones((1, 3)), jnp.array([[1.0, 0.0]]),
      ...                       jnp.zeros((3, 2)), None, f)
      Array([[3., 3.]], dtype=float32)
    """
    x = jnp.asarray(x)
    kernel = jnp.asarray(kernel)
    t, d, _, e = _check_factor(factors, "twin_dense")
    if x.ndim < 2 or x.shape[-1] != d or kernel.shape != (d, e):
        raise ValueError(
            f"x must be [n, ..., d] and kernel [d, e] with the factors' d = {d}, e = {e}; got "
            f"x {x.shape}, kernel {kernel.shape}."
        )
    if bias is not None and np.shape(bias) != (e,):
        raise ValueError(f"bias must be [e] = ({e},), got {np.shape(bias)}.")
    w = _check_weights(weights, t, x.shape[0], "twin_dense")
    y = jnp.einsum("...d,de->...e", x, kernel, precision=precision)
    if bias is not None:
        b = jnp.asarray(bias)
        y = y + b.reshape((1,) * (y.ndim - 1) + b.shape)
    return y + _exclusive_term(x, w, factors, precision).astype(y.dtype)


def _factor_table(factors: Factors) -> dict[LayerPath, Any]:
    table = dict(_walk(factors, _is_factor_layer))
    if not table:
        raise ValueError(
            "factors holds no layer: expected a nested dict with {'u', 's', 'vt'} per routed "
            "layer (see exclusive_factors)."
        )
    sizes = {p: _check_factor(entry, _fmt(p))[0] for p, entry in table.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"factors have different numbers of tasks T per layer: {sizes}.")
    return table


def _twin_interceptor(table: dict[LayerPath, Any], weights: jax.Array):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, nn.Dense):
            return next_fun(*args, **kwargs)
        entry = table.get(tuple(module.path))
        if entry is None:
            return next_fun(*args, **kwargs)
        where = f"the routed layer {_fmt(module.path)}"
        inputs = jnp.asarray(args[0] if args else kwargs["inputs"])
        _, d, _, e = _check_factor(entry, where)
        if inputs.ndim < 2 or inputs.shape[-1] != d:
            raise ValueError(
                f"{where} gets inputs of shape {inputs.shape}; its factors need [n, ..., {d}]."
            )
        w = _check_weights(weights, entry["u"].shape[0], inputs.shape[0], where)
        y = next_fun(*args, **kwargs)  # the shared layer: x W_shared + b_shared
        if y.shape[-1] != e:
            raise ValueError(f"{where} outputs {y.shape[-1]} features; its factors have e = {e}.")
        return y + _exclusive_term(inputs, w, entry, module.precision).astype(y.dtype)

    return intercept


@contextlib.contextmanager
def twin_apply(factors: Factors, weights: ArrayLike) -> Iterator[None]:
    r"""Context in which the routed ``nn.Dense`` layers of flax linen models are Twin layers.

    Inside the context every call of an ``nn.Dense`` whose module path has an entry in
    ``factors`` returns its own output (the parameters it is applied with, the shared
    expert's) plus the weighted exclusive term of :func:`twin_dense`, with row ``i`` of
    ``weights`` for example ``i``. Works under :func:`jax.jit`, :func:`jax.grad` and
    :func:`jax.vmap` (it acts while the model is traced).

    Args:
      factors: Exclusive factors by layer path (:func:`exclusive_factors`).
      weights: Per-input weights ``[n, T]``; every routed layer must receive inputs with
        ``n`` examples on their leading axis.

    Yields:
      Nothing; apply the model inside the ``with`` block.

    Raises:
      ValueError: if ``factors`` is malformed, or (when a routed layer runs) the weights'
        shape does not fit its inputs; the message names the layer.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, fusionjax as fj
      >>> model = nn.Dense(2)
      >>> shared = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
      >>> ft = jax.tree.map(lambda p: p + 1.0, shared)
      >>> f = fj.learned.exclusive_factors(shared, [ft], layers=[()], rank=2)
      >>> with fj.learned.twin_apply(f, jnp.ones((4, 1))):
      ...     y = model.apply({"params": shared}, jnp.ones((4, 3)))
      >>> bool(jnp.allclose(y, model.apply({"params": ft}, jnp.ones((4, 3))), atol=1e-5))
      True

      Here the model is one ``nn.Dense`` at the root, so its layer path is ``()``.

    References:
      Lu et al, `Twin-Merging <https://arxiv.org/abs/2406.15479>`_, NeurIPS 2024
    """
    table = _factor_table(factors)
    w = jnp.asarray(weights)
    if w.ndim != 2:
        raise ValueError(f"weights must be [n, T], got shape {w.shape}.")

    with nn.intercept_methods(_twin_interceptor(table, w)):
        yield


# The router: a two-layer MLP on standardised shared-expert features.


def _init_router(key: PRNGKey, features: np.ndarray, num_tasks: int, hidden: int) -> Params:
    """He-normal first layer, zero output layer (uniform routing at the start)."""
    d = features.shape[-1]
    kernel = jax.random.normal(key, (d, hidden), jnp.float32) * np.float32(np.sqrt(2.0 / d))
    zeros = np.zeros  # NumPy: no compilation per shape for the constant parts
    return {
        "mean": jnp.asarray(features.mean(axis=0), jnp.float32),
        "scale": jnp.asarray(features.std(axis=0) + 1e-6, jnp.float32),
        "hidden": {"kernel": kernel, "bias": jnp.asarray(zeros((hidden,), np.float32))},
        "output": {
            "kernel": jnp.asarray(zeros((hidden, num_tasks), np.float32)),
            "bias": jnp.asarray(zeros((num_tasks,), np.float32)),
        },
    }


def _router_logits(router: Params, features: jax.Array) -> jax.Array:
    mean = jax.lax.stop_gradient(router["mean"])
    scale = jax.lax.stop_gradient(router["scale"])
    z = (features.astype(jnp.float32) - mean[None]) / scale[None]
    hidden, output = router["hidden"], router["output"]
    h = jax.nn.leaky_relu(jnp.dot(z, hidden["kernel"]) + hidden["bias"][None])
    return jnp.dot(h, output["kernel"]) + output["bias"][None]


def _router_loss(router: Params, features: jax.Array, labels: jax.Array) -> jax.Array:
    logits = _router_logits(router, features)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _router_step(optimizer, batch_size, s, router, opt_state, key, features, labels):
    if batch_size is not None:
        idx = jax.random.randint(jax.random.fold_in(key, s), (batch_size,), 0, labels.shape[0])
        features, labels = features[idx], labels[idx]
    loss, grads = jax.value_and_grad(_router_loss)(router, features, labels)
    updates, opt_state = optimizer.update(grads, opt_state, router)
    return optax.apply_updates(router, updates), opt_state, loss


class TwinMergingOutput(NamedTuple):
    r"""The result of :func:`twin_merging`.

    Attributes:
      shared: The shared expert :math:`\theta_{\text{shared}}` (a full parameter tree; the
        routed layers hold the shared kernels and biases).
      factors: The exclusive factors by routed layer path (:func:`exclusive_factors`).
      router: The router's parameters: ``{"mean": [d], "scale": [d]}`` (the
        standardisation of the features, fixed) and ``{"hidden", "output"}`` dense layers
        ``d -> h -> T``.
      losses: The router's cross-entropy at every step (before that step's update),
        ``[steps]``.

    A pytree of arrays: pass it whole to a jitted function.
    """

    shared: Params
    factors: Factors
    router: Params
    losses: np.ndarray


def twin_weights(result: TwinMergingOutput, features_fn: FeaturesFn, x: ArrayLike) -> jax.Array:
    r"""The routing weights :math:`w(x) = \mathrm{softmax}(R(f(\theta_{\text{shared}}, x)))`.

    Compiled once per static part of ``features_fn`` and shapes (see :func:`twin_features`).

    Args:
      result: A :class:`TwinMergingOutput`.
      features_fn: The ``features_fn(params, x) -> [n, d]`` it was trained with.
      x: Inputs ``[n, ...]``.

    Returns:
      ``[n, T]`` weights on the simplex.
    """
    dynamic, static = pytrees.jit_partition(features_fn)
    return _twin_weights_jit(static, dynamic, result, x)


def _weights(result, features_fn, x):
    feats = features_fn(result.shared, x)
    return jax.nn.softmax(_router_logits(result.router, feats), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _twin_weights_jit(static, dynamic, result, x):
    return _weights(result, pytrees.jit_combine(dynamic, static), x)


def _routed_features(result, features_fn, x):
    with twin_apply(result.factors, _weights(result, features_fn, x)):
        return features_fn(result.shared, x)


def twin_features(result: TwinMergingOutput, features_fn: FeaturesFn, x: ArrayLike) -> jax.Array:
    r"""Features of the Twin-Merged model :math:`f(\theta(x_i), x_i)`, one model per input.

    Routes every input (:func:`twin_weights`), then runs ``features_fn`` with the shared
    expert inside :func:`twin_apply`. Compiled once per static part of ``features_fn``
    (a :class:`jax.tree_util.Partial` has its arrays passed as arguments) and shapes.

    Args:
      result: A :class:`TwinMergingOutput`.
      features_fn: The ``features_fn(params, x) -> [n, d]`` it was trained with.
      x: Inputs ``[n, ...]``.

    Returns:
      ``[n, d]`` features.
    """
    dynamic, static = pytrees.jit_partition(features_fn)
    return _twin_features_jit(static, dynamic, result, x)


@functools.partial(jax.jit, static_argnums=0)
def _twin_features_jit(static, dynamic, result, x):
    return _routed_features(result, pytrees.jit_combine(dynamic, static), x)


def twin_logits(
    result: TwinMergingOutput,
    logits_fn: Any,
    task_index: int,
    x: ArrayLike,
    *,
    features_fn: FeaturesFn,
) -> jax.Array:
    r"""Logits of the Twin-Merged model: ``logits_fn(shared, task_index, x)`` with routed layers.

    Each input is routed on its own (:func:`twin_weights`); the routed ``nn.Dense``
    layers that ``logits_fn`` calls add their weighted exclusive terms (:func:`twin_apply`).
    Not compiled by itself: call it inside :func:`jax.jit` (eagerly, flax runs op by op).

    Args:
      result: A :class:`TwinMergingOutput`.
      logits_fn: ``logits_fn(params, task_index, x) -> [n, C]``, applying the model with
        ``model.apply({"params": params}, ...)``.
      task_index: Which task's head.
      x: Inputs ``[n, ...]``.
      features_fn: The ``features_fn(params, x) -> [n, d]`` the router was trained on.

    Returns:
      ``[n, C]`` logits. Jit-friendly: close over the functions and ``task_index``, pass
      ``result`` (a pytree) and ``x`` as arguments.

    Examples:
      >>> import fusionjax as fj
      >>> from fusionjax import testbed
      >>> tb = testbed.load(seed=0)  # doctest: +SKIP
      >>> data = [t.x_train[200:300] for t in tb.tasks[:4]]  # doctest: +SKIP
      >>> res = fj.learned.twin_merging(tb.pretrained, tb.finetuned[:4], data,  # doctest: +SKIP
      ...     tb.features, key=jax.random.key(0))
      >>> fj.learned.twin_logits(res, tb.logits, 0, tb.tasks[0].x_test,  # doctest: +SKIP
      ...     features_fn=tb.features)
    """
    with twin_apply(result.factors, _weights(result, features_fn, x)):
        return logits_fn(result.shared, task_index, x)


def twin_merging(
    pretrained: Params,
    finetuned: Sequence[Params],
    task_inputs: Sequence[Any],
    features_fn: FeaturesFn,
    *,
    shared: Step = _TA,
    rank: int = 16,
    layers: Layers = None,
    hidden: int | None = None,
    steps: int = 300,
    learning_rate: float = 1e-3,
    batch_size: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
    key: PRNGKey | None = None,
    progress: Any = None,
    jit: bool = True,
    chunk: int = 100,
) -> TwinMergingOutput:
    r"""Twin-Merging: shared expert, rank-``rank`` exclusive factors, and a trained router.

    1. :math:`\theta_{\text{shared}}` = ``fj.merge(pretrained, finetuned, shared)``.
    2. :func:`exclusive_factors` of :math:`\theta_t - \theta_{\text{shared}}` in the routed
       ``nn.Dense`` layers (kernels by truncated SVD, biases whole; other parameters keep
       the shared value).
    3. The router :math:`R`, ``d -> hidden -> T`` with a leaky ReLU on standardised
       features :math:`f(\theta_{\text{shared}}, x)` (the paper's router MLP, without its
       batch norm and dropout), trained by Adam on the cross-entropy of the task index:
       an input of ``task_inputs[t]`` has label ``t``. The features are computed once.

    The router's data are labeled by task only (its inputs' own labels are not used); the
    paper trains it on a validation split. Step :math:`s` uses every example, or with
    ``batch_size`` draws ``batch_size`` of them with
    ``jax.random.fold_in(key_batches, s)``, where ``key_merge, key_init, key_batches =
    jax.random.split(key, 3)`` (``key_merge`` goes to a random ``shared`` step such as
    DARE).

    Args:
      pretrained: Base parameters :math:`\theta_0` (a flax linen ``params`` collection).
      finetuned: Fine-tuned models :math:`\theta_t`, one per task.
      task_inputs: One pool of inputs ``[n_t, ...]`` per task, the router's training data.
      features_fn: ``features_fn(params, x) -> [n, d]``, the model body applied with
        ``model.apply({"params": params}, ...)``: the router reads its output at the
        shared expert, and its ``nn.Dense`` layers are the ones that can be routed.
      shared: The data-free merge of the shared expert, any :class:`fusionjax.Step`
        (default task arithmetic with :math:`\lambda = 0.3`; e.g.
        ``fj.merging.ties(density=0.2, scaling=1.0)``).
      rank: Singular values kept per exclusive matrix.
      layers: Which ``nn.Dense`` layers to route (``None``: every one ``features_fn``
        calls), as in :func:`fusionjax.learned.wemoe_upscale`.
      hidden: Router hidden width (``None``: twice the feature size, as the paper).
      steps: Router optimizer steps.
      learning_rate: Adam's learning rate (ignored if ``optimizer`` is given).
      batch_size: Examples per step, or ``None`` for all of them (full batch).
      optimizer: Any optax optimizer, instead of Adam.
      key: PRNG key (required).
      progress: ``None``, a callable, or a tqdm-like bar or class.
      jit: Compile the router's loop (``False`` runs the same steps eagerly).
      chunk: Steps per compiled call.

    Returns:
      A :class:`TwinMergingOutput`; :func:`twin_logits` and :func:`twin_features`
      evaluate the model, :func:`twin_weights` gives the routing.

    Raises:
      ValueError: if ``finetuned`` is empty or differs from ``pretrained``,
        ``task_inputs`` has not one non-empty pool per task, a named layer is unknown or
        not an ``nn.Dense``, or a hyperparameter is out of range (TypeError for a
        non-integer ``rank``, ``hidden``, ``batch_size``); all before any work.

    References:
      Lu et al, `Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging
      <https://arxiv.org/abs/2406.15479>`_, NeurIPS 2024
    """
    rank = validation.check_int("rank", rank, lower=1)
    if hidden is not None:
        hidden = validation.check_int("hidden", hidden, lower=1)
    if batch_size is not None:
        batch_size = validation.check_int("batch_size", batch_size, lower=1)
    steps = validation.check_int("steps", steps, lower=0)
    validation.check_hparam("learning_rate", learning_rate, lower=0.0, lower_open=True)
    validation.check_hparam("chunk", chunk, lower=1)
    validation.check_models(pretrained, finetuned)
    if not isinstance(task_inputs, (list, tuple)) or len(task_inputs) != len(finetuned):
        got = len(task_inputs) if isinstance(task_inputs, (list, tuple)) else type(task_inputs)
        raise ValueError(
            f"task_inputs must be a list with one pool of inputs per task ({len(finetuned)}), "
            f"got {got}."
        )
    for t, d in enumerate(task_inputs):
        validation.check_examples(d, None, name=f"task_inputs[{t}]")
    key = keys_lib.require_key(key, "twin_merging")
    key_merge, key_init, key_batches = jax.random.split(key, 3)
    as_logits = Partial(_features_as_logits, features_fn)
    paths = _select_layers(layers, _discover(as_logits, pretrained, list(task_inputs)), pretrained)

    shared_params = merge(pretrained, list(finetuned), shared, key=key_merge)
    factors = exclusive_factors(shared_params, finetuned, layers=paths, rank=rank)

    feats = [np.asarray(features_of(features_fn, shared_params, x)) for x in task_inputs]
    labels = np.concatenate([np.full((len(f),), t, np.int32) for t, f in enumerate(feats)])
    feats = np.concatenate(feats).astype(np.float32)
    if feats.ndim != 2:
        raise ValueError(f"features_fn must return [n, d] features, got shape {feats.shape[1:]}.")
    width = 2 * feats.shape[1] if hidden is None else hidden
    router = _init_router(key_init, feats, len(finetuned), width)
    opt = _loop.adam(float(learning_rate)) if optimizer is None else optimizer
    opt = training.standard_promotion(opt)
    step = Partial(_router_step, opt, batch_size)
    router, _, losses = training.run_steps(
        step,
        router,
        opt.init(router),
        (key_batches, jnp.asarray(feats), jnp.asarray(labels)),
        steps=steps,
        jit=jit,
        chunk=chunk,
        progress=progress,
        desc="twin-merging router",
    )
    return TwinMergingOutput(shared=shared_params, factors=factors, router=router, losses=losses)


def _features_as_logits(features_fn, params, task_index, x):
    del task_index
    return features_fn(params, x)
