r"""Fisher merging: diagonal Fisher estimates and the Fisher-weighted average."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fusionjax._src import batches
from fusionjax._src import pytrees
from fusionjax._src import tree as tree_lib
from fusionjax._src import validation
from fusionjax._src.base import MISSING
from fusionjax._src.base import ArrayLike
from fusionjax._src.base import Params
from fusionjax._src.base import Step
from fusionjax.merging._linear import sum_rows

_HIGHEST = jax.lax.Precision.HIGHEST


_MISSING = MISSING


def fisher_diagonal(
    logits_fn: Callable[[Params, Any], jax.Array],
    params: Params,
    inputs: Any,
    *,
    batch_size: int | None = None,
) -> Params:
    r"""Diagonal of the Fisher information of a classifier, as in Fisher merging.

    Computes the *true* Fisher (the expectation is over the model's own
    predictive distribution, not over the data labels), diagonal only:

    .. math::
      \hat F = \frac1N \sum_{i=1}^N \sum_{y=1}^C p_\theta(y\mid x_i)
        \left(\nabla_\theta \log p_\theta(y\mid x_i)\right)^2 ,

    where :math:`p_\theta(\cdot\mid x) = \mathrm{softmax}(\text{logits}(x))`.
    For every example, the gradients of all :math:`C` log-probabilities are taken
    with :func:`jax.jacrev` (one forward pass, :math:`C` backward passes), the
    examples are vectorised with :func:`jax.vmap`, and the class weights
    :math:`p_\theta(y\mid x)` are constants (no gradient flows through them).
    This is the exact expectation the reference implementation computes (it
    does not sample :math:`y`).

    ``inputs`` are processed ``batch_size`` examples at a time by one jitted
    function (the last batch is padded and masked, so it does not recompile;
    calls with the same ``logits_fn`` object and parameter shapes, e.g. one per
    model to merge, share the compiled function).
    Peak memory is about ``batch_size * C`` times the size of ``params``.

    Args:
      logits_fn: ``logits_fn(params, x_batch) -> [n, C]`` unnormalised
        log-probabilities of a batch of ``n`` examples. It is called on batches of
        one example (``n = 1``) under :func:`jax.vmap`.
      params: Parameters :math:`\theta` at which the Fisher is evaluated: any
        pytree. Only floating-point leaves are differentiated.
      inputs: An array ``[N, ...]`` of examples, or a pytree of such arrays
        sharing the leading axis ``N`` (e.g. ``{"ids": ..., "mask": ...}``).
      batch_size: Examples per jitted step; ``None`` processes all ``N`` at once.

    Returns:
      A pytree like ``params`` holding :math:`\hat F` (float32, non-negative) at
      every floating-point leaf and ``None`` at every other leaf. Stack one per
      model with :func:`fusionjax.stack` for
      :func:`fusionjax.merging.fisher_merging`.

    Raises:
      ValueError: if ``inputs`` is empty or its leaves disagree on ``N``, if
        ``batch_size`` is not a positive integer, if ``params`` has no
        floating-point leaf, or if ``logits_fn`` does not return ``[n, C]``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> params = {"w": jnp.ones((3, 2))}
      >>> logits_fn = lambda p, x: x @ p["w"]
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> fisher = fisher_diagonal(logits_fn, params, x, batch_size=4)
      >>> fisher["w"].shape
      (3, 2)

    References:
      Matena & Raffel, `Merging Models with Fisher-Weighted Averaging
      <https://arxiv.org/abs/2111.09832>`_, NeurIPS 2022
    """
    n, batch_size = validation.check_examples(inputs, batch_size)

    arrays, static = pytrees.jit_partition(params)
    is_float = tuple(bool(tree_lib.is_mergeable(x)) for x in arrays)
    if not any(is_float):
        raise ValueError("params has no floating-point leaf to compute a Fisher for.")
    try:
        hash(static)
    except TypeError:
        raise TypeError(
            "fisher_diagonal needs params whose leaves are arrays or hashable values; "
            f"got unhashable leaves {[type(x).__name__ for _, x in static[1]]}."
        ) from None
    arrays = [jnp.asarray(x) for x in arrays]

    acc = [jnp.zeros(x.shape, jnp.float32) for x, f in zip(arrays, is_float, strict=True) if f]
    for xb, mask in batches.padded_batches(inputs, n, batch_size):
        acc = _accumulate_fisher(logits_fn, static, is_float, acc, arrays, xb, mask)

    fishers = iter(a / jnp.float32(n) for a in acc)
    out = [next(fishers) if f else None for f in is_float]
    treedef, rest = static
    leaves = dict(rest)
    it = iter(out)
    return treedef.unflatten([None if i in leaves else next(it) for i in range(treedef.num_leaves)])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _accumulate_fisher(logits_fn, static, is_float, acc, arrays, xb, mask):
    """Adds one (masked) batch's Fisher sum to ``acc``; compiled once per model shape."""

    def rebuild(fl):
        it = iter(fl)
        full = [next(it) if f else a for a, f in zip(arrays, is_float, strict=True)]
        return pytrees.jit_combine(full, static)

    def example_log_probs(fl, x):
        logits = logits_fn(rebuild(fl), jax.tree.map(lambda a: a[None], x))
        if jnp.ndim(logits) != 2 or jnp.shape(logits)[0] != 1:
            raise ValueError(
                "logits_fn must return logits of shape [n, C] for a batch of n examples; "
                f"for a batch of 1 it returned shape {jnp.shape(logits)}."
            )
        lp = jax.nn.log_softmax(logits[0].astype(jnp.float32))
        return lp, lp

    fl = [a for a, f in zip(arrays, is_float, strict=True) if f]
    jac_fn = jax.jacrev(example_log_probs, has_aux=True)
    jac, lp = jax.vmap(jac_fn, in_axes=(None, 0))(fl, xb)  # [B, C, ...], [B, C]
    w = (jax.lax.stop_gradient(jnp.exp(lp)) * mask[:, None]).reshape(-1)  # [B*C]
    out = []
    for a, g in zip(acc, jac, strict=False):
        g2 = jnp.square(g.astype(jnp.float32)).reshape(w.shape[0], -1)
        # A contraction, not jnp.sum over the example axis (slow on XLA:CPU).
        out.append(a + jnp.matmul(w, g2, precision=_HIGHEST).reshape(a.shape))
    return out


