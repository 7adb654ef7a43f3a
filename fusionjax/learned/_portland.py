r"""The Portland of Neural Ligand: an MLP from K models' features to weights on the simplex.

:math:`w(x) = \mathrm{softmax}\big(\mathrm{MLP}([f_1(x); \dots; f_K(x)])\big)`; the paper's
Portland is one linear layer. See :mod:`fusionjax.learned._ligand` for the method.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src.base import PRNGKey
from fusionjax.logits._features import check_features

Portland = Any
"""Portland parameters: ``{"dense_0": {"kernel": [K*d, h], "bias": [h]}, ...}``."""
_HIGHEST = jax.lax.Precision.HIGHEST


def init_portland(
    key: PRNGKey, num_models: int, feature_dim: int, *, hidden_sizes: Sequence[int] = ()
) -> Portland:
    r"""Initial Portland parameters: an MLP from the :math:`K` models' features to :math:`K` logits.

    The paper's Portland is one linear layer on the concatenated features,
    ``[K * d] -> [K]``, followed by a softmax (``hidden_sizes=()``). Hidden layers (ReLU)
    make it a small MLP. Every layer is initialised like PyTorch's ``nn.Linear`` (as in
    the official code): kernel and bias uniform in :math:`\pm 1/\sqrt{\text{fan-in}}`.

    Args:
      key: PRNG key.
      num_models: :math:`K`, the number of collaborating models.
      feature_dim: :math:`d`, the width of each model's features.
      hidden_sizes: Widths of hidden layers; empty for the paper's linear Portland.

    Returns:
      ``{"dense_0": {"kernel": [K*d, h_0], "bias": [h_0]}, ..., "dense_L": {..., [K]}}``,
      float32.

    Examples:
      >>> import jax
      >>> import fusionjax as fj
      >>> p = fj.learned.init_portland(jax.random.key(0), 3, 4)
      >>> p["dense_0"]["kernel"].shape, p["dense_0"]["bias"].shape
      ((12, 3), (3,))
    """
    for name, value in (("num_models", num_models), ("feature_dim", feature_dim)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    sizes = [int(num_models) * int(feature_dim)]
    for i, h in enumerate(hidden_sizes):
        if isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1:
            raise ValueError(f"hidden_sizes[{i}] must be a positive integer, got {h!r}.")
        sizes.append(int(h))
    sizes.append(int(num_models))
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        k_w, k_b = jax.random.split(jax.random.fold_in(key, i))
        bound = 1.0 / np.sqrt(fan_in)
        params[f"dense_{i}"] = {
            "kernel": jax.random.uniform(k_w, (fan_in, fan_out), jnp.float32, -bound, bound),
            "bias": jax.random.uniform(k_b, (fan_out,), jnp.float32, -bound, bound),
        }
    return params


def _layers(portland: Portland) -> list[tuple[str, jax.Array, jax.Array]]:
    if not isinstance(portland, Mapping) or not portland:
        raise TypeError(
            "portland must be a dict of layers {'dense_0': {'kernel', 'bias'}, ...} as "
            f"init_portland returns, got {type(portland).__name__}."
        )
    out = []
    for i in range(len(portland)):
        name = f"dense_{i}"
        layer = portland.get(name)
        if not isinstance(layer, Mapping) or "kernel" not in layer or "bias" not in layer:
            raise ValueError(
                f"portland[{name!r}] must be a dict with 'kernel' and 'bias' (layers are named "
                f"dense_0 ... dense_{len(portland) - 1}); got keys {sorted(portland)}."
            )
        kernel, bias = jnp.asarray(layer["kernel"]), jnp.asarray(layer["bias"])
        if kernel.ndim != 2 or bias.shape != kernel.shape[1:]:
            raise ValueError(
                f"portland[{name!r}] has kernel {kernel.shape} and bias {bias.shape}; expected "
                "kernel [in, out] and bias [out]."
            )
        if out and out[-1][1].shape[1] != kernel.shape[0]:
            raise ValueError(
                f"portland[{name!r}]['kernel'] has {kernel.shape[0]} inputs but the previous "
                f"layer has {out[-1][1].shape[1]} outputs."
            )
        out.append((name, kernel, bias))
    return out


_check_features = check_features


def portland_weights(portland: Portland, features: jax.Array) -> jax.Array:
    r"""The per-sample weights (CoopVecs) :math:`w(x)` the Portland gives.

    :math:`w(x) = \mathrm{softmax}\big(\mathrm{MLP}([f_1(x); \dots; f_K(x)])\big)`.

    Args:
      portland: Portland parameters from :func:`init_portland`.
      features: The :math:`K` models' features of the same inputs, stacked
        ``[K, ..., d]`` (see :func:`expert_features`); they are concatenated in model
        order, ``[..., K * d]``.

    Returns:
      ``[..., K]`` float32 weights, non-negative and summing to one over the last axis.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import fusionjax as fj
      >>> p = fj.learned.init_portland(jax.random.key(0), 3, 4)
      >>> w = fj.learned.portland_weights(p, jnp.ones((3, 5, 4)))  # 5 inputs
      >>> w.shape, bool(jnp.allclose(w.sum(-1), 1.0))
      ((5, 3), True)
    """
    _check_features(features)
    layers = _layers(portland)
    k, d = jnp.shape(features)[0], jnp.shape(features)[-1]
    batch = jnp.shape(features)[1:-1]
    if layers[0][1].shape[0] != k * d:
        raise ValueError(
            f"portland['dense_0']['kernel'] expects {layers[0][1].shape[0]} inputs, but "
            f"features give K * d = {k} * {d} = {k * d}."
        )
    if layers[-1][1].shape[1] != k:
        raise ValueError(
            f"portland['dense_{len(layers) - 1}'] gives {layers[-1][1].shape[1]} weights, but "
            f"features stack K = {k} models."
        )
    h = jnp.moveaxis(jnp.asarray(features, jnp.float32), 0, -2).reshape(-1, k * d)
    for i, (_, kernel, bias) in enumerate(layers):
        h = jnp.matmul(h, kernel.astype(jnp.float32), precision=_HIGHEST)
        h = h + bias.astype(jnp.float32)[None, :]
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    return jax.nn.softmax(h, axis=-1).reshape(*batch, k)
