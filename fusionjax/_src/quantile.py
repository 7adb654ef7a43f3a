"""Exact order statistics of magnitudes without sorting.

Magnitude pruning (TIES, breadcrumbs) needs the k-th largest :math:`|x|` of
large arrays. ``jnp.sort``/``lax.top_k`` cost :math:`O(n\\log n)` and were
measured ~130x slower than ``np.partition`` on XLA:CPU for 16M entries. For
non-negative floats the IEEE bit pattern, read as a signed integer, is
monotone in the value, so the k-th largest value is found exactly by bisection
over bit patterns: each round counts the entries above a candidate. The counts
are fused reductions, and the whole search is jittable on every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

_INT_FOR_FLOAT = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}


def _bits(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, _INT_FOR_FLOAT[x.dtype.itemsize])


def kth_largest(xs: Sequence[jax.Array], k: jax.Array) -> jax.Array:
    """The ``k[t]``-th largest value of row ``t`` over several non-negative arrays.

    Args:
      xs: Arrays ``[T, n_i]`` of one float dtype, non-negative and not NaN (e.g.
        magnitudes), whose row ``t`` together forms one population.
      k: Integer ranks ``[T]`` (1 = the largest), or ``[T, m]`` for ``m`` ranks
        per row found in the same passes. ``k <= 0`` gives ``+inf`` (nothing is
        at least that large); ``k > n`` gives 0.

    Returns:
      Values of the shape of ``k``, ``v`` with ``v`` with ``#{x >= v} >= k`` and ``#{x > v} < k``: keeping
      ``x >= v`` keeps the top ``k`` entries (and any ties with the k-th).
    """
    dtype = xs[0].dtype
    itype = _INT_FOR_FLOAT[dtype.itemsize]
    nbits = 8 * dtype.itemsize - 1
    bits = [_bits(x) for x in xs]
    k = jnp.asarray(k, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    inf_bits = _bits(jnp.asarray(jnp.inf, dtype))
    squeeze = k.ndim == 1
    k = k.reshape(k.shape[0], -1)

    def count_at_least(b):
        cols = []
        for j in range(b.shape[1]):
            total = 0
            for xb in bits:
                total = total + jnp.sum(xb >= b[:, j : j + 1], axis=1, dtype=k.dtype)
            cols.append(total)
        return jnp.stack(cols, axis=1)

    # Invariant: count(>= lo) >= k and count(>= hi) < k, for 1 <= k <= n.
    lo = jnp.zeros(k.shape, itype)
    hi = jnp.full(k.shape, inf_bits + 1, itype)

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = count_at_least(mid) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, nbits + 1, body, (lo, hi))
    value = jax.lax.bitcast_convert_type(lo, dtype)
    value = jnp.where(k <= 0, jnp.asarray(jnp.inf, dtype), value)
    return value[:, 0] if squeeze else value