def _check_fisher(f, x):
    if f is _MISSING:
        raise TypeError(
            "fisher_merging needs per-parameter Fishers: pass "
            "fishers=fusionjax.stack([fisher_0, ..., fisher_T-1]) to fusionjax.merge, "
            "e.g. from fusionjax.merging.fisher_diagonal."
        )
    if f is None:
        raise ValueError(
            "fishers has no value for this parameter; every merged (floating-point) "
            "parameter needs a Fisher [T, ...] (use ones for a plain average)."
        )
    f = jnp.asarray(f)
    if not jnp.issubdtype(f.dtype, jnp.floating):
        raise TypeError(f"fishers must be floating point, got dtype {f.dtype}.")
    t = x.shape[0]
    if f.shape == (t,) and x.ndim > 1:  # one Fisher value per model for a whole subtree
        f = f.reshape((t,) + (1,) * (x.ndim - 1))
        return jnp.broadcast_to(f.astype(x.dtype), x.shape)
    if f.shape != x.shape:
        raise ValueError(
            f"fishers has shape {f.shape}, expected {x.shape} (the stacked parameter "
            f"[T, ...] with T={t} models), or ({t},) for one value per model."
        )
    return f.astype(x.dtype)


def _fisher_merging(x, *, fishers, fisher_floor, weights, uniform, **_):
    f = _check_fisher(fishers, x)
    f = jnp.maximum(f, fisher_floor.astype(x.dtype))
    t = x.shape[0]
    if not uniform:
        f = f * weights.astype(x.dtype).reshape((t,) + (1,) * (x.ndim - 1))
    num = functools.reduce(operator.add, [f[i] * x[i] for i in range(t)])
    return num / sum_rows(f)


