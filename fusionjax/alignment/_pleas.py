r"""PLeaS: partial matching of two networks' units, then a least-squares solve per layer.

Two networks :math:`A` and :math:`B` of one architecture, trained from different
initialisations, are merged into one network whose hidden layers may be *wider* than
theirs (Nasery, Hayase, Koh & Oh, CVPR 2025). For a chain of dense layers
:math:`z^{(\ell)} = h^{(\ell-1)} W_\ell + b_\ell`, :math:`h^{(\ell)} = \sigma(z^{(\ell)})`
(flax layout: kernels ``[in, out]``) with hidden width :math:`n` and a merged width
:math:`n_M \in [n, 2n]`:

1. **Partial matching.** The Pearson correlation :math:`\rho_{ij}` between unit
   :math:`i` of :math:`A` and unit :math:`j` of :math:`B` over the data (post-activation
   features, as activation matching) gives a full matching
   :math:`\pi = \arg\max_\pi\sum_i\rho_{i\pi(i)}`; its :math:`k = 2n - n_M` most
   correlated pairs are *merged* into one unit each, and the other :math:`n - k` units
   of each model are *kept* unmerged. Merged units are ordered: the :math:`k` pairs (by
   decreasing correlation), then :math:`A`'s kept units, then :math:`B`'s. A ratio of
   1 merges every unit (a permutation alignment); 2 keeps both models whole side by side.
2. **Least squares.** Layer by layer, with :math:`X_M` the merged network's own
   features on the data (:math:`X_M = x` for the first layer, then
   :math:`\sigma(X_M W^M + b^M)` of the layer just solved) and the *targets* the
   original models' pre-activations moved onto the merged units, a merged unit taking
   the mean of its pair and a kept unit its own model's value,

   .. math::

     T_\ell = Z^A_\ell\,M_A + Z^B_\ell\,M_B,\qquad
     (W^M_\ell, b^M_\ell) = \arg\min_{W,b}\ \|X_M W + \mathbf 1 b - T_\ell\|_F^2
       + \lambda\,\|W\|_F^2,

   where :math:`M_A\in\mathbb{R}^{n\times n_M}` has :math:`1/c_u` at (:math:`A`'s unit,
   merged unit :math:`u`) for the :math:`c_u\in\{1,2\}` models unit :math:`u` holds. The
   output layer's targets are the mean of the two models' logits. Minimising
   :math:`\|Y - Z^A\|^2 + \|Y - Z^B\|^2` over a merged unit's output :math:`Y` is this
   least-squares problem, which is the paper's objective.

Without the solve (``least_squares=False``), the merged weights are the *partial
average* :math:`W^M = U_A W^A M_A + U_B W^B M_B` (with :math:`U_A = M_A^\top` up to the
:math:`1/c_u` weights: a merged input unit feeds every original unit it holds), the
ZipIt!-style merge PLeaS starts from; at ratio 1 it is activation matching followed by
averaging. With the solve at ratio 2 the merged network reproduces both models and
outputs the mean of their logits (their ensemble), up to the ridge :math:`\lambda`.

``lambda`` is ``ridge`` times the mean diagonal of :math:`X_M^\top X_M` (a relative
ridge, so it does not depend on the features' scale); the bias is not penalised.

**What costs time, and what is done about it.** One forward pass of each model over the
data (one jitted program per architecture), one :math:`n\times n` assignment per hidden
layer (scipy, on the host), and per layer one ridge solve of a :math:`d\times d` system
(:math:`d\le 2n` the merged input width): :math:`O(M d^2)` for the Gram matrix, as much
as one forward pass through the layer. The solves run on the host in float64 (NumPy):
every merged width is a new set of shapes, and compiling them cost far more than solving
them (measured on two CPU cores, a 64-16-16-10 MLP and five widths: about 15 s of
compilation against 0.2 s of work). Data of a few hundred to a few thousand examples
suffice for the small MLPs here (:math:`d+1\le 2n+1` unknowns per unit).

References:
  Nasery, Hayase, Koh & Oh, `PLeaS: Merging Models with Permutations and Least Squares
  <https://arxiv.org/abs/2407.02447>`_, CVPR 2025;
  Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman, `ZipIt! Merging Models from Different
  Tasks without Training <https://arxiv.org/abs/2305.03053>`_, ICLR 2024;
  Ainsworth, Hayase & Srinivasa, `Git Re-Basin <https://arxiv.org/abs/2209.04836>`_,
  ICLR 2023 (activation matching)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax.alignment import _assignment

_HIGHEST = jax.lax.Precision.HIGHEST

Layers = Sequence[Mapping[str, jax.Array]]
"""A chain of dense layers: ``[{"kernel": [in, out], "bias": [out]}, ...]`` (flax layout)."""


# ----------------------------------------------------------------------------- dense chains


def check_layers(layers, name: str) -> list[dict]:
    """Validates a chain of dense layers; returns it as a list of float32 dicts."""
    if isinstance(layers, Mapping) or not isinstance(layers, Sequence):
        raise TypeError(
            f"{name} must be a sequence of dense layers {{'kernel': [in, out], 'bias': [out]}}, "
            f"got {type(layers).__name__}."
        )
    if len(layers) < 2:
        raise ValueError(
            f"{name} must have at least 2 layers (one hidden layer), got {len(layers)}."
        )
    out = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, Mapping) or "kernel" not in layer or "bias" not in layer:
            raise ValueError(f"{name}[{i}] must be a mapping with 'kernel' and 'bias'.")
        k, b = layer["kernel"], layer["bias"]
        if np.ndim(k) != 2 or np.shape(b) != (np.shape(k)[1],):
            raise ValueError(
                f"{name}[{i}]: expected kernel [in, out] and bias [out], got "
                f"{np.shape(k)} and {np.shape(b)}."
            )
        for leaf in (k, b):
            if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
                raise TypeError(f"{name}[{i}] has a non-floating leaf ({jnp.asarray(leaf).dtype}).")
        if i and np.shape(k)[0] != np.shape(out[-1]["kernel"])[1]:
            raise ValueError(
                f"{name}[{i}] reads {np.shape(k)[0]} units but {name}[{i - 1}] has "
                f"{np.shape(out[-1]['kernel'])[1]}."
            )
        out.append({"kernel": jnp.asarray(k, jnp.float32), "bias": jnp.asarray(b, jnp.float32)})
    return out


def check_inputs(x, layers: list[dict], name: str = "x") -> jax.Array:
    """``x`` as ``[M, in]`` float32, checked against the first layer."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got {x.dtype}.")
    d = layers[0]["kernel"].shape[0]
    if x.ndim != 2 or x.shape[1] != d or x.shape[0] == 0:
        raise ValueError(f"{name} must be [M, {d}] inputs of the first layer, got {x.shape}.")
    return x.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="activation")
