r"""CLAFusion: fuse networks of different depths by cross-layer alignment, then OT fusion.

OT fusion needs the two networks to have the same number of layers. CLAFusion (Nguyen,
Nguyen, Le, Pham & Ho, ICASSP 2023) fuses a *deeper* dense chain :math:`A` (:math:`m`
hidden layers) with a *shallower* :math:`B` (:math:`n < m` hidden layers) in three steps:

1. **Cross-layer alignment.** A dissimilarity :math:`C_{ij}` between hidden layer
   :math:`i` of :math:`A` and hidden layer :math:`j` of :math:`B`, here
   :math:`1 - \mathrm{CKA}` of their post-activation features on data (linear CKA,
   Kornblith et al. 2019; the paper's default), and an increasing map
   :math:`a: \{1..n\}\to\{1..m\}`, :math:`a(1)<\dots<a(n)`, minimising
   :math:`\sum_j C_{a(j),j}`, found by dynamic programming:
   :math:`F_{j,i} = \min(F_{j,i-1},\ F_{j-1,i-1} + C_{i,j})` with backtracking,
   :math:`O(mn)`. As in the paper's code, the first hidden layers are matched to each
   other (``fix_first=True``) and the output layers always are.
2. **Balancing the depths**, one of two ways (``balance``):

   * ``"add"`` (the paper's main variant): identity layers are *added to the shallower*
     network: after the layer of :math:`B` mapped to :math:`a(j)`, an identity dense
     layer (:math:`W = I`, :math:`b = 0`, the width of that layer) fills every unmapped
     layer of :math:`A` up to :math:`a(j+1)`. For ReLU networks this changes nothing,
     since :math:`\mathrm{relu}(I h) = h` for :math:`h\ge 0`; an identity layer before
     the first mapped layer acts on the raw input, which must then be non-negative.
   * ``"merge"``: the *deeper* network's unmapped layers are merged into the next mapped
     layer (or the output layer), the ReLU between them replaced by a fixed per-unit
     gate :math:`D = \mathrm{diag}(g)` read from the unit's pre-activations
     :math:`z` on the data (:func:`merge_layers`), so consecutive affine maps compose:

     .. math::
        W' = W_{a(j)}\,D_{l}\,W_{l} \cdots,\qquad
        \mathrm{relu}(z) \approx g \odot z,\quad
        g = \mathbb 1\big[\textstyle\sum_x z \ge 0\big]\ (\text{"sum"}),\
        \mathbb 1\big[\Pr_x(z > 0) \ge \tfrac12\big]\ (\text{"majority"}),\
        \Pr_x(z > 0)\ (\text{"avg"}).

     Exact where the gated units' pre-activations keep one sign over the data; an
     approximation otherwise (the paper's code, which has no biases; biases compose
     the same way here).
3. **OT fusion** by :func:`~fusionjax.alignment.ot_fusion` layer by layer (different
   widths allowed): of :math:`A` (the reference: the fused network has its depth and
   widths) with the padded :math:`B` (``"add"``), or of :math:`B` (the reference) with
   the merged :math:`A` (``"merge"``).

**What costs time, and what is done about it.** One forward pass of each network over
the data, :math:`mn` CKA values (each :math:`O(M(d_i^2 + d_j^2 + d_i d_j))` in feature
space, never the :math:`M\times M` Gram matrices), an :math:`O(mn)` dynamic programme
on the host, then OT fusion (one exact assignment per hidden layer).

References:
  Nguyen, Nguyen, Le, Pham & Ho, `On Cross-Layer Alignment for Model Fusion of
  Heterogeneous Neural Networks <https://arxiv.org/abs/2110.15538>`_, ICASSP 2023;
  Singh & Jaggi, `Model Fusion via Optimal Transport <https://arxiv.org/abs/1910.05653>`_,
  NeurIPS 2020;
  Kornblith, Norouzi, Lee & Hinton, `Similarity of Neural Network Representations
  Revisited <https://arxiv.org/abs/1905.00414>`_, ICML 2019
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax.alignment._hand_specs import mlp_spec
from fusionjax.alignment._ot_fusion import OTFusionOutput
from fusionjax.alignment._ot_fusion import ot_fusion
from fusionjax.alignment._pleas import Layers
from fusionjax.alignment._pleas import chain_features
from fusionjax.alignment._pleas import check_inputs
from fusionjax.alignment._pleas import check_layers

_HIGHEST = jax.lax.Precision.HIGHEST


def linear_cka(x: ArrayLike, y: ArrayLike) -> float:
    r"""Linear centred kernel alignment between two feature matrices on the same inputs.

    :math:`\mathrm{CKA}(X, Y) = \|X_c^\top Y_c\|_F^2 / (\|X_c^\top X_c\|_F\,\|Y_c^\top
    Y_c\|_F)` with :math:`X_c, Y_c` the column-centred features; 1 for features equal up
    to an orthogonal map and a scale, 0 for uncorrelated ones. Widths may differ.

    Args:
      x: ``[M, d_x]`` features.
      y: ``[M, d_y]`` features of the same ``M`` inputs.

    Returns:
      The CKA in ``[0, 1]`` (0 when either is constant).

    Raises:
      ValueError: if ``x`` and ``y`` are not matrices with the same number of rows.

    Examples:
      >>> import numpy as np
      >>> x = np.random.default_rng(0).normal(size=(50, 4))
      >>> round(linear_cka(x, 3 * x[:, ::-1]), 6)
      1.0
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must be [M, d] on the same M inputs, got {x.shape}, {y.shape}.")
    x, y = x - x.mean(0), y - y.mean(0)
    nx, ny = np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    if nx == 0 or ny == 0:
        return 0.0
    return float(np.linalg.norm(x.T @ y) ** 2 / (nx * ny))


