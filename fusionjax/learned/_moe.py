r"""WEMoE's layer math, in pure jax (no flax): routers, the MoE dense layer, layer tables.

A weight-ensembling MoE layer computes :math:`y = x\,(W_0 + \sum_k r_k(x)\tau^W_k) + b_0 +
r(x)\,\tau^b` with routing weights :math:`r(x) = \mathrm{ReLU}(xA + a)B + \beta` from a
small router per layer (:func:`routing_weights`, :func:`init_routers`), without ever
building a per-example weight matrix (:func:`moe_dense`). Layers, routers and task vectors
are nested dicts addressed by the layer's module path. :mod:`fusionjax.learned._wemoe`
plugs these into flax linen models.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax._src.base import PRNGKey
from fusionjax._src.base import Stacked

LayerPath = tuple[str, ...]
"""A module path, e.g. ``("Dense_1",)`` or ``("Encoder_0", "Dense_1")``."""
Layers = Sequence[str | LayerPath] | Callable[[LayerPath], bool] | None
Routers = Any
"""A nested dict keyed by layer path, one router ``{"hidden", "output"}`` per layer."""

# Standard deviation of the router's first-layer kernel at initialisation (FusionBench).
ROUTER_INIT_STD = 0.01


def _fmt(path: Sequence[str]) -> str:
    return "".join(f"[{k!r}]" for k in path) or "the root module"


def _add_row(y: jax.Array, row: jax.Array) -> jax.Array:
    """``y [..., e] + row [e]`` with explicit broadcasting (rank promotion may be off)."""
    return y + row.reshape((1,) * (y.ndim - 1) + row.shape)


def routing_weights(router: Params, x: ArrayLike) -> jax.Array:
    r"""The router's routing weights :math:`r(x) = \mathrm{ReLU}(xA + a)B + \beta`.

    A two-layer MLP ``d -> hidden -> T`` applied to every row (token) of ``x``; the
    weights are used as they come out (no softmax), as in the paper.

    Args:
      router: ``{"hidden": {"kernel": [d, h], "bias": [h]}, "output": {"kernel": [h, T],
        "bias": [T]}}``, one entry of :func:`init_routers`.
      x: Inputs of the upscaled layer, ``[..., d]``.

    Returns:
      Routing weights ``[..., T]`` in the router's dtype.

    Examples:
      >>> import jax, jax.numpy as jnp, fusionjax as fj
      >>> tvs = {"dense": {"kernel": jnp.zeros((3, 4, 2)), "bias": jnp.zeros((3, 2))}}
      >>> routers = fj.learned.init_routers(jax.random.key(0), tvs, init=0.3)
      >>> fj.learned.routing_weights(routers["dense"], jnp.ones((5, 4))).shape
      (5, 3)
    """
    return _route(router, jnp.asarray(x))


@jax.jit
def _route(router, x):
    hidden, output = router["hidden"], router["output"]
    h = jnp.dot(x.astype(hidden["kernel"].dtype), hidden["kernel"])
    h = jax.nn.relu(_add_row(h, hidden["bias"]))
    return _add_row(jnp.dot(h, output["kernel"]), output["bias"])


def moe_dense(
    x: ArrayLike,
    routing: ArrayLike,
    kernel: ArrayLike,
    bias: ArrayLike | None,
    task_kernels: ArrayLike,
    task_biases: ArrayLike | None = None,
    *,
    precision: Any = None,
    name: str = "moe_dense",
) -> jax.Array:
    r"""A weight-ensembling dense layer: :math:`x\,(W_0 + \sum_k r_k\tau^W_k) + b_0 + r\,\tau^b`.

    Every row (example or token) of ``x`` has its own routing weights, so its own weight
    matrix; none is ever built. The task-vector part is one matrix product,
    :math:`(r\otimes x)\,\mathrm{vec}(\tau^W)` with :math:`r\otimes x` of shape
    ``[n, T*d]``, costing :math:`n\,T\,d\,e` multiply-adds like :math:`T` dense layers.

    Args:
      x: Inputs ``[..., d]`` (any number of leading axes: batch, tokens).
      routing: Routing weights :math:`r`, ``[..., T]`` with the leading axes of ``x``
        (axes of size 1 broadcast, e.g. ``[n, 1, T]`` routes per example for
        ``[n, L, d]`` tokens), or ``[T]`` for one weighting of every row.
      kernel: :math:`W_0`, ``[d, e]``.
      bias: :math:`b_0`, ``[e]``, or ``None``.
      task_kernels: :math:`\tau^W`, ``[T, d, e]``.
      task_biases: :math:`\tau^b`, ``[T, e]``, or ``None``.
      precision: ``jax.lax.Precision`` of the matrix products (as ``nn.Dense``'s).
      name: How the layer is named in error messages.

    Returns:
      ``[..., e]`` outputs in the promoted dtype of ``x`` and ``kernel``.

    Raises:
      ValueError: if the shapes disagree (the message names ``name``).

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> x, w0 = jnp.ones((2, 3)), jnp.zeros((3, 1))
      >>> tau = jnp.stack([jnp.ones((3, 1)), -jnp.ones((3, 1))])  # T = 2
      >>> r = jnp.array([[1.0, 0.0], [0.5, 0.5]])  # per-example routing
      >>> fj.learned.moe_dense(x, r, w0, None, tau)
      Array([[3.],
             [0.]], dtype=float32)
    """
    x, routing, kernel = jnp.asarray(x), jnp.asarray(routing), jnp.asarray(kernel)
    task_kernels = jnp.asarray(task_kernels)
    if kernel.ndim != 2:
        raise ValueError(f"{name}: kernel must be [d, e], got shape {kernel.shape}.")
    d, e = kernel.shape
    if task_kernels.ndim != 3 or task_kernels.shape[1:] != (d, e):
        raise ValueError(
            f"{name}: task kernels must be [T, {d}, {e}] like the kernel {kernel.shape}, "
            f"got {task_kernels.shape}."
        )
    t = task_kernels.shape[0]
    if x.ndim == 0 or x.shape[-1] != d:
        raise ValueError(f"{name}: inputs must be [..., {d}] for a {d}x{e} kernel, got {x.shape}.")
    lead = x.shape[:-1]
    if routing.ndim == 0 or routing.shape[-1] != t:
        raise ValueError(f"{name}: routing must be [..., {t}] for T = {t}, got {routing.shape}.")
    shared = routing.ndim == 1
    if not shared and not (
        routing.ndim == x.ndim
        and all(a in (1, b) for a, b in zip(routing.shape[:-1], lead, strict=True))
    ):
        raise ValueError(
            f"{name}: routing {routing.shape} does not match the inputs {x.shape}: expected "
            f"{lead + (t,)} (or size-1 axes there), or ({t},)."
        )
    if bias is not None and np.shape(bias) != (e,):
        raise ValueError(f"{name}: bias must be [{e}], got {np.shape(bias)}.")
    if task_biases is not None and np.shape(task_biases) != (t, e):
        raise ValueError(f"{name}: task biases must be [{t}, {e}], got {np.shape(task_biases)}.")

    dt = jnp.promote_types(x.dtype, kernel.dtype)
    cast = [None if a is None else jnp.asarray(a).astype(dt) for a in (bias, task_biases)]
    kernel, task_kernels, routing = kernel.astype(dt), task_kernels.astype(dt), routing.astype(dt)
    rows = x.reshape(math.prod(lead), d).astype(dt)
    if shared:
        y = _shared_rows(rows, routing, kernel, cast[0], task_kernels, cast[1], precision)
    else:
        r = jnp.broadcast_to(routing, lead + (t,)).reshape(rows.shape[0], t)
        y = _routed_rows(rows, r, kernel, cast[0], task_kernels, cast[1], precision)
    return y.reshape(lead + (e,))


# Jitted kernels: one compilation per shape when called eagerly, inlined under jax.jit.
@functools.partial(jax.jit, static_argnums=6)
def _routed_rows(rows, r, kernel, bias, task_kernels, task_biases, precision):
    """``[n, d]`` rows, ``[n, T]`` routing: every row its own weights, one product."""
    n, d = rows.shape
    t, _, e = task_kernels.shape
    y = jnp.dot(rows, kernel, precision=precision)
    # Formulations measured on 2 shared CPU cores (XLA:CPU, f32, T=8, d=e=512, best of 7
    # rounds, ms, forward / forward+backward w.r.t. x and r; n = 16, 128, 540 rows):
    #   this one product [n,T*d] @ [T*d,e]   1.6/2.4   5.9/10.2   20.8/35.7
    #   einsum nd,tde->nte then nt,nte->ne   1.8/6.7   5.5/11.9   17.6/35.3
    #   x @ [d,T*e], weighted sum over T     2.1/3.2   5.5/10.6   16.5/49.4
    #   per-row W(x), vmapped (definition)   3.7/28.7  138/170
    # In a whole training step on the testbed (8 tasks x 16 examples, per-example routing
    # in all three layers) the first three are within noise: 37 / 32 / 34 ms per step.
    mixed = (r[:, :, None] * rows[:, None, :]).reshape(n, t * d)
    y = y + jnp.dot(mixed, task_kernels.reshape(t * d, e), precision=precision)
    if bias is not None:
        y = _add_row(y, bias)
    if task_biases is not None:
        y = y + jnp.dot(r, task_biases, precision=precision)
    return y


@functools.partial(jax.jit, static_argnums=6)
def _shared_rows(rows, r, kernel, bias, task_kernels, task_biases, precision):
    """``[n, d]`` rows, one ``[T]`` routing: build the one merged matrix (T*d*e mult-adds)."""
    w = kernel + jnp.tensordot(r, task_kernels, axes=1, precision=precision)
    y = jnp.dot(rows, w, precision=precision)
    if bias is not None or task_biases is not None:
        b = jnp.zeros((kernel.shape[1],), kernel.dtype) if bias is None else bias
        if task_biases is not None:
            b = b + jnp.dot(r, task_biases, precision=precision)
        y = _add_row(y, b)
    return y


# Nested-dict helpers: layers are addressed by their module path.


def _get(tree: Any, path: Sequence[str]) -> Any:
    node = tree
    for k in path:
        if not isinstance(node, Mapping) or k not in node:
            return None
        node = node[k]
    return node


def _replace(tree: Any, path: Sequence[str], value: Any) -> Any:
    """A copy of the nested mapping ``tree`` with ``tree[path] = value`` (no mutation)."""
    if not path:
        return value
    node = dict(tree)
    node[path[0]] = _replace(tree[path[0]], path[1:], value)
    return type(tree)(node) if not isinstance(tree, dict) else node


def _nest(items: Sequence[tuple[LayerPath, Any]]) -> Any:
    """A nested dict with ``value`` at ``path`` for every item (a root layer is returned as is)."""
    if len(items) == 1 and items[0][0] == ():
        return items[0][1]
    out: dict = {}
    for path, value in items:
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _is_task_vector_layer(node: Any) -> bool:
    return (
        isinstance(node, Mapping) and "kernel" in node and not isinstance(node["kernel"], Mapping)
    )


def _is_router(node: Any) -> bool:
    return isinstance(node, Mapping) and isinstance(node.get("output"), Mapping)


def _walk(tree: Any, is_layer, prefix: LayerPath = ()) -> Iterator[tuple[LayerPath, Any]]:
    """Yields ``(path, node)`` for every layer node of the nested mapping ``tree``."""
    if is_layer(tree):
        yield prefix, tree
        return
    if isinstance(tree, Mapping):
        for k in tree:
            yield from _walk(tree[k], is_layer, prefix + (k,))


def _layer_table(routers: Routers, task_vectors: Stacked) -> dict[LayerPath, tuple]:
    """``{path: (router, task kernels, task biases)}``, checked for consistency."""
    tvs = dict(_walk(task_vectors, _is_task_vector_layer))
    if not tvs:
        raise ValueError(
            "task_vectors holds no layer: expected a nested dict with {'kernel': [T, d, e]} "
            "per upscaled layer (see wemoe_upscale)."
        )
    routers_by_path = dict(_walk(routers, _is_router))
    table = {}
    for path, tv in tvs.items():
        router = routers_by_path.get(path)
        if router is None:
            raise ValueError(f"routers has no router for the upscaled layer {_fmt(path)}.")
        tk, tb = tv["kernel"], tv.get("bias")
        t = np.shape(tk)[0] if np.ndim(tk) == 3 else None
        if t is None:
            raise ValueError(
                f"task_vectors at {_fmt(path)}['kernel'] must be [T, d, e], got {np.shape(tk)}."
            )
        out_kernel = _get(router, ("output", "kernel"))
        hid_kernel = _get(router, ("hidden", "kernel"))
        if out_kernel is None or hid_kernel is None:
            raise ValueError(
                f"the router at {_fmt(path)} must be {{'hidden': {{'kernel', 'bias'}}, "
                f"'output': {{'kernel', 'bias'}}}}, got keys {sorted(router)}."
            )
        if np.shape(out_kernel)[-1] != t:
            raise ValueError(
                f"the router at {_fmt(path)} outputs {np.shape(out_kernel)[-1]} weights but "
                f"the layer has T = {t} task vectors."
            )
        if np.shape(hid_kernel)[0] != np.shape(tk)[1]:
            raise ValueError(
                f"the router at {_fmt(path)} reads inputs of size {np.shape(hid_kernel)[0]} but "
                f"the layer's inputs have size {np.shape(tk)[1]}."
            )
        table[path] = (router, tk, tb)
    extra = [p for p in routers_by_path if p not in tvs]
    if extra:
        raise ValueError(f"routers has a router for {_fmt(extra[0])}, which has no task vectors.")
    return table


def _replace_leaves(node: Mapping, leaves: Mapping) -> Any:
    out = dict(node)
    out.update(leaves)
    return out if isinstance(node, dict) else type(node)(out)


def init_routers(
    key: PRNGKey,
    task_vectors: Stacked,
    *,
    init: ArrayLike = 0.3,
    hidden: int | None = None,
) -> Routers:
    r"""Initial routers, one per upscaled layer, that reproduce task arithmetic.

    Router :math:`r(x) = \mathrm{ReLU}(xA + a)B + \beta` of a layer with input size
    :math:`d` and :math:`T` task vectors: :math:`A \in \mathbb{R}^{d\times h}` drawn from
    :math:`\mathcal{N}(0, 0.01^2)` and :math:`a = 0` (FusionBench), :math:`B = 0` and
    :math:`\beta = \lambda_0` = ``init``, so :math:`r(x) = \lambda_0` for every input and
    the upscaled model starts as task arithmetic with :math:`\lambda = \lambda_0`.
    (FusionBench draws :math:`B` from :math:`\mathcal{N}(0, 0.01^2)`; zero makes the
    start exact. The gradient of :math:`A` is zero at the first step, not after.)

    Args:
      key: PRNG key; a layer's key is ``key`` folded with a hash of its path.
      task_vectors: Stacked task vectors of the upscaled layers (see
        :func:`wemoe_upscale`).
      init: :math:`\lambda_0`, a scalar or one value per task ``[T]``.
      hidden: Hidden width :math:`h`; ``None`` uses the layer's input size :math:`d`
        (the paper's two-layer router).

    Returns:
      A nested dict by layer path of ``{"hidden": {"kernel": [d, h], "bias": [h]},
      "output": {"kernel": [h, T], "bias": [T]}}`` float32 routers.

    Examples:
      >>> import jax, jax.numpy as jnp, fusionjax as fj
      >>> tvs = {"Dense_0": {"kernel": jnp.zeros((8, 4, 2)), "bias": jnp.zeros((8, 2))}}
      >>> r = fj.learned.init_routers(jax.random.key(0), tvs)
      >>> jax.tree.map(jnp.shape, r["Dense_0"]["output"])
      {'bias': (8,), 'kernel': (4, 8)}
    """
    if hidden is not None:
        validation.check_hparam("hidden", hidden, lower=1)
    out = []
    for path, tv in _walk(task_vectors, _is_task_vector_layer):
        tk = tv["kernel"]
        if np.ndim(tk) != 3:
            raise ValueError(
                f"task_vectors at {_fmt(path)}['kernel'] must be [T, d, e], got {np.shape(tk)}."
            )
        t, d = np.shape(tk)[:2]
        h = d if hidden is None else int(hidden)
        start = jnp.asarray(init, jnp.float32)
        if start.ndim > 1 or (start.ndim == 1 and start.shape[0] != t):
            raise ValueError(f"init must be a scalar or have shape ({t},), got {start.shape}.")
        k = jax.random.fold_in(key, zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)
        out.append(
            (
                path,
                {
                    "hidden": {
                        "kernel": ROUTER_INIT_STD * jax.random.normal(k, (d, h), jnp.float32),
                        "bias": jnp.zeros((h,), jnp.float32),
                    },
                    "output": {
                        "kernel": jnp.zeros((h, t), jnp.float32),
                        "bias": jnp.broadcast_to(start, (t,)),
                    },
                },
            )
        )
    if not out:
        raise ValueError("task_vectors holds no layer with a 'kernel' [T, d, e].")
    return _nest(out)
