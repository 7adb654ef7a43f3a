"""DARE: drop and rescale task-vector entries at random."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import keys as keys_lib
from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Step
from fusionjax._src.merge import chain
from fusionjax.merging import _linear
from fusionjax.merging._linear import scale
from fusionjax.merging._linear import task_arithmetic
from fusionjax.merging._ties import _merger
from fusionjax.merging._ties import check_choice
from fusionjax.merging._ties import convention_default
from fusionjax.merging._ties import elect_sign
from fusionjax.merging._ties import l1_rescale


def _prepare_dare(hp, info):
    return {**hp, "n": np.int32(info.size)}


def _drop_and_rescale(x, *, key, drop_rate, n, rescale="inverse", **_):
    keys_lib.require_key(key, "drop_and_rescale")
    if rescale != "inverse":
        # The same mask, kept entries unscaled; then mergekit's L1 rescale or none.
        zero = jnp.zeros((), x.dtype)
        keep = 1.0 - drop_rate.astype(x.dtype)
        masked = jnp.where(_drop_and_rescale(x, key=key, drop_rate=drop_rate, n=n) != 0, x, zero)
        masked = jnp.where((keep >= 1.0).reshape((-1,) + (1,) * (x.ndim - 1)), x, masked)
        return l1_rescale(x, masked) if rescale == "l1" else masked
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


def drop_and_rescale(
    *, drop_rate: ArrayLike = 0.9, rescale: Literal["inverse", "l1", "none"] = "inverse"
) -> Step:
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
      rescale: ``"inverse"`` (the paper): kept entries times :math:`1/(1-p)`;
        ``"l1"`` (mergekit's ``rescale: true``, its default for ``dare_ties`` and
        ``dare_linear``): the masked task vector scaled to the L1 norm of the
        unmasked one, :math:`\hat\tau_t = m_t\odot\tau_t\,\|\tau_t\|_1 /
        \|m_t\odot\tau_t\|_1` (unscaled if a norm is below 1e-7); ``"none"``
        (mergekit's ``rescale: false``): the kept entries unscaled. The mask is
        the same in all three. mergekit's ``density`` is :math:`1-p`.

    Returns:
      A random task-vector :class:`fusionjax.Step` ``[T, ...] -> [T, ...]``.

    References:
      Yu et al, `Language Models are Super Mario: Absorbing Abilities from
      Homologous Models as a Free Lunch <https://arxiv.org/abs/2311.03099>`_,
      ICML 2024
    """
    validation.check_hparam("drop_rate", drop_rate, lower=0.0, upper=1.0, upper_open=True)
    check_choice("rescale", rescale, ("inverse", "l1", "none"))
    return Step(
        "drop_and_rescale",
        _drop_and_rescale,
        flat=True,
        reduces=False,
        hparams={"drop_rate": drop_rate},
        options={} if rescale == "inverse" else {"rescale": rescale},
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


def dare_ties(
    *,
    drop_rate: ArrayLike = 0.9,
    scaling: ArrayLike = 1.0,
    weights: ArrayLike | None = None,
    merge: Literal["mean", "sum"] | None = None,
    rescale: Literal["inverse", "l1", "none"] | None = None,
    zero_sign: Literal["drop", "positive"] | None = None,
    convention: Literal["fusionjax", "mergekit"] = "fusionjax",
) -> Step:
    r"""DARE sparsification with TIES sign election and a disjoint merge.

    ``chain(drop_and_rescale(p, rescale), elect_sign(zero_sign, weights),
    merger, scale(λ))``: DARE replaces TIES' magnitude trimming.

    Defaults by ``convention``:

    ===============  ==================  ==========================
    option           ``"fusionjax"``     ``"mergekit"`` (dare_ties)
    ===============  ==================  ==========================
    ``merge``        ``"mean"``          ``"sum"`` (normalize false)
    ``rescale``      ``"inverse"`` 1/q   ``"l1"`` (rescale true)
    ``zero_sign``    ``"drop"``          ``"positive"``
    ===============  ==================  ==========================

    Args:
      drop_rate: :math:`p`, see :func:`drop_and_rescale` (mergekit's ``1 - density``).
      scaling: :math:`\lambda` (mergekit's ``lambda``).
      weights: Optional per-model weights (mergekit's ``weight``), see :func:`ties`.
      merge: ``"mean"`` (:func:`disjoint_mean`) or ``"sum"``.
      rescale: See :func:`drop_and_rescale`.
      zero_sign: See :func:`elect_sign`.
      convention: ``"fusionjax"`` or ``"mergekit"``, the defaults above.

    Returns:
      A random merger for :func:`fusionjax.merge` (pass ``key=``).

    References:
      Yu et al, `Language Models are Super Mario
      <https://arxiv.org/abs/2311.03099>`_, ICML 2024
    """
    merge = convention_default(convention, merge, fusionjax="mean", mergekit="sum")
    rescale = convention_default(convention, rescale, fusionjax="inverse", mergekit="l1")
    zero_sign = convention_default(convention, zero_sign, fusionjax="drop", mergekit="positive")
    check_choice("merge", merge, ("mean", "sum"))
    return chain(
        drop_and_rescale(drop_rate=drop_rate, rescale=rescale),
        elect_sign(zero=zero_sign, weights=weights),
        _merger(merge, weights),
        scale(scaling),
    )


def dare_linear(
    *,
    drop_rate: ArrayLike = 0.9,
    scaling: ArrayLike = 1.0,
    weights: ArrayLike | None = None,
    normalize: bool = False,
    rescale: Literal["inverse", "l1", "none"] = "l1",
) -> Step:
    r"""DARE then a weighted sum, no sign election: mergekit's ``dare_linear``.

    DARE, then a weighted sum, no sign election.

    :math:`\tau = \lambda\sum_t w_t\hat\tau_t` (divided by :math:`\sum_t w_t`
    when ``normalize``), :math:`\hat\tau_t` from :func:`drop_and_rescale`.

    Args:
      drop_rate: :math:`p` (mergekit's ``1 - density``).
      scaling: :math:`\lambda` (mergekit's ``lambda``).
      weights: Per-model weights (mergekit's ``weight``); default all 1.
      normalize: Divide by :math:`\sum_t w_t` (mergekit's ``normalize``, default false;
        weights must then be non-negative).
      rescale: See :func:`drop_and_rescale`; default ``"l1"`` as mergekit.

    Returns:
      A random merger for :func:`fusionjax.merge` (pass ``key=``).
    """
    merger = _linear.mean(weights) if normalize else _linear.sum(weights)
    return chain(drop_and_rescale(drop_rate=drop_rate, rescale=rescale), merger, scale(scaling))