def align_layers(cost: ArrayLike, *, fix_first: bool = True) -> np.ndarray:
    r"""Cross-layer alignment: the increasing map of ``n`` layers onto ``m >= n`` of least cost.

    Minimises :math:`\sum_j C_{a(j), j}` over :math:`a(1) < \dots < a(n)` by dynamic
    programming (CLAFusion's Eq. 3), :math:`O(mn)`; ties go to the earliest layers.

    Args:
      cost: ``[m, n]`` dissimilarities between the deeper network's hidden layers (rows)
        and the shallower's (columns), ``m >= n``.
      fix_first: Match the first hidden layers to each other (:math:`a(1) = 1`, the
        paper's default ``start_layer_idx=2``).

    Returns:
      ``int [n]``: for each shallower layer, the (0-based) deeper layer it maps to.

    Raises:
      ValueError: if ``cost`` is not a finite ``[m, n]`` matrix with ``m >= n >= 1``.

    Examples:
      >>> import numpy as np
      >>> align_layers(np.array([[0., 5.], [5., 5.], [5., 0.]]))
      array([0, 2])
    """
    c = np.asarray(cost, np.float64)
    if c.ndim != 2 or not c.shape[0] >= c.shape[1] >= 1:
        raise ValueError(f"cost must be [m, n] with m >= n >= 1, got shape {c.shape}.")
    if not np.isfinite(c).all():
        raise ValueError("cost has NaN or Inf values.")
    m, n = c.shape
    start = 1 if fix_first else 0
    # best[j, i]: least cost of mapping shallower layers start..j onto deeper layers
    # start..i (layer j mapped at or before i); -inf-free: infeasible cells are +inf.
    best = np.full((n, m), np.inf)
    take = np.zeros((n, m), bool)
    for j in range(start, n):
        for i in range(j, m - (n - 1 - j)):
            prev = 0.0 if j == start else best[j - 1, i - 1]
            here = prev + c[i, j]
            skip = best[j, i - 1] if i > j else np.inf
            best[j, i] = min(here, skip)
            take[j, i] = here <= skip
    out = np.zeros(n, np.int64)
    i = m - 1
    for j in range(n - 1, start - 1, -1):
        while not take[j, i]:
            i -= 1
        out[j] = i
        i -= 1
    return out


def _identity(width: int) -> dict:
    return {"kernel": jnp.eye(width, dtype=jnp.float32), "bias": jnp.zeros(width, jnp.float32)}


