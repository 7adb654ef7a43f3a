"""Input checks shared by every method. Errors name the model index and the path.

Static facts (structure, shapes, dtypes, Python-number hyperparameters) are
checked always. Values (NaN/Inf, equality of integer leaves) are checked only
when they are concrete: under :func:`jax.jit` they are traced and skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

keystr = jax.tree_util.keystr


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))


def _is_inexact_array(x) -> bool:
    return _is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact)


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype merges are computed in: at least float32 (bf16/fp16 are upcast).

    The one dtype policy of the library: compute in at least float32, cast the
    result back to the leaf's dtype. float64 stays float64 when 64-bit types are
    enabled (``jax_enable_x64``); otherwise it is float32, the dtype JAX would give
    a NumPy float64 array anyway (so asking for it raises no truncation warning).

    Args:
      dtype: A floating-point dtype (of a leaf).

    Returns:
      ``float32`` for dtypes narrower than 32 bits, else ``dtype`` as JAX represents it.
    """
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else jnp.dtype(dtype)


def is_concrete(x) -> bool:
    """Whether ``x`` holds a value (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def _path_map(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {keystr(p): (p, x) for p, x in leaves}


def describe(x) -> str:
    """A leaf described for a message: ``array(8, 4) float32`` or its type name."""
    return _describe(x)


def values_equal(a, b) -> bool:
    """Whether two concrete leaves are equal (arrays elementwise, others by ``==``)."""
    return _values_equal(a, b)


def _describe(x) -> str:
    if _is_array(x):
        return f"array{tuple(x.shape)} {x.dtype}"
    return type(x).__name__


def check_nonempty(models: Sequence[Any], name: str = "finetuned") -> None:
    """Raises if ``models`` is not a non-empty list or tuple of pytrees."""
    if not isinstance(models, (list, tuple)):
        raise TypeError(
            f"{name} must be a list or tuple of parameter pytrees, got {type(models).__name__}."
        )
    if len(models) == 0:
        raise ValueError(f"{name} is empty: merging needs at least one model.")


def check_same_tree(
    base: Any, other: Any, name: str = "finetuned[0]", ref_name: str = "base"
) -> None:
    """Raises ``ValueError`` naming the first missing or extra path (tree structure only).

    Leaves' shapes and dtypes are not compared; :func:`check_same_structure` does both.
    """
    tdb, tdo = jax.tree.structure(base), jax.tree.structure(other)
    if tdb == tdo:
        return
    pb, po = _path_map(base), _path_map(other)
    missing = [k for k in pb if k not in po]
    extra = [k for k in po if k not in pb]
    if missing:
        raise ValueError(f"{name} differs from {ref_name}: it is missing {missing[0]}.")
    if extra:
        raise ValueError(f"{name} differs from {ref_name}: it has an extra leaf {extra[0]}.")
    raise ValueError(
        f"{name} differs from {ref_name} in tree structure (container types): {tdo} != {tdb}"
    )


def check_same_structure(
    base: Any, other: Any, name: str = "finetuned[0]", ref_name: str = "base"
) -> None:
    """Raises ``ValueError`` naming the first path where ``other`` differs from ``base``.

    Checks tree structure (missing or extra keys), then every leaf's shape and
    dtype (arrays), or type (other leaves).

    Args:
      base: Reference pytree.
      other: Pytree that must match it.
      name: How ``other`` is named in the message, e.g. ``"finetuned[2]"``.
      ref_name: How ``base`` is named in the message.
    """
    check_same_tree(base, other, name, ref_name)
    lb = jax.tree_util.tree_flatten_with_path(base)[0]
    lo = jax.tree.leaves(other)
    for (path, b), o in zip(lb, lo, strict=True):
        _check_leaf_meta(f"{name} differs from {ref_name} at {keystr(path)}", b, o)


def _check_leaf_meta(where: str, b: Any, o: Any) -> None:
    """Raises ``ValueError(where: ...)`` if two leaves differ in kind, shape or dtype."""
    if _is_array(b) != _is_array(o):
        raise ValueError(f"{where}: {_describe(o)} != {_describe(b)}")
    if _is_array(b):
        if tuple(b.shape) != tuple(o.shape):
            raise ValueError(f"{where}: shape {tuple(o.shape)} != {tuple(b.shape)}")
        if b.dtype != o.dtype:
            raise ValueError(f"{where}: dtype {o.dtype} != {b.dtype}")


# Leaves up to this many entries are checked on the host (no compile); larger
# ones by one fused device reduction (no host copy, works on sharded arrays).
_HOST_CHECK_MAX = 1 << 16


@jax.jit
def _all_finite(x):
    # sum(x - x) is NaN iff x has a NaN or an Inf: a plain float reduction that
    # XLA:CPU fuses and vectorises (isfinite(x).all() first materialises a bool copy).
    return jnp.isfinite(jnp.sum(x - x))


def is_finite(x: Any) -> bool:
    """Whether a concrete floating-point array has no NaN or Inf (``True`` for other leaves).

    NumPy arrays and small arrays on a CPU are checked on the host; large or
    accelerator-resident (or sharded) arrays by one jitted reduction.
    """
    if not _is_inexact_array(x) or isinstance(x, jax.ShapeDtypeStruct) or not is_concrete(x):
        return True
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return True
    if isinstance(x, np.ndarray):
        return bool(np.isfinite(x).all())
    on_host = x.size <= _HOST_CHECK_MAX and x.is_fully_addressable and all(
        d.platform == "cpu" for d in x.devices()
    )
    if on_host:
        return bool(np.isfinite(np.asarray(x)).all())
    return bool(_all_finite(x))


def check_finite(tree: Any, name: str) -> None:
    """Raises ``ValueError`` naming the first floating-point leaf with NaN or Inf.

    Traced leaves are skipped. See :func:`is_finite` for how values are read.
    """
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not is_finite(x):
            raise ValueError(f"{name} has NaN or Inf values at {keystr(path)}.")


def _values_equal(a, b) -> bool:
    if _is_array(a):
        if not (is_concrete(a) and is_concrete(b)):
            return True
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    try:
        return bool(a == b)
    except Exception:  # pylint: disable=broad-except
        return a is b


def check_passthrough_equal(base: Any, models: Sequence[Any], name: str = "finetuned") -> None:
    """Raises if a leaf that is not merged (integer, bool, non-array) differs.

    Such leaves (step counters, integer buffers, equinox static leaves) must be
    equal in every model; they are passed through from ``base``.
    """
    lb = jax.tree_util.tree_flatten_with_path(base)[0]
    for i, m in enumerate(models):
        for (path, b), o in zip(lb, jax.tree.leaves(m), strict=False):
            if not _is_inexact_array(b) and not _values_equal(b, o):
                raise ValueError(
                    f"{name}[{i}] differs from base at {keystr(path)}: this "
                    f"{_describe(b)} leaf is not a floating-point array, so it is not merged "
                    "and must be equal in every model."
                )


def check_models(
    base: Any, finetuned: Sequence[Any], *, name: str = "finetuned", check_values: bool = True
) -> None:
    """All checks on a base model and a list of fine-tuned models.

    Args:
      base: Base parameters.
      finetuned: Non-empty list of fine-tuned parameters.
      name: How the list is named in messages.
      check_values: Also check non-float leaves for equality (when concrete).
        NaN/Inf are checked by :func:`fusionjax.merge` as it reads the leaves.
    """
    check_nonempty(finetuned, name)
    for i, ft in enumerate(finetuned):
        check_same_structure(base, ft, name=f"{name}[{i}]")
    if check_values:
        check_passthrough_equal(base, finetuned, name)


def check_sources(base, finetuned: Sequence[Any], name: str = "finetuned") -> None:
    """Compares sources' metadata (structure, shapes, dtypes, non-array leaves) before any read.

    Args:
      base: The base model's :class:`fusionjax.LeafSource`.
      finetuned: The fine-tuned models' sources.
      name: How the list is named in messages.

    Raises:
      ValueError: naming the model and the path of the first difference, or of
        a complex leaf (complex parameters are not supported).
    """
    for path, spec in zip(base.paths, base.specs, strict=True):
        if _is_array(spec) and jnp.issubdtype(spec.dtype, jnp.complexfloating):
            raise ValueError(
                f"base has a complex leaf at {keystr(path)} ({spec.dtype}): complex parameters "
                "are not supported; split them into real and imaginary parts first."
            )
    for i, ft in enumerate(finetuned):
        who = f"{name}[{i}]"
        if ft.treedef != base.treedef:
            pb = {keystr(p) for p in base.paths}
            po = {keystr(p) for p in ft.paths}
            missing = [k for k in map(keystr, base.paths) if k not in po]
            extra = [k for k in map(keystr, ft.paths) if k not in pb]
            if missing:
                raise ValueError(f"{who} differs from base: it is missing {missing[0]}.")
            if extra:
                raise ValueError(f"{who} differs from base: it has an extra leaf {extra[0]}.")
            if [keystr(p) for p in ft.paths] == [keystr(p) for p in base.paths]:
                raise ValueError(
                    f"{who} differs from base in the static (non-array) parts of its tree, "
                    "with the same leaf paths: e.g. an optax transformation, a function or "
                    "a module config held in the tree was created separately per model. "
                    "Share one object, or merge the parameters only (state.params)."
                )
            raise ValueError(
                f"{who} differs from base in tree structure (container types): "
                f"{ft.treedef} != {base.treedef}"
            )
        if [_meta(x) for x in ft.specs] == [_meta(x) for x in base.specs]:
            continue
        for path, b, o in zip(base.paths, base.specs, ft.specs, strict=True):
            where = f"{who} differs from base at {keystr(path)}"
            _check_leaf_meta(where, b, o)
            if not _is_array(b) and (type(b) is not type(o) or not _values_equal(b, o)):
                raise ValueError(
                    f"{where}: this {type(b).__name__} leaf is not an array, so it is not "
                    f"merged and must be equal in every model (got {o!r}, base has {b!r})."
                )


def _meta(x):
    if _is_array(x):
        return (tuple(x.shape), x.dtype)
    return (type(x), x)


def check_hparam(
    name: str,
    value: Any,
    *,
    lower: float | None = None,
    upper: float | None = None,
    lower_open: bool = False,
    upper_open: bool = False,
) -> None:
    """Raises ``ValueError`` if a concrete hyperparameter is out of range or NaN.

    Traced values are not checked (they are validated by the caller's own code).

    Args:
      name: Hyperparameter name for the message, e.g. ``"density"``.
      value: A Python number or array (every entry is checked).
      lower: Lower bound, or ``None``.
      upper: Upper bound, or ``None``.
      lower_open: Exclude the lower bound.
      upper_open: Exclude the upper bound.
    """
    if value is None or not is_concrete(value):
        return
    if hasattr(value, "values") and callable(value.values) and not isinstance(value, dict):
        for v in value.values():  # a per-leaf value (by_path, gradient): check each
            check_hparam(name, v, lower=lower, upper=upper, lower_open=lower_open,
                         upper_open=upper_open)
        return
    if isinstance(value, (str, bytes, bool)) or (
        isinstance(value, np.ndarray) and not np.issubdtype(value.dtype, np.number)
    ):
        raise TypeError(f"{name} must be a number or an array of numbers, got {value!r}.")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}.") from None
    lo = "(" if lower_open else "["
    hi = ")" if upper_open else "]"
    interval = (
        f"{lo}{-math.inf if lower is None else lower}, {math.inf if upper is None else upper}{hi}"
    )
    bad = np.isnan(arr)
    if lower is not None:
        bad |= (arr <= lower) if lower_open else (arr < lower)
    if upper is not None:
        bad |= (arr >= upper) if upper_open else (arr > upper)
    if bad.any():
        shown = value if arr.ndim == 0 else arr.tolist()
        raise ValueError(f"{name} must lie in {interval}, got {shown}.")


def check_int(name: str, value: Any, *, lower: int | None = None, upper: int | None = None) -> int:
    """Returns ``value`` as an ``int``; ``TypeError``/``ValueError`` if it is not one in range.

    For static (shape-deciding) hyperparameters such as ``k`` or a rank: booleans, floats
    and arrays are refused, so ``k=2.5`` or ``k=True`` never truncates silently.

    Args:
      name: Hyperparameter name for the message, e.g. ``"k"``.
      value: The value to check.
      lower: Smallest allowed value, or ``None``.
      upper: Largest allowed value, or ``None``.

    Returns:
      ``int(value)``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    if (lower is not None and value < lower) or (upper is not None and value > upper):
        lo = "-inf" if lower is None else lower
        hi = "inf" if upper is None else upper
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}.")
    return int(value)


