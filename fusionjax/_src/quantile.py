r"""Exact order statistics of magnitudes without sorting.

Magnitude pruning (TIES, breadcrumbs) needs the k-th largest :math:`|x|` of
large arrays. ``jnp.sort``/``lax.top_k`` cost :math:`O(n\log n)` and were
measured ~130x slower than ``np.partition`` on XLA:CPU for 16M entries. For
non-negative floats the IEEE bit pattern, read as an integer, is monotone in
the value, so the k-th largest value is found exactly by a most-significant-
digit radix select over the bit patterns: each pass histograms the next 15-16
bits of the entries that share the prefix chosen so far (a scatter-add), and the
suffix sums of the histogram pick the next digit. A float32 takes 2 passes over
the data (16 + 15 bits), a bfloat16/float16 one, a float64 four. Ties, ``k <= 0``
and ``k > n`` are exact by construction, and it is jittable on every backend.

Measured on XLA:CPU (2 cores), 3 rows of 16M float32: the previous bisection
(32 passes of ``sum(x >= t)``) took 1.6 s, this select 0.19 s (``np.partition``
of the same rows: 0.14 s). XLA:CPU does not vectorise a
compare-and-count reduction (~1.5 ns per entry and threshold), while one scatter
pass costs ~2-3 ns per entry and settles 15-16 bits at once. Rows are read in a
few static chunks (see ``_histogram``) so that no large temporary is created.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Bits of the sign-free bit pattern and the digits of the radix select, by itemsize.
_NBITS = {2: 15, 4: 31, 8: 63}
_DIGIT_BITS = 16
# Entries (rows x ranks x chunk) scattered per step: bounds the temporaries to a
# few MiB however large the arrays are (fresh large buffers page-fault on CPU).
_STEP_ENTRIES = 1 << 20
_MAX_CHUNKS = 4


def _magnitude_bits(x: jax.Array) -> jax.Array:
    """The bit pattern of ``|x|`` as a non-negative integer (int32, or int64 for f64)."""
    size = x.dtype.itemsize
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.int16).astype(jnp.int32) & 0x7FFF
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.int32) & 0x7FFFFFFF
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.int64) & 0x7FFFFFFFFFFFFFFF
    raise TypeError(f"kth_largest needs a 16-, 32- or 64-bit float dtype, got {x.dtype}.")


def _digits(nbits: int) -> list[int]:
    passes = -(-nbits // _DIGIT_BITS)
    return [nbits // passes + (1 if i < nbits % passes else 0) for i in range(passes)]


def _histogram(xs, shift, base, nbins, count_dtype):
    """Counts ``[T, m, nbins]`` of ``(bits(|x|) >> shift) - base[t, r]`` over row ``t``.

    Entries outside ``[0, nbins)`` (a different prefix) are dropped. Each row is
    read in a few static chunks: a chunk of one row of a stacked ``[T, ...]``
    leaf fuses with the arithmetic that produced it (no ``[T, ...]`` temporary),
    and the bit patterns and scatter indices only ever exist for one chunk
    (fresh large buffers page-fault on CPU). Each chunk's indices depend on the
    previous chunk's histogram, so XLA cannot compute them all up front.
    """
    t_rows, m = base.shape
    size = t_rows * m * nbins
    step_min = max(1024, _STEP_ENTRIES // m)
    hist = jnp.zeros((size,), count_dtype)
    if sum(x.size for x in xs) * m <= _STEP_ENTRIES:  # small: one scatter for all rows
        seg = jnp.concatenate([x.reshape(t_rows, -1) for x in xs], axis=1)
        d = (_magnitude_bits(seg)[:, None, :] >> shift) - base[:, :, None]
        offsets = (jnp.arange(t_rows * m, dtype=jnp.int32) * nbins).reshape(t_rows, m, 1)
        flat = jnp.where((d >= 0) & (d < nbins), d.astype(jnp.int32) + offsets, size)
        return hist.at[flat.reshape(-1)].add(1, mode="drop").reshape(t_rows, m, nbins)
    for t in range(t_rows):
        offsets = ((t * m + jnp.arange(m, dtype=jnp.int32)) * nbins)[:, None]
        for x in xs:
            # Chunk along axis 1 of x itself: a slice of row t of a stacked leaf
            # then reads that model's own arrays, not a materialised stack.
            rest = math.prod(x.shape[2:])
            step = -(-max(step_min, -(-x.shape[1] * rest // _MAX_CHUNKS)) // rest)
            for c0 in range(0, x.shape[1], step):
                seg = _magnitude_bits(x[t, c0 : c0 + step].reshape(-1))
                # min(h, 0) == 0, but XLA cannot know: it orders this chunk after
                # the previous scatter.
                b = base[t][:, None] + jnp.minimum(hist[0], 0).astype(base.dtype)
                d = (seg[None, :] >> shift) - b
                inside = (d >= 0) & (d < nbins)
                flat = jnp.where(inside, d.astype(jnp.int32) + offsets, size).reshape(-1)
                hist = hist.at[flat].add(1, mode="drop")
    return hist.reshape(t_rows, m, nbins)


def _select(hist, above, k):
    """The largest bin ``j`` with ``above + #{entries in bins >= j} >= k``.

    Returns ``j`` (0 when no bin qualifies) and the count of entries above bin
    ``j``, both ``[T, m]``. Histograms of more than 256 bins are searched in two
    levels (blocks, then bins of the chosen block), each by one small
    triangular matmul for the suffix sums: few kernels, so it compiles fast.
    """
    nbins = hist.shape[-1]
    if nbins > 256:
        inner = 1 << ((nbins.bit_length() - 1 + 1) // 2)
        blocks = hist.reshape(*hist.shape[:-1], nbins // inner, inner)
        jb, above = _select(blocks.sum(-1), above, k)
        picked = jnp.take_along_axis(blocks, jb[..., None, None], axis=-2)[..., 0, :]
        ji, above = _select(picked, above, k)
        return jb * inner + ji, above
    ge = np.arange(nbins)[:, None] >= np.arange(nbins)[None, :]
    total = above[..., None] + jnp.matmul(hist, jnp.asarray(ge, hist.dtype))
    j = jnp.maximum(jnp.sum(total >= k[..., None], axis=-1, dtype=k.dtype) - 1, 0)
    nxt = jnp.take_along_axis(total, jnp.minimum(j + 1, nbins - 1)[..., None], axis=-1)[..., 0]
    return j, jnp.where(j + 1 < nbins, nxt, above)


@jax.jit
def _kth_largest(xs, k):
    dtype = xs[0].dtype
    nbits = _NBITS[dtype.itemsize]
    int_dtype = jnp.int64 if dtype.itemsize == 8 else jnp.int32
    t_rows, m = k.shape
    # Arrays below a chunk are scanned together (one scatter per pass, not one each).
    small = [x.reshape(t_rows, -1) for x in xs if x.size * m < _STEP_ENTRIES]
    xs = [x for x in xs if x.size * m >= _STEP_ENTRIES]
    if small:
        xs.append(jnp.concatenate(small, axis=1) if len(small) > 1 else small[0])
    prefix = jnp.zeros((t_rows, m), int_dtype)
    above = jnp.zeros((t_rows, m), k.dtype)
    done = 0
    for p, d in enumerate(_digits(nbits)):
        shift = nbits - done - d
        base = prefix << d
        if p == 0:  # every rank starts from the empty prefix: one shared histogram
            hist = _histogram(xs, shift, base[:, :1], 1 << d, k.dtype)
            hist = jnp.broadcast_to(hist, (t_rows, m, 1 << d))
        else:
            hist = _histogram(xs, shift, base, 1 << d, k.dtype)
        j, above = _select(hist, above, k)
        prefix = base + j.astype(int_dtype)
        done += d
    int_type = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[dtype.itemsize]
    value = jax.lax.bitcast_convert_type(prefix.astype(int_type), dtype)
    n = min(sum(math.prod(x.shape[1:]) for x in xs), int(jnp.iinfo(k.dtype).max))
    value = jnp.where(k > n, jnp.zeros((), dtype), value)
    return jnp.where(k <= 0, jnp.asarray(jnp.inf, dtype), value)


def kth_largest(xs: Sequence[jax.Array], k: jax.Array) -> jax.Array:
    """The ``k[t]``-th largest value of row ``t`` over several non-negative arrays.

    Args:
      xs: Arrays ``[T, n_i]`` (or ``[T, ...]``, ranking all trailing entries) of
        one float dtype (16, 32 or 64 bits), non-negative and not NaN (e.g.
        magnitudes), whose row ``t`` together forms one population. A negative
        entry counts as its magnitude, so ``x`` may be passed for ``|x|``.
      k: Integer ranks ``[T]`` (1 = the largest), or ``[T, m]`` for ``m`` ranks
        per row found in the same passes. ``k <= 0`` gives ``+inf`` (nothing is
        at least that large); ``k > n`` gives 0.

    Returns:
      Values of the shape of ``k``: the ``v`` with ``#{x >= v} >= k`` and
      ``#{x > v} < k``, so keeping ``x >= v`` keeps the top ``k`` entries (and any
      ties with the k-th).
    """
    xs = tuple(xs)
    if not xs:
        raise ValueError("kth_largest needs at least one array.")
    dtype = xs[0].dtype
    if not jnp.issubdtype(dtype, jnp.floating) or dtype.itemsize not in _NBITS:
        raise TypeError(f"kth_largest needs a 16-, 32- or 64-bit float dtype, got {dtype}.")
    for x in xs:
        if x.dtype != dtype or x.ndim < 1 or x.shape[0] != xs[0].shape[0]:
            raise ValueError(
                "kth_largest needs arrays [T, ...] of one dtype; got "
                f"{[(a.shape, a.dtype) for a in xs]}."
            )
    xs = tuple(x.reshape(x.shape[0], 1) if x.ndim == 1 else x for x in xs)
    k = jnp.asarray(k, jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
    squeeze = k.ndim == 1
    k = k.reshape(k.shape[0], -1)
    if k.shape[0] != xs[0].shape[0]:
        raise ValueError(
            f"k must have one row per array row, shape ({xs[0].shape[0]}, ...), got {k.shape}."
        )
    n = sum(math.prod(x.shape[1:]) for x in xs)
    value = _kth_largest_sorted(xs, k) if n <= _SORT_MAX else _kth_largest(xs, k)
    return value[:, 0] if squeeze else value


# Up to this many entries per row a bitwise bisection (one compare-and-count
# pass per bit) is cheaper than the radix select's 2^16-bin histograms, and
# compiles faster: small leaves, merged in groups. (XLA:CPU's sort was measured
# ~20x slower still: 0.41 s for 1024 x 3 rows of 256.)
_SORT_MAX = 4096


@jax.jit
def _kth_largest_sorted(xs, k):
    t_rows = k.shape[0]
    x = jnp.concatenate([x.reshape(t_rows, -1) for x in xs], axis=1)
    dtype = x.dtype
    nbits = _NBITS[dtype.itemsize]
    bits = _magnitude_bits(x)  # [T, n], monotone in |x|
    int_dtype = bits.dtype
    n = bits.shape[1]

    def body(i, prefix):  # a loop, not unrolled: one compiled pass for every bit
        cand = prefix | jnp.left_shift(jnp.asarray(1, int_dtype), (nbits - 1 - i).astype(int_dtype))
        count = jnp.sum(bits[:, None, :] >= cand[:, :, None], axis=-1, dtype=k.dtype)
        return jnp.where(count >= k, cand, prefix)

    prefix = jax.lax.fori_loop(0, nbits, body, jnp.zeros(k.shape, int_dtype))
    int_type = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[dtype.itemsize]
    value = jax.lax.bitcast_convert_type(prefix.astype(int_type), dtype)
    value = jnp.where(k > n, jnp.zeros((), dtype), value)
    return jnp.where(k <= 0, jnp.asarray(jnp.inf, dtype), value)


# -- Streaming: the same select over leaves read one at a time ----------------
#
# The histograms are additive over arrays, so the k-th largest magnitude of a
# whole model is found exactly by passing every leaf through ``stream_update``
# once per digit (two passes for float32), with ``stream_begin``/``stream_end``
# around each pass. Values are ranked as float32.

DIGITS_F32 = tuple(_digits(_NBITS[4]))


def stream_init(k: jax.Array, n: int) -> dict:
    """The state of a streamed select of the ``k[t, r]``-th largest over ``n`` entries per row.

    ``k`` is ``[T]`` or ``[T, m]`` (``m`` ranks per row, found in the same passes).
    """
    k = jnp.asarray(k, jnp.int32)
    k = k.reshape(k.shape[0], -1)
    t, m = k.shape
    return {
        "k": k,
        "n": jnp.asarray(min(n, np.iinfo(np.int32).max), jnp.int32),
        "prefix": jnp.zeros((t, m), jnp.int32),
        "above": jnp.zeros((t, m), jnp.int32),
        "hist": jnp.zeros((t, m, 1), jnp.int32),
    }


def stream_begin(state: dict, pass_index: int) -> dict:
    """Starts pass ``pass_index``: an empty histogram of that pass's digit."""
    t, m = state["k"].shape
    return {**state, "hist": jnp.zeros((t, m, 1 << DIGITS_F32[pass_index]), jnp.int32)}


def stream_update(state: dict, x: jax.Array, pass_index: int) -> dict:
    """Adds the magnitudes of one stacked float32 array ``[T, ...]`` to the pass's histogram."""
    d = DIGITS_F32[pass_index]
    done = sum(DIGITS_F32[:pass_index])
    shift = _NBITS[4] - done - d
    base = state["prefix"] << d
    hist = _histogram([x], shift, base, 1 << d, jnp.int32)
    return {**state, "hist": state["hist"] + hist}


def stream_end(state: dict, pass_index: int) -> dict:
    """Closes a pass: picks the digit of the k-th largest from the histogram."""
    d = DIGITS_F32[pass_index]
    j, above = _select(state["hist"], state["above"], state["k"])
    return {**state, "prefix": (state["prefix"] << d) + j, "above": above}


def stream_result(state: dict) -> jax.Array:
    """The ``[T, m]`` values after the last pass (``+inf`` for ``k <= 0``, 0 for ``k > n``)."""
    value = jax.lax.bitcast_convert_type(state["prefix"], jnp.float32)
    k = state["k"]
    value = jnp.where(k > state["n"], jnp.zeros((), jnp.float32), value)
    return jnp.where(k <= 0, jnp.asarray(jnp.inf, jnp.float32), value)