def pad_with_identities(shallow: Layers, mapping: ArrayLike, depth: int) -> list[dict]:
    r"""The shallower chain with identity layers, its hidden layer ``j`` at ``mapping[j]``.

    Args:
      shallow: Dense chain ``[{"kernel": [in, out], "bias": [out]}, ...]`` with ``n``
        hidden layers.
      mapping: ``int [n]`` increasing deeper-layer index of each hidden layer (from
        :func:`align_layers`).
      depth: The deeper network's number of hidden layers :math:`m`.

    Returns:
      A chain with ``m`` hidden layers: ``shallow``'s layers at the mapped positions,
      identity layers (:math:`W=I`, :math:`b=0`) elsewhere, then ``shallow``'s output
      layer. With ReLU activations it computes the same function as ``shallow`` when its
      inputs are non-negative (always, if ``mapping[0] == 0``).

    Raises:
      ValueError: if ``mapping`` is not increasing in ``[0, depth)`` with one entry per
        hidden layer.
    """
    layers = check_layers(shallow, "shallow")
    a = np.asarray(mapping)
    n = len(layers) - 1
    if a.shape != (n,) or np.any(np.diff(a) <= 0) or a[0] < 0 or a[-1] >= depth:
        raise ValueError(
            f"mapping must be {n} increasing layer indices in [0, {depth}), got {a.tolist()}."
        )
    out, width = [], layers[0]["kernel"].shape[0]
    for pos in range(depth):
        hit = np.flatnonzero(a == pos)
        if hit.size:
            layer = layers[int(hit[0])]
            width = layer["kernel"].shape[1]
            out.append(layer)
        else:
            out.append(_identity(width))
    out.append(layers[-1])
    return out


def layer_costs(deep: Layers, shallow: Layers, x: ArrayLike, *, activation=jax.nn.relu):
    r"""``[m, n]`` :math:`1 - \mathrm{CKA}` between the hidden layers' features on ``x``.

    Args:
      deep: The deeper dense chain.
      shallow: The shallower dense chain (same input width).
      x: ``[M, in]`` inputs.
      activation: The networks' nonlinearity.

    Returns:
      A NumPy ``[m, n]`` cost matrix for :func:`align_layers`.
    """
    ld, ls = check_layers(deep, "deep"), check_layers(shallow, "shallow")
    x = check_inputs(x, ld)
    check_inputs(x, ls, "x (for shallow)")
    _, hd = chain_features(ld, x, activation)
    _, hs = chain_features(ls, x, activation)
    hd, hs = jax.device_get((hd[1:], hs[1:]))
    return np.array([[1.0 - linear_cka(a, b) for b in hs] for a in hd])


_GATES = ("sum", "majority", "avg")


