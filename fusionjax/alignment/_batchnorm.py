r"""Statistics repair after merging: BatchNorm re-estimation and REPAIR.

Interpolating two networks, even aligned ones, shrinks the variance of their hidden
units (Jordan et al. call it *variance collapse*): a unit of the merged model is a
mix of two units that are not perfectly correlated. In a BatchNorm network the
stored running statistics of the endpoints (or their average) then no longer match
the merged model's activations, which can ruin an otherwise good merge.

* :func:`reset_batch_stats` re-estimates every ``nn.BatchNorm``'s statistics of the
  merged model on data: the standard fix after merging BatchNorm networks.
* :func:`repair` is REPAIR for networks without normalisation: it rescales and shifts
  the outputs of the chosen ``nn.Dense``/``nn.Conv`` layers of the merged model so
  that each channel's mean and standard deviation are the interpolation of the
  endpoints' ones, and folds the correction into the layers' kernels and biases.

Both work on flax linen models through :func:`flax.linen.intercept_methods` (no
change to the model's code), with exact moments pooled over all batches rather
than a momentum average.

References:
  Jordan, Sedghi, Saukh, Entezari & Neyshabur, `REPAIR: REnormalizing Permuted
  Activations for Interpolation Repair <https://arxiv.org/abs/2211.08403>`_, ICLR 2023;
  Ioffe & Szegedy, `Batch Normalization <https://arxiv.org/abs/1502.03167>`_, ICML 2015
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Collection
from collections.abc import Iterable
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params

if TYPE_CHECKING:
    import flax.linen as nn


def _linen():
    """``flax.linen``, imported when first needed: importing fusionjax loads no flax."""
    import flax.linen as nn  # pylint: disable=g-import-not-at-top

    return nn


_MOMENTS = "fusionjax_moments"
"""Collection the interceptors sow per-channel moments into."""


def _feature_axes(ndim: int, axis) -> tuple[int, ...]:
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(sorted(int(a) % ndim for a in axes))


def _moments(x: jax.Array, feature_axes: tuple[int, ...]) -> dict:
    """Count, mean and mean square per channel of ``x`` over its non-feature axes."""
    red = tuple(a for a in range(x.ndim) if a not in feature_axes)
    xf = jnp.asarray(x, jnp.float32)
    count = int(np.prod([x.shape[a] for a in red])) if red else 1
    return {
        "count": jnp.asarray(count, jnp.float32),
        "mean": jnp.mean(xf, axis=red),
        "sq": jnp.mean(xf * xf, axis=red),
    }


def _bshape(x: jax.Array, feature_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x.shape[a] if a in feature_axes else 1 for a in range(x.ndim))


def _pool(samples: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and (biased) variance from per-batch moments, in float64 on the host."""
    n = sum(float(s["count"]) for s in samples)
    mean = sum(float(s["count"]) * np.asarray(s["mean"], np.float64) for s in samples) / n
    sq = sum(float(s["count"]) * np.asarray(s["sq"], np.float64) for s in samples) / n
    return mean, np.maximum(sq - mean * mean, 0.0)


def _flatten_sown(tree: Any) -> dict[str, list[dict]]:
    """``{module path: [moments per call]}`` from a sown collection."""
    out: dict[str, list[dict]] = {}

    def walk(node, prefix):
        if isinstance(node, dict) or hasattr(node, "items"):
            for k, v in node.items():
                if k == "moments":
                    out["/".join(prefix)] = list(v)
                else:
                    walk(v, prefix + (str(k),))

    walk(tree, ())
    return out


def _batches(batches: Iterable[Any]) -> list[Any]:
    out = list(batches)
    if not out:
        raise ValueError("batches is empty: at least one batch of inputs is needed.")
    return out


def _check_apply(apply_fn: Callable, variables: Params) -> None:
    if not callable(apply_fn):
        raise TypeError(
            f"apply_fn must be callable (e.g. model.apply), got {type(apply_fn).__name__}."
        )
    if not isinstance(variables, dict) and not hasattr(variables, "items"):
        raise TypeError(
            f"variables must be a flax linen variables dict, got {type(variables).__name__}."
        )


