"""DARE: drop and rescale task-vector entries at random."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import keys as keys_lib
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Step
from fusionjax._src.merge import chain
from fusionjax.merging._linear import scale
from fusionjax.merging._linear import task_arithmetic
from fusionjax.merging._ties import disjoint_mean
from fusionjax.merging._ties import elect_sign


def _prepare_dare(hp, info):
    return {**hp, "n": np.int32(info.size)}


def _drop_and_rescale(x, *, key, drop_rate, n, **_):
    keys_lib.require_key(key, "drop_and_rescale")
    keep = 1.0 - drop_rate.astype(x.dtype)  # [T], one rate per model
    zero = jnp.zeros((), x.dtype)
    # The mask is exactly ``jax.random.bernoulli(key, keep, x.shape)``, drawn
    # here with Threefry-2x32 unrolled, row by row. On CPU JAX lowers Threefry
    # to a rolled loop that materialises two uint32 [T, ...] arrays and
    # rewrites them 5 times (~2 s for 3 x 16M entries); unrolled, the draw
    # fuses with the rescale and the merge (~15x faster, no temporaries).
    # Other key types, dtypes or settings take the jax.random path.
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    impl = str(jax.random.key_impl(key)) if typed else jax.config.jax_default_prng_impl
    if (
        impl != "threefry2x32"
        or not jax.config.jax_threefry_partitionable
        or x.dtype != jnp.float32
        or key.shape != (() if typed else (2,))
        or x.size >= 2**32
    ):
        keep_b = keep.reshape((-1,) + (1,) * (x.ndim - 1))
        mask = jax.random.bernoulli(key, keep_b, x.shape)
        return jnp.where(mask, x / keep_b, zero)
    data = jax.random.key_data(key) if typed else key
    k1, k2 = data[0], data[1]
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))

    def rotl(v, d):
        return jax.lax.shift_left(v, np.uint32(d)) | jax.lax.shift_right_logical(
            v, np.uint32(32 - d)
        )

    def uniform(counter):  # jax.random.uniform's float32 from threefry bits
        v0, v1 = ks[0], counter + ks[1]  # the high counter word is 0 (size < 2**32)
        for i in range(5):
            for r in ((13, 15, 26, 6), (17, 29, 16, 24))[i % 2]:
                v0 = v0 + v1
                v1 = v0 ^ rotl(v1, r)
            v0 = v0 + ks[(i + 1) % 3]
            v1 = v1 + ks[(i + 2) % 3] + np.uint32(i + 1)
        bits = jax.lax.shift_right_logical(v0 ^ v1, np.uint32(9)) | np.uint32(0x3F800000)
        return jax.lax.bitcast_convert_type(bits, jnp.float32) - jnp.float32(1.0)

    # Counters are t * n + i with n the leaf's true size, so a leaf flattened and
    # zero-padded (merged in a group of small leaves) draws the same mask.
    iota = jax.lax.iota(jnp.uint32, x[0].size).reshape(x.shape[1:])
    n = jnp.asarray(n).astype(jnp.uint32)
    return jnp.stack(
        [
            jnp.where(uniform(iota + np.uint32(t) * n) < keep[t], x[t] / keep[t], zero)
            for t in range(x.shape[0])
        ]
    )


def drop_and_rescale(*, drop_rate: ArrayLike = 0.9) -> Step:
    r"""DARE: drops each task-vector entry with probability :math:`p`, rescales the rest.

    :math:`\hat\tau_t = m_t \odot \tau_t / (1 - p)` with
    :math:`m_t \sim \mathrm{Bernoulli}(1-p)` drawn independently per entry and
    per model, so :math:`\mathbb{E}[\hat\tau_t] = \tau_t`. Random: needs ``key``.
    The mask of a leaf depends only on ``key`` and the leaf's path.

    Args:
      drop_rate: :math:`p\in[0, 1)`, the fraction of entries dropped; one value,
        or one per model (shape ``[T]``). The paper
        drops 90% (and up to 99%) of the delta parameters of large language
        models; small models tolerate less.

    Returns:
      A random task-vector :class:`fusionjax.Step` ``[T, ...] -> [T, ...]``.

    References:
      Yu et al, `Language Models are Super Mario: Absorbing Abilities from
      Homologous Models as a Free Lunch <https://arxiv.org/abs/2311.03099>`_,
      ICML 2024
    """
    validation.check_hparam("drop_rate", drop_rate, lower=0.0, upper=1.0, upper_open=True)

    return Step(
        "drop_and_rescale",
        _drop_and_rescale,
        flat=True,
        reduces=False,
        hparams={"drop_rate": drop_rate},
        per_model=("drop_rate",),
        needs_key=True,
        prepare=_prepare_dare,
    )


def dare(
    *, drop_rate: ArrayLike = 0.9, merger: Step | None = None
) -> Step:
    r"""DARE followed by a merger (task arithmetic by default).

    ``dare(drop_rate=p, merger=m)`` is ``chain(drop_and_rescale(drop_rate=p), m)``.

    Args:
      drop_rate: :math:`p`, see :func:`drop_and_rescale`.
      merger: The merger applied to the sparsified task vectors; default
        :func:`task_arithmetic` with its default :math:`\lambda`. Any merger
        works, e.g. :func:`ties` (``density=1.0`` to keep DARE's sparsity only).

    Returns:
      A random merger for :func:`fusionjax.merge` (pass ``key=``).

    Examples:
      >>> import jax, jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(3)}
      >>> fts = [{"w": jnp.ones(3)}, {"w": 2 * jnp.ones(3)}]
      >>> m = fj.merging.dare(drop_rate=0.0, merger=fj.merging.mean())
      >>> fj.merge(base, fts, m, key=jax.random.key(0))
      {'w': Array([1.5, 1.5, 1.5], dtype=float32)}

    References:
      Yu et al, `Language Models are Super Mario
      <https://arxiv.org/abs/2311.03099>`_, ICML 2024
    """
    return chain(drop_and_rescale(drop_rate=drop_rate), merger or task_arithmetic())


def dare_ties(*, drop_rate: ArrayLike = 0.9, scaling: ArrayLike = 1.0) -> Step:
    r"""DARE sparsification with TIES sign election and disjoint mean.

    ``chain(drop_and_rescale(p), elect_sign(), disjoint_mean(), scale(λ))``: DARE
    replaces TIES' magnitude trimming (mergekit's ``dare_ties``).

    Args:
      drop_rate: :math:`p`, see :func:`drop_and_rescale`.
      scaling: :math:`\lambda`.

    Returns:
      A random merger for :func:`fusionjax.merge` (pass ``key=``).

    References:
      Yu et al, `Language Models are Super Mario
      <https://arxiv.org/abs/2311.03099>`_, ICML 2024
    """
    return chain(
        drop_and_rescale(drop_rate=drop_rate), elect_sign(), disjoint_mean(), scale(scaling)
    )
