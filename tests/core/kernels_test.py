"""The merge kernel's fused NaN/Inf check and its one-copy reads of NumPy leaves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fusionjax as fj
from fusionjax._src import kernels


def _models(dtype):
    rng = np.random.default_rng(0)
    # "big" (> SMALL_LEAF entries) is merged alone, "small" in a group of small leaves.
    base = {"big": rng.standard_normal((130, 130)), "small": rng.standard_normal((7, 5))}
    base = {k: v.astype(dtype) for k, v in base.items()}
    fts = [{k: (v + 0.1 * (t + 1)).astype(dtype) for k, v in base.items()} for t in range(3)]
    return base, fts


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
@pytest.mark.parametrize("leaf", ["big", "small"])
def test_nonfinite_names_the_first_bad_model(dtype, leaf):
    base, fts = _models(dtype)
    fts[1][leaf] = fts[1][leaf].copy()
    fts[1][leaf][3, 4] = np.inf
    fts[2][leaf] = fts[2][leaf].copy()
    fts[2][leaf][0, 0] = np.nan
    with pytest.raises(ValueError, match=rf"finetuned\[1\] has NaN or Inf values at \['{leaf}'\]"):
        fj.merge(base, fts, fj.merging.task_arithmetic(scaling=0.5))
    base[leaf] = base[leaf].copy()
    base[leaf][1, 1] = -np.inf
    with pytest.raises(ValueError, match=rf"base has NaN or Inf values at \['{leaf}'\]"):
        fj.merge(base, fts, fj.merging.ties())


@pytest.mark.parametrize("dtype", [np.float32, np.float16, jnp.bfloat16])
def test_all_finite_matches_numpy(dtype):
    x = np.linspace(-3e4, 3e4, 1000).astype(dtype)
    assert bool(kernels.all_finite([x, x + 1]))
    for bad in (np.inf, -np.inf, np.nan):
        y = x.copy()
        y[-1] = bad
        assert not bool(kernels.all_finite([x, y]))
        assert kernels.finite_each([x, y, x]).tolist() == [True, False, True]


def test_to_device_copies_unaligned_readonly_views_once_and_owns_them():
    raw = bytearray(4 * 1000 + 3)
    view = np.frombuffer(raw, np.uint8, 4 * 1000, 3).view(np.float32)  # misaligned
    raw[3 : 3 + 4000] = np.arange(1000, dtype=np.float32).tobytes()
    y = kernels.to_device(view)
    assert isinstance(y, jax.Array) and y.dtype == jnp.float32 and y.shape == (1000,)
    raw[3:7] = np.float32(-5).tobytes()  # the source changes after the read
    np.testing.assert_array_equal(np.asarray(y), np.arange(1000, dtype=np.float32))


def test_to_device_follows_jnp_asarray_for_other_inputs():
    x64 = np.arange(5, dtype=np.float64)  # not canonical without jax_enable_x64
    assert kernels.to_device(x64).dtype == jnp.asarray(x64).dtype
    strided = np.arange(20, dtype=np.float32)[::2]
    np.testing.assert_array_equal(np.asarray(kernels.to_device(strided)), strided)
    assert kernels.to_device(3.0).dtype == jnp.asarray(3.0).dtype