def fisher_merging(
    *, fisher_floor: ArrayLike = 1e-6, weights: ArrayLike | None = None
) -> Step:
    r"""Fisher merging: the Fisher-weighted average of the models.

    With diagonal Fishers :math:`F_t` and model weights :math:`\lambda_t`, every
    parameter entry is merged as

    .. math::
      \theta^\star = \frac{\sum_t \lambda_t \tilde F_t\,\theta_t}{\sum_t \lambda_t \tilde F_t},
      \qquad \tilde F_t = \max(F_t, \epsilon),

    which :func:`fusionjax.merge` computes in task-vector form,
    :math:`\tau^\star = \sum_t \lambda_t\tilde F_t\tau_t / \sum_t \lambda_t\tilde F_t`
    (the same thing, since the weights of each entry sum to one and all models
    share the base). The floor :math:`\epsilon` keeps the denominator positive:
    where every Fisher is below it, the result is the :math:`\lambda`-weighted
    plain average. Equal Fishers give the plain (weighted) average; a model whose
    Fisher dominates an entry decides that entry.

    The Fishers are a required extra argument of :func:`fusionjax.merge`:
    ``fishers``, a pytree like the parameters with a leading model axis
    ``[T, ...]`` on every merged leaf, e.g.
    ``fishers=fusionjax.stack([fisher_diagonal(...) for each model])``, in the
    order of ``finetuned``. It may be a prefix of the parameters whose leaves are
    ``[T]`` (one isotropic Fisher value per model for a whole subtree).

    Differences from the reference implementation: it floors only the first
    ("target") model's Fisher by default (``favor_target_model``); here all are
    floored, so no model is favoured. It also divides :math:`\lambda_t` by the
    global L2 norm of :math:`F_t` by default (``normalize_fishers``), which needs
    the whole Fisher; do it with ``weights``, e.g.
    ``weights=lam / jnp.stack([optax.tree.norm(f) for f in fisher_list])``.

    Args:
      fisher_floor: :math:`\epsilon > 0`, the smallest Fisher value used (the
        reference implementation's ``fisher_floor``). Larger values pull
        low-information entries towards the plain average.
      weights: Optional non-negative model weights :math:`\lambda_t`, shape
        ``[T]`` (the paper's merging coefficients); uniform if ``None``. Only
        their ratios matter.

    Returns:
      A leafwise :class:`fusionjax.Step` that reduces ``[T, ...] -> [...]`` and
      requires ``fishers``.

    Raises:
      ValueError: (when built) ``fisher_floor`` is not positive, or ``weights``
        are negative or all zero; (when merging) ``fishers`` has a wrong shape or
        no value at a merged parameter. :func:`fusionjax.merge` names the path.
      TypeError: (when merging) ``fishers`` was not passed.

    Examples:
      >>> import jax.numpy as jnp, fusionjax as fj
      >>> base = {"w": jnp.zeros(2)}
      >>> fts = [{"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([3.0, 3.0])}]
      >>> fishers = fj.stack([{"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([1.0, 3.0])}])
      >>> fj.merge(base, fts, fisher_merging(), fishers=fishers)
      {'w': Array([2. , 2.5], dtype=float32)}

    References:
      Matena & Raffel, `Merging Models with Fisher-Weighted Averaging
      <https://arxiv.org/abs/2111.09832>`_, NeurIPS 2022
    """
    validation.check_hparam("fisher_floor", fisher_floor, lower=0.0, lower_open=True)
    validation.check_weights(weights)

    return Step(
        "fisher_merging",
        _fisher_merging,
        reduces=True,
        hparams={"fisher_floor": fisher_floor, "weights": 1.0 if weights is None else weights},
        options={"uniform": weights is None},
        per_model=("weights",),
        extras=("fishers",),
    )

