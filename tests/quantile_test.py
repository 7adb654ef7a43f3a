"""kth_largest (exact radix select over bit patterns) against np.sort."""

import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fusionjax._src import quantile


def reference(rows, k):
    """k-th largest |x| of each row by sorting; +inf for k <= 0 and 0 for k > n."""
    mags = np.abs(np.asarray(rows, np.float64))
    desc = -np.sort(-mags, axis=1)
    n = desc.shape[1]
    out = np.empty(k.shape, np.float64)
    for t, r in np.ndindex(*k.shape):
        kk = int(k[t, r])
        out[t, r] = np.inf if kk <= 0 else (0.0 if kk > n else desc[t, kk - 1])
    return out


def sample(rng, shape, dtype, kind):
    x = rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 6)
    if kind == "ties":  # few distinct values, many ties
        x = np.round(x / np.max(np.abs(x)) * 4)
    elif kind == "zeros":  # half exact zeros, some negative zeros
        x = x * (rng.random(shape) < 0.5)
        x[..., :3] = -0.0
    elif kind == "tiny":  # subnormals and signed values
        x = x * np.finfo(np.float32).smallest_subnormal * 7
    lim = float(ml_dtypes.finfo(dtype).max) / 4
    x = np.clip(x, -lim, lim)
    if kind == "inf":
        x[..., ::7] = np.inf
    return np.asarray(x).astype(dtype)


DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]
KINDS = ["normal", "ties", "zeros", "tiny", "inf"]


def ranks(rng, t, n, m):
    edge = np.array([-3, 0, 1, 2, n - 1, n, n + 1, n + 5])
    return rng.choice(np.concatenate([edge, rng.integers(1, n + 1, 8)]), size=(t, m))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [None, 3])
def test_matches_sort(dtype, kind, m):
    rng = np.random.default_rng(zlib.crc32(f"{np.dtype(dtype)}{kind}{m}".encode()))
    f = jax.jit(quantile.kth_largest)
    for t, n in [(1, 1), (3, 37), (2, 4099)]:
        x = sample(rng, (t, n), dtype, kind)
        k = ranks(rng, t, n, m or 1)
        got = f([jnp.asarray(x)], jnp.asarray(k if m else k[:, 0], jnp.int32))
        assert got.shape == ((t, m) if m else (t,))
        assert got.dtype == x.dtype
        got = np.asarray(got, np.float64).reshape(t, -1)
        np.testing.assert_array_equal(got, reference(x, k), err_msg=f"{t=} {n=} {k=}")


def test_several_arrays_form_one_population_and_trailing_axes():
    rng = np.random.default_rng(1)
    xs = [
        sample(rng, (3, 5, 7), np.float32, "ties"),
        sample(rng, (3, 40), np.float32, "normal"),
        sample(rng, (3,), np.float32, "zeros"),
    ]
    rows = np.concatenate([x.reshape(3, -1) for x in xs], axis=1)
    k = ranks(rng, 3, rows.shape[1], 4)
    got = jax.jit(quantile.kth_largest)([jnp.asarray(x) for x in xs], jnp.asarray(k, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got, np.float64), reference(rows, k))


def test_keeping_at_least_the_threshold_keeps_the_top_k():
    rng = np.random.default_rng(2)
    x = sample(rng, (4, 999), np.float32, "ties")
    k = np.array([1, 200, 998, 999])
    v = np.asarray(quantile.kth_largest([jnp.asarray(x)], jnp.asarray(k, jnp.int32)))
    mags = np.abs(x)
    for t in range(4):
        assert np.sum(mags[t] >= v[t]) >= k[t] > np.sum(mags[t] > v[t])


def test_chunked_passes_match(monkeypatch):
    # Small chunks exercise the chunk loop, ragged last chunks and the ordering trick.
    monkeypatch.setattr(quantile, "_STEP_ENTRIES", 64)
    monkeypatch.setattr(quantile, "_MAX_CHUNKS", 1000)
    rng = np.random.default_rng(3)
    x = sample(rng, (3, 13, 101), np.float32, "ties")
    k = ranks(rng, 3, x[0].size, 2)
    got = jax.jit(quantile.kth_largest)([jnp.asarray(x)], jnp.asarray(k, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got, np.float64), reference(x.reshape(3, -1), k))


@pytest.mark.parametrize("kind", ["normal", "ties", "tiny", "inf"])
def test_float64(kind):
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        x = sample(rng, (2, 3001), np.float64, kind)
        x[0, 5] = np.nextafter(x[0, 6], np.inf)  # values one ulp apart
        k = ranks(rng, 2, x.shape[1], 3)
        got = jax.jit(quantile.kth_largest)([jnp.asarray(x)], jnp.asarray(k))
        assert got.dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(got), reference(x, k))


def test_eager_matches_jit_and_rejects_bad_input():
    x = jnp.asarray(np.arange(12, dtype=np.float32).reshape(2, 6))
    k = jnp.asarray([2, 6], jnp.int32)
    np.testing.assert_array_equal(quantile.kth_largest([x], k), jax.jit(quantile.kth_largest)([x], k))
    np.testing.assert_array_equal(quantile.kth_largest([x], k), [4.0, 6.0])
    with pytest.raises(TypeError, match="float dtype"):
        quantile.kth_largest([x.astype(jnp.int32)], k)
    with pytest.raises(ValueError, match="one row per array row"):
        quantile.kth_largest([x], jnp.asarray([1, 2, 3], jnp.int32))