def _bn_interceptor(next_fun, args, kwargs, context):
    """Runs ``nn.BatchNorm`` in train mode and sows the moments of its input."""
    mod = context.module
    if not (isinstance(mod, _linen().BatchNorm) and context.method_name == "__call__"):
        return next_fun(*args, **kwargs)
    if kwargs.get("mask") is not None:
        raise ValueError(f"reset_batch_stats: BatchNorm {'/'.join(mod.path)} got a mask.")
    if mod.axis_name is not None:
        raise ValueError(
            f"reset_batch_stats: BatchNorm {'/'.join(mod.path)} averages over the device "
            f"axis {mod.axis_name!r}; call it without pmap/axis_name."
        )
    x = args[0] if args else kwargs["x"]
    fa = _feature_axes(x.ndim, mod.axis)
    mom = _moments(x, fa)
    mod.sow(_MOMENTS, "moments", mom)
    mean, var = mom["mean"], jnp.maximum(mom["sq"] - mom["mean"] ** 2, 0.0)
    bs = _bshape(x, fa)
    y = (jnp.asarray(x, jnp.float32) - mean.reshape(bs)) * jax.lax.rsqrt(
        var.reshape(bs) + mod.epsilon
    )
    if mod.use_scale:
        y = y * jnp.asarray(mod.get_variable("params", "scale"), jnp.float32).reshape(bs)
    if mod.use_bias:
        y = y + jnp.asarray(mod.get_variable("params", "bias"), jnp.float32).reshape(bs)
    return y.astype(mod.dtype or x.dtype)


def _is_layer(mod: nn.Module) -> bool:
    nn = _linen()
    return isinstance(mod, (nn.Dense, nn.Conv))


def _layer_interceptor(layers: frozenset, targets: dict | None, epsilon: float):
    """Sows the output moments of the chosen layers; renormalises them to ``targets``."""

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        mod = context.module
        path = "/".join(mod.path)
        if not (_is_layer(mod) and context.method_name == "__call__" and path in layers):
            return y
        mom = _moments(y, (y.ndim - 1,))
        mod.sow(_MOMENTS, "moments", mom)
        if targets is None:
            return y
        var = jnp.maximum(mom["sq"] - mom["mean"] ** 2, 0.0)
        mu_t, sd_t = targets[path]
        bs = _bshape(y, (y.ndim - 1,))
        scale = (sd_t * jax.lax.rsqrt(var + epsilon)).reshape(bs)
        y32 = (jnp.asarray(y, jnp.float32) - mom["mean"].reshape(bs)) * scale + mu_t.reshape(bs)
        return y32.astype(y.dtype)

    return interceptor


def _one_pass(apply_fn, layers, epsilon, kwargs_items, variables, batch, targets):
    """One forward pass under the interceptor; returns the sown moments."""
    if layers is None:
        interceptor = _bn_interceptor
    else:
        interceptor = _layer_interceptor(layers, targets, epsilon)
    with _linen().intercept_methods(interceptor):
        _, state = apply_fn(variables, batch, mutable=[_MOMENTS], **dict(kwargs_items))
    return state.get(_MOMENTS, {})


_one_pass_jit = jax.jit(_one_pass, static_argnums=(0, 1, 2, 3))


def _run_passes(
    apply_fn, variables, batches, apply_kwargs, layers=None, targets=None, epsilon=0.0
) -> dict[str, list[dict]]:
    """Runs every batch through ``apply_fn`` intercepted; the sown moments per module path.

    ``layers=None`` intercepts BatchNorms (:func:`reset_batch_stats`); otherwise the
    chosen ``nn.Dense``/``nn.Conv`` outputs are measured (and renormalised to
    ``targets`` if given). Compiled once per model, options and batch shape.
    """
    static = (apply_fn, layers, float(epsilon), tuple(sorted(apply_kwargs.items())))
    try:
        hash(static)
        run = functools.partial(_one_pass_jit, *static)
    except TypeError:  # an unhashable apply_fn or keyword: compile for this call only
        run = jax.jit(functools.partial(_one_pass, *static))
    per_module: dict[str, list[dict]] = {}
    for batch in batches:
        sown = jax.device_get(run(variables, batch, targets))
        for path, calls in _flatten_sown(sown).items():
            per_module.setdefault(path, []).extend(calls)
    return per_module


