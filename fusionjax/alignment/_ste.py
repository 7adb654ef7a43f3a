r"""Straight-through estimator matching (Git Re-Basin, Algorithm 3).

Weight and activation matching align ``other`` to ``ref`` by a proxy for what matters,
the loss along the linear path between them. The straight-through estimator (STE)
optimises the loss at the midpoint directly. It learns a free proxy :math:`\tilde\theta`
(initialised at :math:`\theta_{ref}`); every step it

1. *projects*: :math:`\pi \leftarrow \mathrm{WeightMatching}(\tilde\theta,\ \theta_{other})`
   (warm-started from the previous step's :math:`\pi`), the permutation that brings
   ``other`` closest to the proxy;
2. evaluates the loss at the midpoint
   :math:`\mathcal{L}\big(\tfrac12(\theta_{ref} + \pi(\theta_{other})) \big)` on a batch, using
   the projection in the forward pass and the identity in the backward pass:
   :math:`\hat\theta = \pi(\theta_{other}) + \tilde\theta - \mathrm{sg}(\tilde\theta)`
   (:math:`\mathrm{sg}` = stop gradient), so :math:`\partial\mathcal L/\partial\tilde\theta`
   is the gradient at the midpoint with respect to its ``other`` half;
3. updates :math:`\tilde\theta` with the optimizer.

The permutation with the lowest midpoint batch loss seen is returned (as in the paper's
code). Step 1 of the first step is plain weight matching of ``ref`` to ``other``, so
that permutation is among the candidates.

References:
  Ainsworth, Hayase & Srinivasa, `Git Re-Basin: Merging Models modulo Permutation
  Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023 (Algorithm 3; the
  authors' ``mnist_mlp_ste2.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from fusionjax._src import pytrees as _pytree
from fusionjax._src import training
from fusionjax._src import validation
from fusionjax._src.base import Params
from fusionjax._src.base import PRNGKey
from fusionjax.alignment import _weight_matching
from fusionjax.alignment._spec import AlignmentOutput
from fusionjax.alignment._spec import PermutationSpec
from fusionjax.alignment._spec import apply_permutations
from fusionjax.alignment._spec import check_spec

LossFn = Callable[[Params, Any], jax.Array]
"""``loss_fn(params, batch) -> scalar``."""


class SteTrace(NamedTuple):
    """Per-step record of :func:`ste_matching` (from :func:`_ste_matching`).

    Attributes:
      losses: Midpoint loss of each step's projection on that step's batch, ``[steps]``.
      changed: Whether each step's projection differed from the previous one.
    """

    losses: np.ndarray
    changed: np.ndarray


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def _midpoint(a, b):
    """``(a + b) / 2`` computed in at least float32, cast back (the library's dtype policy)."""
    if not _is_float(a):
        return a
    dt = validation.compute_dtype(a.dtype)
    return (0.5 * (a.astype(dt) + b.astype(dt))).astype(a.dtype)


def _make_step(ref, loss_fn: LossFn, optimizer: optax.GradientTransformation):
    def midpoint_loss(proxy, projected, batch):
        def straight_through(x, px):
            if not _is_float(x):
                return px
            return px + (x - lax.stop_gradient(x))

        ste = jax.tree.map(straight_through, proxy, projected)
        mid = jax.tree.map(_midpoint, ref, ste)
        return loss_fn(mid, batch)

    @jax.jit
    def step(proxy, opt_state, projected, batch):
        loss, grads = jax.value_and_grad(midpoint_loss)(proxy, projected, batch)
        updates, opt_state = optimizer.update(grads, opt_state, proxy)
        return optax.apply_updates(proxy, updates), opt_state, loss

    return step


_apply_jit = jax.jit(apply_permutations, static_argnums=0)


def ste_matching(
    spec: PermutationSpec,
    ref: Params,
    other: Params,
    loss_fn: LossFn,
    batches: Iterable[Any],
    *,
    steps: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
    key: PRNGKey | None = None,
    max_iter: int = 100,
    solver: str = "auto",
) -> AlignmentOutput:
    r"""Git Re-Basin straight-through estimator: learn the permutation for a low-loss midpoint.

    Args:
      spec: Which leaf axes share a permutation (at least one group).
      ref: The fixed endpoint :math:`\theta_{ref}` (also the proxy's initial value):
        any pytree, equinox modules included (leaves that are not arrays are held
        static, and put back before ``loss_fn`` sees the model).
      other: The model to permute, :math:`\theta_{other}`.
      loss_fn: ``loss_fn(params, batch) -> scalar`` (a training loss; jittable).
      batches: Iterable of batches, one per step (e.g. a list, or a generator).
      steps: Stop after this many steps (default: when ``batches`` is exhausted).
      optimizer: Optax optimizer for the proxy; default ``optax.sgd(1e-2, momentum=0.9)``
        as in the paper's code.
      key: PRNG key for each step's weight matching order (step ``s`` uses
        ``fold_in(key, s)``); ``None`` for the spec order.
      max_iter: ``max_iter`` of each step's weight matching.
      solver: LAP solver for weight matching (``"auto"``, ``"scipy"``, ``"hungarian"``).

    Returns:
      An :class:`AlignmentOutput` with the permutations of the lowest midpoint batch loss
      seen, ``objective`` that loss (lower is better, unlike weight matching's), and
      ``converged`` whether the last step's projection equalled the previous one.

    Raises:
      ValueError: if the spec has no groups, ``other`` differs from ``ref`` (the
        message names the path), there are no batches, or a weight matching input is
        invalid.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from fusionjax.alignment import PermutationSpec
      >>> spec = PermutationSpec({"h": [("0", 1), ("1", 0)]})
      >>> rng = np.random.default_rng(0)
      >>> ref = {"0": rng.normal(size=(3, 4)).astype(np.float32),
      ...        "1": rng.normal(size=(4, 1)).astype(np.float32)}
      >>> other = {"0": ref["0"][:, ::-1], "1": ref["1"][::-1]}
      >>> x = rng.normal(size=(32, 3)).astype(np.float32)
      >>> def loss_fn(p, x):
      ...     y = jax.nn.relu(x @ p["0"]) @ p["1"]
      ...     return jnp.mean((y - jax.nn.relu(x @ ref["0"]) @ ref["1"]) ** 2)
      >>> out = ste_matching(spec, ref, other, loss_fn, [x] * 5)
      >>> out.permutations["h"]
      Array([3, 2, 1, 0], dtype=int32)

    References:
      Ainsworth, Hayase & Srinivasa, `Git Re-Basin: Merging Models modulo Permutation
      Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023
    """
    out, _ = _ste_matching(
        spec,
        ref,
        other,
        loss_fn,
        batches,
        steps=steps,
        optimizer=optimizer,
        key=key,
        max_iter=max_iter,
        solver=solver,
    )
    return out


def _ste_matching(
    spec, ref, other, loss_fn, batches, *, steps, optimizer, key, max_iter, solver
) -> tuple[AlignmentOutput, SteTrace]:
    """:func:`ste_matching`, also returning the per-step :class:`SteTrace`."""
    check_spec(spec)
    validation.check_same_structure(ref, other, name="other", ref_name="ref")
    # Compute on the array leaves; loss_fn sees whole models (static leaves put back).
    (ref, rest), (other, _) = _pytree.partition(ref), _pytree.partition(other)
    full_loss = loss_fn

    def loss_fn(params, batch):
        return full_loss(_pytree.combine(params, rest), batch)

    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise ValueError(f"steps must be a positive integer or None, got {steps!r}.")
        batches = itertools.islice(batches, int(steps))
    if optimizer is None:
        optimizer = optax.sgd(1e-2, momentum=0.9)
    # optax mixes int step counts with floats: its own arithmetic under standard promotion.
    optimizer = training.standard_promotion(optimizer)
    step = _make_step(ref, loss_fn, optimizer)
    proxy = ref
    opt_state = optimizer.init(proxy)
    perm = None
    best_loss, best_perm = np.inf, None
    losses, changed = [], []
    for s, batch in enumerate(batches):
        matched = _weight_matching.weight_matching(
            spec,
            proxy,
            other,
            max_iter=max_iter,
            key=None if key is None else jax.random.fold_in(key, s),
            init_permutations=perm,
            solver=solver,
        )
        new = matched.permutations
        changed.append(
            perm is None
            or any(not np.array_equal(np.asarray(new[g]), np.asarray(perm[g])) for g in new)
        )
        perm = new
        projected = _apply_jit(spec, perm, other)
        proxy, opt_state, loss = step(proxy, opt_state, projected, batch)
        loss = float(loss)
        losses.append(loss)
        if loss < best_loss or best_perm is None:
            best_loss, best_perm = loss, perm
    if best_perm is None:
        raise ValueError("ste_matching got no batches: pass at least one.")
    out = AlignmentOutput(
        permutations=best_perm,
        objective=jnp.asarray(best_loss, jnp.float32),
        converged=jnp.asarray(len(changed) > 1 and not changed[-1]),
        spec=spec,
    )
    return out, SteTrace(losses=np.asarray(losses), changed=np.asarray(changed))