def merge_layers(
    deep: Layers,
    mapping: ArrayLike,
    x: ArrayLike,
    *,
    relu_approx: str = "sum",
    activation: Callable = jax.nn.relu,
) -> list[dict]:
    r"""The deeper chain with its unmapped hidden layers merged into the next mapped one.

    CLAFusion's second way to balance depths: every hidden layer of ``deep`` not in
    ``mapping`` is composed into the next mapped hidden layer (or into the output layer
    when it comes after the last one), its ReLU replaced by the gate
    :math:`D = \mathrm{diag}(g)` of its pre-activations on ``x`` (see the module
    docstring): with pending affine map :math:`(P, c)` (identity after a mapped layer),
    an unmapped layer :math:`(W, b)` gives :math:`(P W D,\ (c W + b) D)` and a mapped
    one :math:`(P W,\ c W + b)`, then resets the pending map. The gates are read on the
    *original* network's pre-activations.

    Args:
      deep: Dense chain ``[{"kernel": [in, out], "bias": [out]}, ...]`` with ``m`` hidden
        layers.
      mapping: ``int [n]`` increasing hidden-layer indices of ``deep`` to keep (from
        :func:`align_layers`).
      x: ``[M, in]`` inputs the gates are read on.
      relu_approx: ``"sum"`` (:math:`g = 1[\sum_x z \ge 0]`, the paper's default),
        ``"majority"`` (:math:`1[\Pr_x(z>0) \ge 1/2]`) or ``"avg"`` (:math:`\Pr_x(z>0)`).
      activation: The network's nonlinearity (the gates approximate a ReLU).

    Returns:
      A chain with ``n`` hidden layers (widths ``deep``'s mapped ones) and the output
      layer, in float32.

    Raises:
      ValueError: if ``mapping`` is not increasing in ``[0, m)``, ``relu_approx`` is
        unknown, or ``x`` has the wrong shape.

    Examples:
      >>> import numpy as np
      >>> r = np.random.default_rng(0)
      >>> deep = [{"kernel": r.normal(size=(3, 4)), "bias": np.full(4, 5.0)},
      ...         {"kernel": np.abs(r.normal(size=(4, 4))), "bias": np.full(4, 5.0)},
      ...         {"kernel": r.normal(size=(4, 2)), "bias": np.zeros(2)}]
      >>> x = np.abs(r.normal(size=(8, 3)))  # every pre-activation positive: exact
      >>> merged = merge_layers(deep, [1], x)
      >>> len(merged), merged[0]["kernel"].shape
      (2, (3, 4))
    """
    layers = check_layers(deep, "deep")
    m = len(layers) - 1
    a = np.asarray(mapping)
    if a.ndim != 1 or a.size == 0 or np.any(np.diff(a) <= 0) or a[0] < 0 or a[-1] >= m:
        raise ValueError(
            f"mapping must be increasing hidden-layer indices in [0, {m}), got {a.tolist()}."
        )
    if relu_approx not in _GATES:
        raise ValueError(f"relu_approx must be one of {_GATES}, got {relu_approx!r}.")
    x = check_inputs(x, layers)
    zs, _ = chain_features(layers, x, activation)
    keep = set(a.tolist())
    width = layers[0]["kernel"].shape[0]
    pending = (jnp.eye(width, dtype=jnp.float32), jnp.zeros(width, jnp.float32))
    out = []
    for i, layer in enumerate(layers):
        w = jnp.asarray(layer["kernel"], jnp.float32)
        b = jnp.asarray(layer["bias"], jnp.float32)
        kernel = jnp.matmul(pending[0], w, precision=_HIGHEST)
        bias = jnp.matmul(pending[1], w, precision=_HIGHEST) + b
        if i in keep or i == m:
            out.append({"kernel": kernel, "bias": bias})
            width = w.shape[1]
            pending = (jnp.eye(width, dtype=jnp.float32), jnp.zeros(width, jnp.float32))
            continue
        z = zs[i]
        if relu_approx == "sum":
            g = (jnp.sum(z, axis=0) >= 0).astype(jnp.float32)
        elif relu_approx == "majority":
            g = (jnp.mean(z > 0, axis=0) >= 0.5).astype(jnp.float32)
        else:
            g = jnp.mean(z > 0, axis=0).astype(jnp.float32)
        pending = (kernel * g[None, :], bias * g)
    return out


class CLAFusionOutput(NamedTuple):
    """Result of :func:`clafusion`.

    Attributes:
      fused: The fused chain: the deeper network's depth and widths (``balance="add"``)
        or the shallower one's (``"merge"``).
      mapping: ``int [n]``: the deeper hidden layer each shallower hidden layer maps to.
      cost: ``[m, n]`` layer dissimilarities the alignment minimised.
      padded: ``"add"``: the shallower chain with identity layers added (the deeper
        one's depth); ``None`` for ``"merge"``.
      ot: The :class:`~fusionjax.alignment.OTFusionOutput` of the two balanced chains
        (its models are ``{"Dense_i": layer}`` dicts).
      merged: ``"merge"``: the deeper chain with its unmapped layers merged
        (:func:`merge_layers`, the shallower one's depth); ``None`` for ``"add"``.
    """

    fused: list
    mapping: np.ndarray
    cost: np.ndarray
    padded: list | None
    ot: OTFusionOutput
    merged: list | None = None


def _as_dict(layers) -> dict:
    return {f"Dense_{i}": dict(layer) for i, layer in enumerate(layers)}


