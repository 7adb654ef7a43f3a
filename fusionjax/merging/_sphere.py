r"""Mergers on the sphere: NuSLERP, Multi-SLERP and the Karcher mean (mergekit's methods).

Every merger of :func:`fusionjax.merge` receives task vectors
:math:`\tau_t = \theta_t - \theta_0` and the base :math:`\theta_0`. Methods that
mergekit runs with no base model (``karcher``; ``nuslerp`` and ``multislerp``
without ``base_model``) work on the weights :math:`\theta_t = \theta_0 + \tau_t`
(``space="weights"``), so the base only carries the structure: pass any model of
the same structure as ``base`` — the result does not depend on it, up to float32
rounding of :math:`\theta_0 + (\theta_t - \theta_0)`; a zero base
(``jax.tree.map(jnp.zeros_like, finetuned[0])``) makes the round trip exact.
With a base model (``space="task_vectors"``) the task vectors are interpolated and
added to the base.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Step
from fusionjax.merging._ties import check_choice

_HIGHEST = jax.lax.Precision.HIGHEST
Space = Literal["weights", "task_vectors"]


def _points(x, base, space, name):
    """The stacked points to merge: weights ``base + x`` or the task vectors ``x``."""
    if space == "task_vectors":
        return x
    if base is None:
        raise ValueError(f"{name}(space='weights') needs the base parameters as `base`.")
    return x + base[None]


def _back(y, base, space):
    return y if space == "task_vectors" else y - base


def _norm(v, axis=-1, keepdims=False):
    return jnp.sqrt(jnp.sum(v * v, axis=axis, keepdims=keepdims))


# -- NuSLERP ------------------------------------------------------------------


def _nuslerp_last(v0, v1, t, eps=1e-8):
    """The ``nuslerp`` of mergekit along the last axis (each vector on its own)."""
    u0 = v0 / jnp.maximum(_norm(v0, keepdims=True), 1e-7)
    u1 = v1 / jnp.maximum(_norm(v1, keepdims=True), 1e-7)
    cos = jnp.clip(jnp.sum(u0 * u1, axis=-1, keepdims=True), -1.0, 1.0)
    colinear = (1 - cos * cos) <= eps**2
    theta = jnp.arccos(jnp.where(colinear, 0.0, cos))
    sin = jnp.sin(theta)
    res = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / jnp.where(colinear, 1.0, sin)
    return jnp.where(colinear, (1 - t) * v0 + t * v1, res)


def _nuslerp(x, *, base, t, space, flatten, axis, **_):
    if x.shape[0] != 2:
        raise ValueError(f"nuslerp merges exactly 2 models, got {x.shape[0]}.")
    p = _points(x, base, space, "nuslerp")
    t = t.astype(p.dtype)
    v0, v1 = p[0], p[1]
    if flatten or v0.ndim <= 1:
        out = _nuslerp_last(v0.reshape(-1), v1.reshape(-1), t).reshape(v0.shape)
    else:
        ax = axis % v0.ndim
        out = jnp.moveaxis(
            _nuslerp_last(jnp.moveaxis(v0, ax, -1), jnp.moveaxis(v1, ax, -1), t), -1, ax
        )
    return _back(out, base, space)


def _prepare_nuslerp(hp, info):
    if info.num_models != 2:
        raise ValueError(f"nuslerp merges exactly 2 models, got {info.num_models}.")
    if "weights" not in hp:
        return hp
    w = hp["weights"]
    if validation.is_concrete(w):
        w = np.asarray(w, np.float64)
        total = w[0] + w[1]
        t = 0.5 if abs(total) < 1e-6 else w[1] / total
        return {"t": np.float64(t)}
    total = w[0] + w[1]
    return {"t": jnp.where(jnp.abs(total) < 1e-6, 0.5, w[1] / jnp.where(total == 0, 1, total))}


def nuslerp(
    *,
    t: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    flatten: bool = True,
    axis: int = -1,
    space: Space = "weights",
) -> Step:
    r"""NuSLERP (mergekit's ``nuslerp``): SLERP of two models, whole or vector by vector.

    With :math:`v_0, v_1` the two models' leaves (``space="weights"``) or their task
    vectors (``"task_vectors"``, mergekit with a ``base_model``: the result is added
    to the base), :math:`u_i = v_i/\max(\|v_i\|, 10^{-7})`,
    :math:`\cos\Omega = \mathrm{clip}(\langle u_0, u_1\rangle, -1, 1)` and

    .. math::
       \mathrm{nuslerp}(v_0, v_1; t)
       = \frac{\sin((1-t)\Omega)\,v_0 + \sin(t\Omega)\,v_1}{\sin\Omega},

    falling back to :math:`(1-t)v_0 + t v_1` when
    :math:`1-\cos^2\Omega \le 10^{-16}` (collinear). A zero vector has
    :math:`u = 0`, so :math:`\Omega=\pi/2`. ``flatten=True`` (mergekit's
    ``nuslerp_flatten``, default true) treats each leaf as one vector;
    ``flatten=False`` interpolates each vector along ``axis`` separately (one
    angle per vector). mergekit's ``nuslerp_row_wise: false`` is torch's last
    dim, ``true`` its dim 0: on leaves in torch layout ``axis=-1`` / ``axis=0``;
    on a flax ``Dense`` kernel ``(in, out)`` (the transpose of torch's
    ``(out, in)``) the same vectors lie along ``axis=0`` / ``axis=-1``.

    :math:`t` is given directly, or from mergekit's per-model ``weight`` as
    :math:`t = w_1/(w_0+w_1)` (0.5 when :math:`|w_0+w_1|<10^{-6}`).

    Args:
      t: Interpolation factor; 0 gives the first model, 1 the second.
        Default 0.5 (when ``weights`` is not given).
      weights: mergekit's two per-model weights ``[w_0, w_1]`` instead of ``t``.
      flatten: Interpolate each leaf as one vector.
      axis: The axis the vectors lie along when ``flatten`` is false.
      space: ``"weights"`` (mergekit without a base model) or ``"task_vectors"``
        (with one).

    Returns:
      A merger for :func:`fusionjax.merge` that takes exactly two models.

    Raises:
      ValueError: naming the parameter: both ``t`` and ``weights``, a bad ``space``.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(2)}
      >>> fts = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}]
      >>> fj.merge(base, fts, fj.merging.nuslerp(weights=[1.0, 1.0]))
      {'w': Array([0.70710677, 0.70710677], dtype=float32)}

    References:
      mergekit, `nuslerp <https://github.com/arcee-ai/mergekit>`_ (Goddard et al, 2024);
      Shoemake, `Animating rotation with quaternion curves
      <https://doi.org/10.1145/325165.325242>`_, SIGGRAPH 1985
    """
    check_choice("space", space, ("weights", "task_vectors"))
    if t is not None and weights is not None:
        raise ValueError("nuslerp takes t or weights, not both.")
    if not isinstance(axis, int):
        raise TypeError(f"axis must be an int, got {axis!r}.")
    if weights is not None:
        validation.check_hparam("weights", weights)
        hparams = {"weights": weights}
    else:
        t = 0.5 if t is None else t
        validation.check_hparam("t", t)
        hparams = {"t": t}
    return Step(
        "nuslerp",
        _nuslerp,
        reduces=True,
        flat=bool(flatten),
        hparams=hparams,
        options={"space": space, "flatten": bool(flatten), "axis": int(axis)},
        per_model=("weights",),
        prepare=_prepare_nuslerp,
    )


# -- Multi-SLERP --------------------------------------------------------------


def _multislerp(x, *, base, weights, space, normalize, eps, **_):
    n = x.shape[0]
    p = _points(x, base, space, "multislerp")
    if n == 1:
        return _back(p[0], base, space)
    v = p.reshape(n, -1)
    w = weights.astype(p.dtype)
    if normalize:
        w = w / jnp.sum(w)
    norms = _norm(v, keepdims=True)  # [n, 1]
    units = v / (norms + eps)
    mean = jnp.sum(units * w[:, None], axis=0)
    mean_norm = _norm(mean)
    degenerate = mean_norm < eps
    mean = mean / jnp.where(degenerate, 1.0, mean_norm)
    dots = jnp.sum(units * mean[None], axis=-1, keepdims=True)
    tangent = jnp.sum((units - dots * mean[None]) * w[:, None], axis=0)
    tn = _norm(tangent) + eps
    res = mean * jnp.cos(tn) + tangent * (jnp.sin(tn) / tn)
    res = res * jnp.sum(norms[:, 0] * w)
    lerp = jnp.sum(v * w[:, None], axis=0)
    out = jnp.where(degenerate, lerp, res).reshape(p.shape[1:])
    return _back(out, base, space)


def multislerp(
    *,
    weights: ArrayLike | None = None,
    space: Space = "weights",
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> Step:
    r"""Multi-SLERP (mergekit's ``multislerp``): barycentric interpolation on the sphere.

    With :math:`v_t` the models' leaves (``space="weights"``) or task vectors
    (``"task_vectors"``, mergekit with a ``base_model``), each flattened, and
    weights :math:`w_t` (normalised to sum to 1 when ``normalize_weights``):

    1. :math:`u_t = v_t/(\|v_t\|+\epsilon)`, :math:`m = \sum_t w_t u_t / \|\sum_t w_t u_t\|`;
    2. tangent vectors at :math:`m`: :math:`g = \sum_t w_t(u_t - \langle u_t, m\rangle m)`;
    3. exponential map back, rescaled by the weighted mean norm:
       :math:`\Big(m\cos\|g\|' + g\frac{\sin\|g\|'}{\|g\|'}\Big)\sum_t w_t\|v_t\|`
       with :math:`\|g\|' = \|g\| + \epsilon`.

    When :math:`\|\sum_t w_t u_t\| < \epsilon` (antipodal points that cancel)
    mergekit falls back to :math:`\sum_t w_t v_t` for two models and raises for
    more; here the fallback is used for any number of models. One model is
    returned as it is. Two models at weights :math:`(1-t, t)` give a SLERP-like
    path with endpoints the two models.

    Args:
      weights: Per-model weights ``[T]`` (mergekit's ``weight``); default equal.
      space: ``"weights"`` (no base model) or ``"task_vectors"`` (with one).
      normalize_weights: Divide the weights by their sum (mergekit's default).
      eps: :math:`\epsilon` (mergekit's ``eps``, 1e-8).

    Returns:
      A merger for :func:`fusionjax.merge`.

    References:
      Goddard, `Multi-SLERP <https://goddard.blog/posts/multislerp-wow-what-a-cool-idea>`_, 2025
    """
    check_choice("space", space, ("weights", "task_vectors"))
    validation.check_hparam("weights", weights)
    validation.check_hparam("eps", eps, lower=0.0, lower_open=True)
    if (
        normalize_weights
        and weights is not None
        and validation.is_concrete(weights)
        and abs(float(np.sum(np.asarray(weights, np.float64)))) == 0.0
    ):
        raise ValueError("multislerp: weights sum to zero and cannot be normalised.")
    return Step(
        "multislerp",
        _multislerp,
        reduces=True,
        flat=True,
        hparams={"weights": 1.0 if weights is None else weights, "eps": eps},
        options={"space": space, "normalize": bool(normalize_weights)},
        per_model=("weights",),
    )


# -- Karcher mean -------------------------------------------------------------


def _karcher(x, *, base, weights, tol, max_iter, space, **_):
    n = x.shape[0]
    p = _points(x, base, space, "karcher")
    if n == 1:
        return _back(p[0], base, space)
    v = p.reshape(n, -1)
    dt = v.dtype
    alphas = weights.astype(dt)
    alphas = alphas / jnp.sum(alphas)
    tol = tol.astype(dt)
    norms = _norm(v)  # [n]
    units = jnp.where(norms[:, None] > 0, v / jnp.where(norms > 0, norms, 1.0)[:, None], 0.0)
    valid = norms > tol
    va = jnp.where(valid, alphas, 0.0)
    va = va / jnp.where(jnp.any(valid), jnp.sum(va), 1.0)
    u0 = jnp.sum(units * va[:, None], axis=0)
    nu = _norm(u0)
    first = units[jnp.argmax(valid)]
    u = jnp.where(nu < tol, first, u0 / jnp.where(nu > 0, nu, 1.0))

    def body(_, carry):
        u, done = carry
        dots = jnp.clip(jnp.matmul(units, u, precision=_HIGHEST), -1.0, 1.0)
        theta = jnp.arccos(dots)
        use = valid & (theta >= tol)
        coef = jnp.where(use, va * theta / jnp.where(use, jnp.sin(theta), 1.0), 0.0)
        tangent = jnp.sum(coef[:, None] * (units - dots[:, None] * u[None]), axis=0)
        tn = _norm(tangent)
        stop = tn < tol
        new = jnp.cos(tn) * u + jnp.sin(tn) * (tangent / jnp.where(stop, 1.0, tn))
        un = _norm(new)
        new = jnp.where(un > tol, new / jnp.where(un > 0, un, 1.0), new)
        keep = done | stop
        return jnp.where(keep, u, new), keep

    u, _ = jax.lax.fori_loop(0, max_iter, body, (u, jnp.zeros((), bool)))
    s = jnp.sum(alphas * norms)
    out = jnp.where(jnp.any(valid), s * u, 0.0).reshape(p.shape[1:])
    return _back(out, base, space)


def karcher(
    *,
    weights: ArrayLike | None = None,
    max_iter: int = 10,
    tol: ArrayLike = 1e-5,
    space: Space = "weights",
) -> Step:
    r"""Karcher (Riemannian) mean of the models on the sphere (mergekit's ``karcher``).

    Each model's leaf :math:`v_t` (flattened) is split into a norm
    :math:`n_t=\|v_t\|` and a direction :math:`u_t = v_t/n_t`. The direction of the
    result is the weighted Karcher mean of the :math:`u_t` with
    :math:`n_t>\mathrm{tol}`, :math:`\mu = \arg\min_{\|\mu\|=1}\sum_t\alpha_t
    d(\mu, u_t)^2` (geodesic distance :math:`d`), found by Riemannian gradient
    steps from the normalised weighted mean:

    .. math::
       g = \sum_{t:\,\theta_t\ge\mathrm{tol}} \alpha_t\frac{\theta_t}{\sin\theta_t}
           (u_t - \cos\theta_t\,\mu),\qquad
       \mu \leftarrow \cos\|g\|\,\mu + \sin\|g\|\frac{g}{\|g\|},

    :math:`\theta_t = \arccos\mathrm{clip}(\langle\mu, u_t\rangle)`, renormalised,
    until :math:`\|g\| < \mathrm{tol}` or ``max_iter`` steps. The result is
    :math:`\big(\sum_t\alpha_t n_t\big)\mu` (zero if every norm is below ``tol``).

    mergekit's ``karcher`` takes no base model: all the models it is given are
    averaged with :math:`\alpha_t = 1/N` — including the base model when the
    config names one. Here the fine-tuned models are averaged (``space="weights"``;
    pass the base among ``finetuned`` too to reproduce such a config); the base
    argument only carries the structure (see :mod:`fusionjax.merging._sphere`).

    Args:
      weights: Optional per-model weights :math:`\alpha_t` (normalised to sum to
        1); default equal, as mergekit.
      max_iter: Maximum number of gradient steps (mergekit's ``max_iter``, 10).
      tol: Tolerance (mergekit's ``tol``, 1e-5): norms, angles and the step size
        below it are treated as zero.
      space: ``"weights"`` (mergekit) or ``"task_vectors"`` (the mean of the task
        vectors, added to the base).

    Returns:
      A merger for :func:`fusionjax.merge`.

    Raises:
      ValueError: naming the parameter (``max_iter`` < 1, ``tol`` <= 0, ...).

    References:
      Karcher, `Riemannian center of mass and mollifier smoothing
      <https://doi.org/10.1002/cpa.3160300502>`_, CPAM 1977; mergekit's ``karcher``
    """
    check_choice("space", space, ("weights", "task_vectors"))
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}.")
    validation.check_hparam("tol", tol, lower=0.0, lower_open=True)
    validation.check_weights(weights)
    return Step(
        "karcher",
        _karcher,
        reduces=True,
        flat=True,
        hparams={"weights": 1.0 if weights is None else weights, "tol": tol},
        options={"max_iter": int(max_iter), "space": space},
        per_model=("weights",),
    )
