"""Spherical linear interpolation (SLERP) of two models."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Step
from fusionjax.merging._ties import check_choice
from fusionjax.merging._ties import convention_default

_HIGHEST = jax.lax.Precision.HIGHEST


def slerp_arrays(
    v0: jax.Array,
    v1: jax.Array,
    t: ArrayLike,
    *,
    collinear_threshold: float = 0.9995,
    zero_norm: Literal["lerp", "right_angle"] = "lerp",
) -> jax.Array:
    r"""Spherical interpolation of two arrays, treated as flat vectors.

    With :math:`\cos\Omega = \langle v_0, v_1\rangle / (\|v_0\|\|v_1\|)`,
    :math:`\mathrm{slerp}(v_0, v_1; t) = \frac{\sin((1-t)\Omega)}{\sin\Omega}v_0
    + \frac{\sin(t\Omega)}{\sin\Omega}v_1`. When the vectors are nearly collinear
    (:math:`|\cos\Omega| >` ``collinear_threshold``) or one is zero, it falls
    back to linear interpolation :math:`(1-t)v_0 + t v_1`.

    Args:
      v0: First array.
      v1: Second array, same shape.
      t: Interpolation factor; 0 gives ``v0`` and 1 gives ``v1``.
      collinear_threshold: :math:`|\cos\Omega|` above which lerp is used.
      zero_norm: ``"lerp"`` (above); ``"right_angle"`` (mergekit and the
        gist it follows): a vector of norm :math:`\le 10^{-8}` is not normalised,
        so an exactly-zero array has :math:`\cos\Omega = 0`, :math:`\Omega=\pi/2`
        and :math:`\mathrm{slerp} = \cos(t\pi/2)v_0 + \sin(t\pi/2)v_1`.

    Returns:
      The interpolated array.
    """
    a, b = v0.reshape(-1), v1.reshape(-1)
    t = jnp.asarray(t, v0.dtype)
    na = jnp.sqrt(jnp.vdot(a, a, precision=_HIGHEST))
    nb = jnp.sqrt(jnp.vdot(b, b, precision=_HIGHEST))
    if zero_norm == "right_angle":
        na = jnp.where(na > 1e-8, na, 1.0)
        nb = jnp.where(nb > 1e-8, nb, 1.0)
    denom = na * nb
    safe = denom > 0
    cos = jnp.clip(jnp.vdot(a, b, precision=_HIGHEST) / jnp.where(safe, denom, 1.0), -1.0, 1.0)
    use_lerp = (~safe) | (jnp.abs(cos) > collinear_threshold)
    omega = jnp.arccos(jnp.where(use_lerp, 0.0, cos))
    sin = jnp.sin(jnp.where(use_lerp, 1.0, omega))
    s0 = jnp.where(use_lerp, 1.0 - t, jnp.sin((1.0 - t) * omega) / sin)
    s1 = jnp.where(use_lerp, t, jnp.sin(t * omega) / sin)
    return s0 * v0 + s1 * v1


def _exactly_two(hp, info):
    if info.num_models != 2:
        raise ValueError(f"slerp merges exactly 2 models, got {info.num_models}.")
    return hp


def _slerp(x, *, base, t, space, collinear_threshold, zero_norm="lerp", **_):
    if x.shape[0] != 2:
        raise ValueError(f"slerp merges exactly 2 models, got {x.shape[0]}.")
    kw = {"collinear_threshold": collinear_threshold, "zero_norm": zero_norm}
    if space == "task_vectors":
        return slerp_arrays(x[0], x[1], t, **kw)
    if base is None:
        raise ValueError("slerp(space='weights') needs the base parameters as `base`.")
    return slerp_arrays(base + x[0], base + x[1], t, **kw) - base


def slerp(
    *,
    t: ArrayLike = 0.5,
    space: Literal["weights", "task_vectors"] = "weights",
    collinear_threshold: float = 0.9995,
    zero_norm: Literal["lerp", "right_angle"] | None = None,
    convention: Literal["fusionjax", "mergekit"] = "fusionjax",
) -> Step:
    r"""SLERP between two models, leaf by leaf.

    Each leaf is interpolated on the great circle between the two models'
    values (see :func:`slerp_arrays`), falling back to linear interpolation when
    they are nearly collinear. ``space="weights"`` interpolates the parameters
    :math:`\theta_1, \theta_2` themselves (as mergekit does); ``"task_vectors"``
    interpolates :math:`\tau_1, \tau_2` and adds the result to the base, which is
    more informative when both models sit close to a shared base.

    Args:
      t: Interpolation factor in [0, 1]; 0 returns the first model.
      space: ``"weights"`` or ``"task_vectors"``.
      collinear_threshold: :math:`|\cos\Omega|` above which lerp is used.
      zero_norm: What a (near-)zero leaf does, see :func:`slerp_arrays`; default
        ``"lerp"``, with ``convention="mergekit"`` ``"right_angle"`` (angle
        :math:`\pi/2`, as mergekit and FusionBench). mergekit's ``slerp`` puts its
        ``base_model`` first: ``fj.merge(base, [base, other], slerp(t=t))``, or
        the two models themselves as ``finetuned``.
      convention: ``"fusionjax"`` or ``"mergekit"``: the default of ``zero_norm``.

    Returns:
      A merger for :func:`fusionjax.merge` that takes exactly two models.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(2)}
      >>> fts = [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}]
      >>> fj.merge(base, fts, fj.merging.slerp(t=0.5))
      {'w': Array([0.70710677, 0.70710677], dtype=float32)}

    References:
      Shoemake, `Animating rotation with quaternion curves
      <https://doi.org/10.1145/325165.325242>`_, SIGGRAPH 1985
    """
    validation.check_hparam("t", t, lower=0.0, upper=1.0)
    validation.check_hparam("collinear_threshold", collinear_threshold, lower=0.0, upper=1.0)
    if space not in ("weights", "task_vectors"):
        raise ValueError(f"space must be 'weights' or 'task_vectors', got {space!r}.")
    zero_norm = convention_default(convention, zero_norm, fusionjax="lerp", mergekit="right_angle")
    check_choice("zero_norm", zero_norm, ("lerp", "right_angle"))
    options = {"space": space, "collinear_threshold": float(collinear_threshold)}
    if zero_norm != "lerp":
        options["zero_norm"] = zero_norm
    return Step(
        "slerp",
        _slerp,
        flat=True,
        reduces=True,
        hparams={"t": t},
        options=options,
        prepare=_exactly_two,
    )