def chain_features(layers, x, activation):
    """``([Z_1, ..., Z_L], [H_0 = x, H_1, ..., H_{L-1}])``: pre-activations and inputs."""
    zs, hs = [], [x]
    for i, layer in enumerate(layers):
        z = jnp.matmul(hs[-1], layer["kernel"], precision=_HIGHEST) + layer["bias"][None, :]
        zs.append(z)
        if i < len(layers) - 1:
            hs.append(activation(z))
    return zs, hs


def dense_apply(layers: Layers, x: ArrayLike, *, activation: Callable = jax.nn.relu) -> jax.Array:
    r"""Runs a chain of dense layers: :math:`\sigma` after every layer but the last.

    Args:
      layers: ``[{"kernel": [in, out], "bias": [out]}, ...]``.
      x: Inputs ``[M, in]``.
      activation: :math:`\sigma`, e.g. :func:`jax.nn.relu`.

    Returns:
      The outputs ``[M, out]`` (logits of a classifier).
    """
    layers = check_layers(layers, "layers")
    zs, _ = chain_features(layers, check_inputs(x, layers), activation)
    return zs[-1]


# ----------------------------------------------------------------------------- matching


class PartialMatching(NamedTuple):
    """Which units of ``ref`` (A) and ``other`` (B) each merged unit holds.

    Attributes:
      ref_index: ``int [n_M]``: the ref unit of each merged unit, ``-1`` if none.
      other_index: ``int [n_M]``: the other unit of each merged unit, ``-1`` if none.
      correlation: ``[n_M]``: the pair's correlation for merged pairs, NaN for kept units.
      merged: Number of merged pairs :math:`k` (the first ``k`` merged units).
    """

    ref_index: np.ndarray
    other_index: np.ndarray
    correlation: np.ndarray
    merged: int

    @property
    def width(self) -> int:
        """The merged width :math:`n_M = 2n - k`."""
        return int(self.ref_index.shape[0])

    def merge_maps(self, n_ref: int, n_other: int) -> tuple[np.ndarray, np.ndarray]:
        """``(M_A [n_ref, n_M], M_B [n_other, n_M])``: 1/count where a merged unit holds a unit."""
        count = (self.ref_index >= 0).astype(np.float64) + (self.other_index >= 0)
        ma = np.zeros((n_ref, self.width))
        mb = np.zeros((n_other, self.width))
        for u, (a, b) in enumerate(zip(self.ref_index, self.other_index, strict=True)):
            if a >= 0:
                ma[a, u] = 1.0 / count[u]
            if b >= 0:
                mb[b, u] = 1.0 / count[u]
        return ma, mb


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation ``[n_a, n_b]`` between columns; 0 for a dead (constant) unit."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    na, nb = np.sqrt((a * a).sum(0)), np.sqrt((b * b).sum(0))
    denom = na[:, None] * nb[None, :]
    cov = a.T @ b
    return np.where(denom > 0, cov / np.where(denom > 0, denom, 1.0), 0.0)