def clafusion(
    deep: Layers,
    shallow: Layers,
    x: ArrayLike,
    *,
    weight: ArrayLike = 0.5,
    fix_first: bool = True,
    balance: str = "add",
    relu_approx: str = "sum",
    activation: Callable = jax.nn.relu,
    **ot_kwargs: Any,
) -> CLAFusionOutput:
    r"""CLAFusion: align a shallower network's layers to a deeper one's, balance, OT-fuse.

    See the module docstring. ``balance="add"``: the fused network is
    :math:`(1-w)\,\theta_{deep} + w\,\tilde\theta_{padded}` after OT alignment of the
    padded shallower network to the deeper one. ``balance="merge"``: it is
    :math:`w\,\theta_{shallow} + (1-w)\,\tilde\theta_{merged}` after OT alignment of
    the merged deeper network (:func:`merge_layers`) to the shallower one.

    Args:
      deep: The deeper dense chain ``[{"kernel": [in, out], "bias": [out]}, ...]`` (the
        reference for ``"add"``: its widths are kept).
      shallow: The shallower chain, same input and output widths, no more hidden layers
        (the reference for ``"merge"``).
      x: ``[M, in]`` inputs on which the layers' features are compared (and, for
        ``"merge"``, the gates read).
      weight: :math:`w`, the weight of the shallower network in the fused one.
      fix_first: Match the first hidden layers to each other (see :func:`align_layers`).
      balance: ``"add"`` identity layers to the shallower network, or ``"merge"`` layers
        of the deeper one.
      relu_approx: ``"merge"`` only: the gate of :func:`merge_layers`.
      activation: The networks' nonlinearity; identity padding is exact for ReLU.
      **ot_kwargs: Passed to :func:`~fusionjax.alignment.ot_fusion` (``solver``,
        ``cost``, ``epsilon``, ...).

    Returns:
      A :class:`CLAFusionOutput`.

    Raises:
      TypeError: if a network is not a sequence of dense layers.
      ValueError: if ``shallow`` is deeper than ``deep``, the input or output widths
        differ, ``x`` has the wrong shape, ``weight`` is outside ``[0, 1]``, or
        ``balance``/``relu_approx`` is unknown.

    Examples:
      >>> import numpy as np
      >>> def mlp(seed, widths):
      ...     r, dims = np.random.default_rng(seed), (3, *widths, 2)
      ...     return [{"kernel": r.normal(size=(i, o)), "bias": np.zeros(o)}
      ...             for i, o in zip(dims[:-1], dims[1:])]
      >>> x = np.abs(np.random.default_rng(9).normal(size=(64, 3)))
      >>> out = clafusion(mlp(0, (8, 8, 8)), mlp(1, (8, 8)), x)
      >>> len(out.fused), out.mapping.shape
      (4, (2,))

    References:
      Nguyen, Nguyen, Le, Pham & Ho, `On Cross-Layer Alignment for Model Fusion of
      Heterogeneous Neural Networks <https://arxiv.org/abs/2110.15538>`_, ICASSP 2023
    """
    ld, ls = check_layers(deep, "deep"), check_layers(shallow, "shallow")
    m, n = len(ld) - 1, len(ls) - 1
    if n > m:
        raise ValueError(f"shallow has {n} hidden layers, more than deep's {m}; swap them.")
    if ld[0]["kernel"].shape[0] != ls[0]["kernel"].shape[0]:
        raise ValueError(
            f"deep reads {ld[0]['kernel'].shape[0]} inputs but shallow reads "
            f"{ls[0]['kernel'].shape[0]}."
        )
    if ld[-1]["kernel"].shape[1] != ls[-1]["kernel"].shape[1]:
        raise ValueError(
            f"deep has {ld[-1]['kernel'].shape[1]} outputs but shallow has "
            f"{ls[-1]['kernel'].shape[1]}."
        )
    validation.check_hparam("weight", weight, lower=0.0, upper=1.0)
    if balance not in ("add", "merge"):
        raise ValueError(f"balance must be 'add' or 'merge', got {balance!r}.")
    if relu_approx not in _GATES:
        raise ValueError(f"relu_approx must be one of {_GATES}, got {relu_approx!r}.")
    cost = layer_costs(ld, ls, x, activation=activation)
    mapping = align_layers(cost, fix_first=fix_first)
    if balance == "merge":
        merged = merge_layers(ld, mapping, x, relu_approx=relu_approx, activation=activation)
        spec = mlp_spec(n, prefix=None)
        w = 1.0 - jnp.asarray(weight, jnp.float32)
        ot = ot_fusion(spec, _as_dict(ls), _as_dict(merged), weight=w, **ot_kwargs)
        fused = [ot.fused[f"Dense_{i}"] for i in range(n + 1)]
        return CLAFusionOutput(fused, mapping, cost, None, ot, merged)
    padded = pad_with_identities(ls, mapping, m)
    spec = mlp_spec(m, prefix=None)
    ot = ot_fusion(spec, _as_dict(ld), _as_dict(padded), weight=weight, **ot_kwargs)
    fused = [ot.fused[f"Dense_{i}"] for i in range(m + 1)]
    return CLAFusionOutput(fused, mapping, cost, padded, ot)
