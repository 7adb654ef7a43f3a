"""flax.linen helpers: capture the inputs of ``nn.Dense`` layers for RegMean.

Flax-specific code lives here; the merging math in :mod:`fusionjax.merging`
imports no flax and works on plain pytrees. flax is imported on the first capture, so
importing :mod:`fusionjax.interop` does not load it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING
from typing import Any

import jax
import jax.numpy as jnp

from fusionjax._src import pytrees
from fusionjax._src import validation
from fusionjax.merging._regmean import gram_matrices

if TYPE_CHECKING:
    import flax.linen as nn


def _key_name(k) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return k


def capture_dense_inputs(
    module: nn.Module, variables: Any, x: Any, **apply_kwargs: Any
) -> Any:
    """Runs a linen module and records the input of every ``nn.Dense`` call.

    The module is run with ``module.apply(variables, x, **apply_kwargs)`` inside
    :func:`flax.linen.intercept_methods`; every ``__call__`` of an ``nn.Dense``
    (or subclass) records its ``inputs``, flattened to ``[rows, d_in]``. A Dense
    called several times (a shared layer) gets the rows of all its calls,
    concatenated in call order, so its Gram matrix sums over all of them.

    It can be wrapped in :func:`jax.jit` (close over ``module`` and the keyword
    arguments). Dense layers inside lifted transforms (``nn.scan``, ``nn.vmap``,
    ``nn.remat``, ``nn.jit``) are not supported: their inputs are traced values
    of the inner transform.

    Args:
      module: A ``flax.linen`` module.
      variables: Its variables, e.g. ``{"params": params}`` (plus any other
        collections the module needs, such as ``batch_stats``).
      x: The module's (first positional) input, e.g. a batch ``[B, ..., d]``.
      **apply_kwargs: Passed on to ``module.apply`` (``train=False``, ``rngs``,
        ``mutable``, ...). The module's outputs are discarded.

    Returns:
      A pytree shaped like ``variables["params"]`` with the captured inputs
      ``[rows, d_in]`` at the ``kernel`` leaf of every Dense that was called and
      ``None`` at every other leaf. Feed batches of it to
      :func:`fusionjax.merging.gram_matrices`, or use :func:`dense_grams`.

    Raises:
      ValueError: if ``variables`` has no ``"params"``, or a called Dense has no
        ``kernel`` in it (the module path is named).

    Examples:
      >>> import jax, numpy as np, flax.linen as nn
      >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
      >>> variables = jax.jit(model.init)(jax.random.key(0), np.ones((1, 3), np.float32))
      >>> xs = capture_dense_inputs(model, variables, np.ones((5, 3), np.float32))
      >>> xs["layers_0"]["kernel"].shape, xs["layers_2"]["kernel"].shape
      ((5, 3), (5, 4))
      >>> xs["layers_0"]["bias"] is None
      True
    """
    if not hasattr(variables, "keys") or "params" not in variables:
        raise ValueError(
            "variables must be a mapping with a 'params' collection, e.g. {'params': params}."
        )
    import flax.linen as nn  # pylint: disable=g-import-not-at-top

    captured: dict[tuple, list] = {}

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.Dense) and context.method_name == "__call__":
            inputs = args[0] if args else kwargs["inputs"]
            inputs = jnp.asarray(inputs)
            captured.setdefault(tuple(mod.path), []).append(
                inputs.reshape(-1, inputs.shape[-1])
            )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        module.apply(variables, x, **apply_kwargs)

    found = set()

    def leaf(path, _):
        keys = tuple(_key_name(k) for k in path)
        if keys and keys[-1] == "kernel" and keys[:-1] in captured:
            found.add(keys[:-1])
            xs = captured[keys[:-1]]
            return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=0)
        return None

    out = jax.tree_util.tree_map_with_path(leaf, variables["params"])
    missing = [p for p in captured if p not in found]
    if missing:
        where = "".join(f"[{k!r}]" for k in missing[0])
        raise ValueError(
            f"the nn.Dense at {where or 'the root'} was called, but params has no "
            f"{where}['kernel'] leaf for it."
        )
    return out


def dense_grams(
    module: nn.Module,
    variables: Any,
    xs: Any,
    *,
    batch_size: int | None = None,
    normalize: bool = True,
    **apply_kwargs: Any,
) -> Any:
    r"""Gram matrices :math:`X^\top X` of every ``nn.Dense`` input over a dataset.

    Runs :func:`capture_dense_inputs` (jitted) on ``xs`` in batches of
    ``batch_size`` examples and accumulates the Grams with
    :func:`fusionjax.merging.gram_matrices`. This gives one model's ``grams``
    for :func:`fusionjax.merging.regmean`; stack the models' with
    :func:`fusionjax.stack` (``None`` leaves stay ``None``)::

      grams = fj.stack([dense_grams(model, {"params": p}, x) for p, x in zip(params, data)])
      merged = fj.merge(base, params, fj.merging.regmean(), grams=grams)

    Args:
      module: A ``flax.linen`` module.
      variables: Its variables, e.g. ``{"params": params}``.
      xs: Inputs ``[N, ...]``, or a pytree of arrays sharing the leading axis
        ``N``; batches of it are the module's first positional argument.
      batch_size: Examples per forward pass; ``None`` runs all ``N`` at once.
        A smaller last batch compiles once more.
      normalize: Average over rows (the reference implementation) rather than
        sum; see :func:`fusionjax.merging.gram_matrices`.
      **apply_kwargs: Passed on to ``module.apply``. Their array leaves (arrays,
        or the arrays of pytrees such as ``rngs``) are traced; the other leaves
        (flags such as ``train=False``) are static. Calls with the same module and
        flags, e.g. one per model to merge, share one compiled forward pass.

    Returns:
      A pytree like ``variables["params"]`` with a float32 ``[d_in, d_in]`` Gram
      at the ``kernel`` of every Dense that was called and ``None`` elsewhere.

    Raises:
      ValueError: if ``xs`` is empty or its leaves disagree on ``N``, or
        ``batch_size`` is not a positive integer.

    Examples:
      >>> import jax, numpy as np, flax.linen as nn
      >>> model = nn.Dense(2)
      >>> variables = jax.jit(model.init)(jax.random.key(0), np.ones((1, 3), np.float32))
      >>> g = dense_grams(model, variables, np.ones((10, 3), np.float32), batch_size=4)
      >>> g["kernel"]
      Array([[1., 1., 1.],
             [1., 1., 1.],
             [1., 1., 1.]], dtype=float32)
    """
    n, batch_size = validation.check_examples(xs, batch_size, name="xs")

    # Array leaves of the keyword arguments (rngs, masks) are traced, the rest (the module,
    # flags) static; with a hashable module and flags, models of one architecture share
    # one compile.
    arrays, static = pytrees.jit_partition((module, apply_kwargs))
    try:
        hash(static)
        capture = functools.partial(_capture_jit, static)
    except TypeError:  # an unhashable flag: compile for this call only
        capture = jax.jit(functools.partial(_capture, static))

    batches = (
        capture(variables, jax.tree.map(lambda a, s=s: a[s : s + batch_size], xs), arrays)
        for s in range(0, n, batch_size)
    )
    return gram_matrices(batches, normalize=normalize)


def _capture(static, variables, x, arrays):
    """:func:`capture_dense_inputs` with the module and keyword arguments rebuilt."""
    module, apply_kwargs = pytrees.jit_combine(arrays, static)
    return capture_dense_inputs(module, variables, x, **apply_kwargs)


_capture_jit = jax.jit(_capture, static_argnums=(0,))