def partial_matching(acts_ref: ArrayLike, acts_other: ArrayLike, *, width: int) -> PartialMatching:
    r"""Matches two layers' units and merges the most correlated pairs, to a merged width.

    A full matching :math:`\pi=\arg\max\sum_i\rho_{i\pi(i)}` on the Pearson correlation
    of the activations; its :math:`k = 2n - n_M` most correlated pairs are merged, the
    remaining :math:`n-k` units of each model kept apart.

    Args:
      acts_ref: ``[M, n]`` activations of ``ref``'s units on the data.
      acts_other: ``[M, n]`` activations of ``other``'s units on the same inputs.
      width: Merged width :math:`n_M`, from :math:`n` (every unit merged) to :math:`2n`
        (none merged).

    Returns:
      A :class:`PartialMatching`: merged pairs first (by decreasing correlation), then
      ``ref``'s kept units, then ``other``'s (each in their original order).

    Raises:
      ValueError: if the activations are not ``[M, n]`` of one size, or ``width`` is
        outside ``[n, 2n]``.

    Examples:
      >>> import numpy as np
      >>> z = np.random.default_rng(0).normal(size=(32, 4))
      >>> m = partial_matching(z, z[:, [2, 0, 1, 3]], width=6)
      >>> m.merged, m.width
      (2, 6)
    """
    a = np.asarray(acts_ref, np.float64)
    b = np.asarray(acts_other, np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(
            f"acts_ref and acts_other must both be [M, n] with M > 0, got {a.shape} and {b.shape}."
        )
    n = a.shape[1]
    is_int = isinstance(width, (int, np.integer)) and not isinstance(width, bool)
    if not is_int or not n <= width <= 2 * n:
        raise ValueError(f"width must be an integer in [{n}, {2 * n}], got {width!r}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("the activations have NaN or Inf values.")
    rho = _correlation(a, b)
    perm = _assignment.assign_scipy(rho)
    k = 2 * n - int(width)
    pair_rho = rho[np.arange(n), perm]
    order = np.argsort(-pair_rho, kind="stable")
    top = order[:k]
    kept_a = np.sort(order[k:])
    kept_b = np.sort(perm[order[k:]])
    minus = -np.ones(n - k, np.int64)
    ref_index = np.concatenate([top, kept_a, minus]).astype(np.int32)
    other_index = np.concatenate([perm[top], minus, kept_b]).astype(np.int32)
    corr = np.concatenate([pair_rho[top], np.full(2 * (n - k), np.nan)]).astype(np.float32)
    return PartialMatching(ref_index, other_index, corr, k)


# ----------------------------------------------------------------------------- PLeaS


class PLeaSOutput(NamedTuple):
    r"""Result of :func:`pleas`.

    Attributes:
      layers: The merged chain ``[{"kernel", "bias"}, ...]`` (float32), hidden widths
        ``widths``; the input and output widths are the models'.
      widths: Merged hidden widths, one per hidden layer.
      matchings: One :class:`PartialMatching` per hidden layer.
      residual: ``[L]`` relative least-squares residual per layer,
        :math:`\|X_M W + b - T\|_F / \|T - \bar T\|_F` (of the partial average when
        ``least_squares=False``), on the data.
    """

    layers: list
    widths: tuple
    matchings: list
    residual: jax.Array

    def apply(self, x: ArrayLike, *, activation: Callable = jax.nn.relu) -> jax.Array:
        """The merged chain's outputs on ``x`` ``[M, in]`` (see :func:`dense_apply`)."""
        return dense_apply(self.layers, x, activation=activation)


def _solve_layer(x: np.ndarray, target: np.ndarray, ridge: float):
    """Ridge least squares ``x W + b ~ target`` (float64, host), bias unpenalised."""
    mx, mt = x.mean(0), target.mean(0)
    xc, tc = x - mx, target - mt
    gram = xc.T @ xc
    lam = ridge * max(float(np.mean(np.diagonal(gram))), 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ tc)
    return w, mt - mx @ w


def _residual(x, w, b, target) -> float:
    err = x @ w + b - target
    spread = target - target.mean(0)
    return float(np.sqrt((err * err).sum() / max((spread * spread).sum(), 1e-300)))


def _resolve_widths(width_ratio, hidden: list[int]) -> list[int]:
    if isinstance(width_ratio, (list, tuple)):
        ratios = list(width_ratio)
    else:
        ratios = [width_ratio] * len(hidden)
    if len(ratios) != len(hidden):
        raise ValueError(
            f"width_ratio has {len(ratios)} entries for {len(hidden)} hidden layers."
        )
    widths = []
    for r, n in zip(ratios, hidden, strict=True):
        validation.check_hparam("width_ratio", r, lower=1.0, upper=2.0)
        widths.append(int(min(max(round(float(r) * n), n), 2 * n)))
    return widths


def pleas(
    ref: Layers,
    other: Layers,
    x: ArrayLike,
    *,
    width_ratio: float | Sequence[float] = 1.0,
    least_squares: bool = True,
    ridge: float = 1e-3,
    activation: Callable = jax.nn.relu,
) -> PLeaSOutput:
    r"""PLeaS: partially merge two networks' units to a chosen width, then fit each layer.

    See the module docstring for the math. Units are matched on post-activation
    features of the data ``x`` (:func:`partial_matching`), hidden layer by hidden layer;
    then each merged layer is solved by ridge least squares so that, fed with the merged
    network's own features, it reproduces the models' pre-activations on its units.

    Args:
      ref: Model :math:`A` as a chain of dense layers ``[{"kernel": [in, out], "bias":
        [out]}, ...]`` (e.g. ``[variables["params"][f"Dense_{i}"] for i in ...]`` of a
        :class:`fusionjax.zoo.MLP`).
      other: Model :math:`B`, the same architecture.
      x: ``[M, in]`` inputs on which activations are measured and layers are fitted
        (unlabelled; a few hundred examples or more).
      width_ratio: Merged width over the models' width, per hidden layer (one number for
        all, or one per hidden layer), in ``[1, 2]``: 1 merges every unit, 2 keeps both
        models whole. Widths are ``round(ratio * n)``.
      least_squares: Fit every merged layer by least squares (PLeaS); ``False`` returns
        the partial average (ZipIt!-style merge without the solve).
      ridge: Ridge :math:`\lambda` relative to the mean feature energy
        (:math:`\lambda = \text{ridge}\cdot\mathrm{tr}(X_c^\top X_c)/d`).
      activation: The models' nonlinearity :math:`\sigma`, applied after every layer but
        the last.

    Returns:
      A :class:`PLeaSOutput`.

    Raises:
      TypeError: if a model is not a sequence of dense layers or a leaf is not floating.
      ValueError: if the models' shapes differ, ``x`` is not ``[M, in]``, or
        ``width_ratio``/``ridge`` are out of range.

    Examples:
      >>> import numpy as np
      >>> def mlp(seed):
      ...     r = np.random.default_rng(seed)
      ...     return [{"kernel": r.normal(size=(3, 8)), "bias": np.zeros(8)},
      ...             {"kernel": r.normal(size=(8, 2)), "bias": np.zeros(2)}]
      >>> x = np.random.default_rng(9).normal(size=(64, 3))
      >>> out = pleas(mlp(0), mlp(1), x, width_ratio=1.5)
      >>> out.widths, out.layers[0]["kernel"].shape
      ((12,), (3, 12))

    References:
      Nasery, Hayase, Koh & Oh, `PLeaS: Merging Models with Permutations and Least
      Squares <https://arxiv.org/abs/2407.02447>`_, CVPR 2025
    """
    la, lb = check_layers(ref, "ref"), check_layers(other, "other")
    if len(la) != len(lb):
        raise ValueError(f"ref has {len(la)} layers but other has {len(lb)}.")
    for i, (a, b) in enumerate(zip(la, lb, strict=True)):
        if a["kernel"].shape != b["kernel"].shape:
            raise ValueError(
                f"other[{i}] differs from ref[{i}]: kernel {b['kernel'].shape} != "
                f"{a['kernel'].shape}."
            )
    validation.check_hparam("ridge", ridge, lower=0.0)
    hidden = [int(layer["kernel"].shape[1]) for layer in la[:-1]]
    widths = _resolve_widths(width_ratio, hidden)
    x = check_inputs(x, la)
    for name, layers in (("ref", la), ("other", lb)):
        validation.check_finite(layers, name)

    za, ha = chain_features(la, x, activation)
    zb, hb = chain_features(lb, x, activation)
    za, ha, zb, hb = (
        [np.asarray(v, np.float64) for v in vs] for vs in jax.device_get((za, ha, zb, hb))
    )
    matchings = [partial_matching(ha[i + 1], hb[i + 1], width=w) for i, w in enumerate(widths)]
    maps = [m.merge_maps(n, n) for m, n in zip(matchings, hidden, strict=True)]
    n_out = la[-1]["kernel"].shape[1]
    maps.append((np.eye(n_out) / 2, np.eye(n_out) / 2))

    host = [
        [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in layers]
        for layers in jax.device_get((la, lb))
    ]
    merged, residual = [], []
    xm = ha[0]
    for i, (ma, mb) in enumerate(maps):
        target = za[i] @ ma + zb[i] @ mb
        if least_squares:
            w, b = _solve_layer(xm, target, float(ridge))
        else:
            w, b = _partial_average(host[0][i], host[1][i], maps[i - 1] if i else None, ma, mb)
        merged.append({"kernel": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(b, jnp.float32)})
        residual.append(_residual(xm, w, b, target))
        if i < len(maps) - 1:
            xm = np.asarray(activation(jnp.asarray(xm @ w + b, jnp.float32)), np.float64)
    return PLeaSOutput(merged, tuple(widths), matchings, jnp.asarray(residual, jnp.float32))


def _partial_average(a, b, prev, ma, mb):
    """``U_A W_A M_A + U_B W_B M_B``: a merged input unit feeds every unit it holds."""
    wa, wb = a["kernel"], b["kernel"]
    if prev is not None:  # U = which merged input units hold each unit (none: shared input)
        wa = (prev[0] > 0).T.astype(np.float64) @ wa
        wb = (prev[1] > 0).T.astype(np.float64) @ wb
    return wa @ ma + wb @ mb, a["bias"] @ ma + b["bias"] @ mb