def _replace_stats(variables: Params, collection: str, stats: dict[str, tuple]) -> Params:
    def leaf(kp, x):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in kp]
        if len(keys) >= 2 and keys[0] == collection and keys[-1] in ("mean", "var"):
            mod = "/".join(keys[1:-1])
            if mod in stats:
                new = stats[mod][0 if keys[-1] == "mean" else 1]
                if np.shape(new) != np.shape(x):
                    raise ValueError(
                        f"{collection}/{mod}/{keys[-1]} has shape {np.shape(x)}, but the layer "
                        f"saw {np.shape(new)} channels."
                    )
                return jnp.asarray(new, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(leaf, variables)


def reset_batch_stats(
    apply_fn: Callable[..., Any],
    variables: Params,
    batches: Iterable[Any],
    *,
    collection: str = "batch_stats",
    **apply_kwargs: Any,
) -> Params:
    r"""Re-estimates every ``nn.BatchNorm``'s running statistics of a (merged) model on data.

    Every batch goes through ``apply_fn(variables, batch, **apply_kwargs)`` with each
    ``nn.BatchNorm`` intercepted: it normalises with the batch's own statistics (train
    mode, so later layers see what they would in training), whatever its
    ``use_running_average``, and records the per-channel count, mean and mean square
    of its input. The new statistics are the exact moments over all batches,
    :math:`\mu = \frac1N\sum x`, :math:`\sigma^2 = \frac1N\sum x^2 - \mu^2` (biased,
    like flax's), not a momentum average: the result does not depend on the order or
    the number of batches beyond the data they hold. Parameters are unchanged.

    Args:
      apply_fn: A linen ``Module.apply`` (or a function taking ``variables``, a batch
        and ``mutable=`` and returning ``(output, state)``), e.g. ``model.apply``.
      variables: The model's variables, with ``params`` and ``collection``.
      batches: An iterable of model inputs; each is passed as the second argument of
        ``apply_fn``. A few thousand examples are plenty. Equal shapes compile once.
      collection: The collection holding the statistics (``mean`` and ``var`` per
        ``nn.BatchNorm``).
      **apply_kwargs: Passed to ``apply_fn`` (e.g. ``train=False``).

    Returns:
      ``variables`` with every intercepted BatchNorm's ``mean`` and ``var`` replaced
      (layers never called keep theirs).

    Raises:
      ValueError: if ``batches`` is empty, no BatchNorm was called, or a BatchNorm uses
        ``axis_name`` (cross-device statistics) or a ``mask``.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
      >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True)])
      >>> x = (3.0 + np.random.default_rng(0).normal(size=(64, 2))).astype(np.float32)
      >>> variables = model.init(jax.random.key(1), x)
      >>> new = reset_batch_stats(model.apply, variables, [x[:32], x[32:]])
      >>> dense = variables["params"]["layers_0"]
      >>> h = x @ dense["kernel"] + dense["bias"][None]
      >>> bool(jnp.allclose(new["batch_stats"]["layers_1"]["mean"], h.mean(0), atol=1e-5))
      True

    References:
      Jordan et al, `REPAIR <https://arxiv.org/abs/2211.08403>`_, ICLR 2023 (resetting
      BatchNorm statistics after interpolation)
    """
    _check_apply(apply_fn, variables)
    batches = _batches(batches)

    per_module = _run_passes(apply_fn, variables, batches, apply_kwargs)
    if not per_module:
        raise ValueError("reset_batch_stats: the model called no nn.BatchNorm.")
    stats = {path: _pool(samples) for path, samples in per_module.items()}
    return _replace_stats(variables, collection, stats)


# -------------------------------------------------------------------------- REPAIR


def _layer_order(apply_fn, variables, batch, apply_kwargs) -> list[str]:
    """Paths of the ``nn.Dense``/``nn.Conv`` modules in call order (one abstract pass)."""
    order: list[str] = []

    def interceptor(next_fun, args, kwargs, context):
        if _is_layer(context.module) and context.method_name == "__call__":
            path = "/".join(context.module.path)
            if path not in order:
                order.append(path)
        return next_fun(*args, **kwargs)

    def run(v, b):
        with _linen().intercept_methods(interceptor):
            return apply_fn(v, b, **apply_kwargs)

    jax.eval_shape(run, variables, batch)
    return order


def repair(
    apply_fn: Callable[..., Any],
    merged: Params,
    endpoints: Sequence[Params],
    batches: Iterable[Any],
    *,
    weights: ArrayLike | None = None,
    layers: Collection[str] | None = None,
    epsilon: float = 1e-5,
    **apply_kwargs: Any,
) -> Params:
    r"""REPAIR: give each merged channel the interpolated mean and std of its endpoints.

    For every chosen layer (``nn.Dense`` or ``nn.Conv``) and output channel :math:`c`,
    the endpoints' output statistics :math:`\mu_k, \sigma_k` are measured on
    ``batches``; the targets are :math:`\mu^* = \sum_k w_k\mu_k` and
    :math:`\sigma^* = \sum_k w_k\sigma_k`. The merged model is then run with each
    layer's output renormalised to the targets (upstream corrections are in place when
    a layer is measured, as with REPAIR's BatchNorm-in-train-mode), its pooled
    statistics :math:`\mu, \sigma` recorded, and the affine correction folded into the
    layer: :math:`W_{\cdot c} \leftarrow W_{\cdot c}\,\sigma^*_c/\sigma_c`,
    :math:`b_c \leftarrow (b_c-\mu_c)\,\sigma^*_c/\sigma_c + \mu^*_c`.

    The endpoints must be aligned to each other (e.g. ``[ref, out.aligned]`` after
    :func:`~fusionjax.alignment.ot_fusion`) and have ``merged``'s structure: channel
    :math:`c` must mean the same unit in all of them.

    Args:
      apply_fn: A linen ``Module.apply`` (see :func:`reset_batch_stats`).
      merged: The merged model's variables, e.g. :attr:`OTFusionOutput.fused`.
      endpoints: The aligned models that were merged.
      batches: An iterable of model inputs, passed as the second argument of ``apply_fn``.
      weights: Interpolation weights of ``endpoints`` ``[K]`` (normalised to sum to one;
        uniform by default). For ``ot_fusion(weight=w)`` use ``[1 - w, w]``.
      layers: Module paths to correct, e.g. ``{"Dense_0", "stage0_block0/conv1"}``. By
        default every ``nn.Dense`` and ``nn.Conv`` except the last one called (the
        output layer).
      epsilon: Added to variances before the square root.
      **apply_kwargs: Passed to ``apply_fn``.

    Returns:
      ``merged`` with the chosen layers' ``kernel`` and ``bias`` corrected.

    Raises:
      ValueError: if ``endpoints`` or ``batches`` is empty, weights do not match the
        endpoints, a layer is not found or has no bias.

    References:
      Jordan, Sedghi, Saukh, Entezari & Neyshabur, `REPAIR: REnormalizing Permuted
      Activations for Interpolation Repair <https://arxiv.org/abs/2211.08403>`_, ICLR 2023
    """
    _check_apply(apply_fn, merged)
    batches = _batches(batches)
    if not isinstance(endpoints, (list, tuple)) or not endpoints:
        raise ValueError("endpoints must be a non-empty list of the (aligned) merged models.")
    for i, e in enumerate(endpoints):
        validation.check_same_structure(merged, e, name=f"endpoints[{i}]", ref_name="merged")
    if weights is None:
        w = np.full(len(endpoints), 1.0 / len(endpoints))
    else:
        validation.check_weights(weights)
        w = np.asarray(weights, np.float64)
        if w.shape != (len(endpoints),):
            raise ValueError(
                f"weights must have one entry per endpoint, shape ({len(endpoints)},), "
                f"got {w.shape}."
            )
        w = w / w.sum()

    order = _layer_order(apply_fn, merged, batches[0], apply_kwargs)
    if layers is None:
        chosen = set(order[:-1])
    else:
        chosen = {str(p).strip("/") for p in layers}
        missing = sorted(chosen - set(order))
        if missing:
            raise ValueError(
                f"repair: layer {missing[0]!r} is not an nn.Dense/nn.Conv the model calls; "
                f"those are {order}."
            )
    if not chosen:
        return merged

    layers_key = frozenset(chosen)
    targets_mean, targets_std = {}, {}
    for k, e in enumerate(endpoints):
        stats = _run_passes(apply_fn, e, batches, apply_kwargs, layers_key)
        for path in chosen:
            mean, var = _pool(stats[path])
            targets_mean[path] = targets_mean.get(path, 0.0) + w[k] * mean
            targets_std[path] = targets_std.get(path, 0.0) + w[k] * np.sqrt(var + epsilon)
    tgt = {
        p: (jnp.asarray(targets_mean[p], jnp.float32), jnp.asarray(targets_std[p], jnp.float32))
        for p in chosen
    }

    stats = _run_passes(apply_fn, merged, batches, apply_kwargs, layers_key, tgt, epsilon)
    fold = {}
    for path in chosen:
        mean, var = _pool(stats[path])
        mu_t, sd_t = (np.asarray(a, np.float64) for a in tgt[path])
        fold[path] = (sd_t / np.sqrt(var + epsilon), mean, mu_t)

    seen_bias = set()

    def leaf(kp, x):
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in kp]
        if len(keys) < 3 or keys[0] != "params" or keys[-1] not in ("kernel", "bias"):
            return x
        mod = "/".join(keys[1:-1])
        if mod not in fold:
            return x
        scale, mean, mu_t = fold[mod]
        xf = np.asarray(x, np.float64)
        if keys[-1] == "kernel":
            return jnp.asarray(xf * scale, x.dtype)
        seen_bias.add(mod)
        return jnp.asarray((xf - mean) * scale + mu_t, x.dtype)

    out = jax.tree_util.tree_map_with_path(leaf, merged)
    no_bias = sorted(chosen - seen_bias)
    if no_bias:
        raise ValueError(
            f"repair: layer {no_bias[0]!r} has no bias, so its mean cannot be moved; "
            "leave it out of layers."
        )
    return out