def float_array(x: Any, name: str, min_ndim: int = 0) -> jax.Array:
    """``x`` as a floating array in its compute dtype; ``TypeError``/``ValueError`` otherwise.

    Lists and tuples are refused (a list of per-model arrays passed where a stacked array
    is expected would otherwise be stacked silently).

    Args:
      x: An array-like of a floating dtype.
      name: Parameter name for the messages.
      min_ndim: Fewest axes ``x`` may have.

    Returns:
      ``x`` cast to :func:`compute_dtype` of its dtype (float32 at least).
    """
    if isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be an array, got a {type(x).__name__}.")
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got {dtype}.")
    x = jnp.asarray(x)
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} axes, got shape {x.shape}.")
    return x.astype(compute_dtype(x.dtype))


def int_array(x: Any, name: str) -> jax.Array:
    """``x`` as an int32 array of ids; ``TypeError`` if its dtype is not an integer one.

    Args:
      x: An array-like of an integer dtype.
      name: Parameter name for the message.

    Returns:
      ``x`` as int32.
    """
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be integer token ids, got {dtype}.")
    return jnp.asarray(x).astype(jnp.int32)


def bool_mask(where: Any, shape: tuple[int, ...], name: str = "where") -> jax.Array | None:
    """``where`` checked as a boolean mask of ``shape`` (``None`` passes through).

    Args:
      where: ``None`` or a boolean array (``True`` = the position counts).
      shape: The shape it must have (the positions' shape).
      name: Parameter name for the messages.

    Returns:
      ``where`` as an array, or ``None``.
    """
    if where is None:
        return None
    w = jnp.asarray(where)
    if w.dtype != jnp.bool_:
        raise TypeError(f"{name} must be a boolean mask (True = position counts), got {w.dtype}.")
    if w.shape != tuple(shape):
        raise ValueError(
            f"{name} must have shape {tuple(shape)} (the positions' shape), got {w.shape}."
        )
    return w


def string_list(name: str, values: Any) -> list[str]:
    """``values`` as a non-empty list of ``str``; ``TypeError``/``ValueError`` otherwise.

    A bare string is refused (it would be read as a sequence of characters).

    Args:
      name: Parameter name for the messages.
      values: A sequence of strings (tokens, a vocabulary).

    Returns:
      The strings as a list.
    """
    if isinstance(values, str):
        raise TypeError(f"{name} must be a sequence of token strings, got one str.")
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty.")
    for i, t in enumerate(values):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}.")
    return values


def check_examples(inputs: Any, batch_size: int | None, name: str = "inputs") -> tuple[int, int]:
    """Checks a pytree of examples with a shared leading axis and a batch size.

    Args:
      inputs: Pytree whose leaves are arrays ``[N, ...]`` with the same ``N``.
      batch_size: Positive integer, or ``None`` for all ``N`` at once.
      name: How ``inputs`` is named in messages.

    Returns:
      ``(N, batch_size)`` with ``batch_size`` clipped to ``N``.
    """
    leaves = jax.tree.leaves(inputs)
    if not leaves:
        raise ValueError(f"{name} is empty: at least one example is needed.")
    sizes = {np.shape(a)[0] if np.ndim(a) else None for a in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every leaf of {name} must be an array with the same leading (example) axis N, "
            f"got leading sizes {sorted(str(s) for s in sizes)}."
        )
    (n,) = sizes
    if n == 0:
        raise ValueError(f"{name} has no examples (N = 0).")
    if batch_size is None:
        batch_size = n
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be a positive integer or None, got {batch_size!r}.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}.")
    return n, min(int(batch_size), n)


def check_weights(weights: Any, name: str = "weights") -> None:
    """Raises unless concrete per-model weights are non-negative and not all zero."""
    check_hparam(name, weights, lower=0.0)
    if weights is None or not is_concrete(weights):
        return
    if hasattr(weights, "values") and callable(weights.values) and not isinstance(weights, dict):
        for w in weights.values():  # a per-leaf value (by_path, gradient): check each
            check_weights(w, name)
        return
    if float(np.sum(np.asarray(weights))) <= 0:
        raise ValueError(f"{name} must not all be zero.")
