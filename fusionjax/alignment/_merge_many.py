r"""MergeMany (Git Re-Basin, Algorithm 2): bring N models into one basin and average them.

Weight matching aligns one model to another; MergeMany aligns :math:`N` models to each
other. It repeatedly visits the models in a random order and weight-matches model
:math:`i` to the mean of the others,

.. math::

  \pi_i \leftarrow \mathrm{WeightMatching}\Big(\tfrac{1}{N-1}\sum_{j\ne i}\theta_j,\;
  \theta_i\Big), \qquad \theta_i \leftarrow \pi_i(\theta_i),

until a full round changes no permutation (or ``max_iter`` rounds), then returns the
mean of the aligned models. Each step can only increase
:math:`\langle \bar\theta_{-i}, \theta_i\rangle`, i.e. decrease the distance of model
:math:`i` to the others' mean.

References:
  Ainsworth, Hayase & Srinivasa, `Git Re-Basin: Merging Models modulo Permutation
  Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023 (Algorithm 2).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src import pytrees as _pytree
from fusionjax._src import validation
from fusionjax._src.base import Params
from fusionjax._src.base import PRNGKey
from fusionjax.alignment import _weight_matching
from fusionjax.alignment._spec import PermutationSpec
from fusionjax.alignment._spec import apply_permutations
from fusionjax.alignment._spec import check_spec


class MergeManyOutput(NamedTuple):
    """Result of :func:`merge_many`.

    Attributes:
      permutations: One ``{group: [n]}`` per input model: ``apply_permutations(spec,
        permutations[i], models[i])`` is model ``i`` in the common basin.
      merged: The mean of the aligned models.
      converged: Whether the last round changed no permutation.
      rounds: Rounds run.
      spec: The spec the permutations belong to.
    """

    permutations: list
    merged: Params
    converged: jax.Array
    rounds: int
    spec: PermutationSpec

    def aligned(self, models: Sequence[Params]) -> list:
        """The input ``models`` moved into the common basin."""
        pairs = zip(self.permutations, models, strict=True)
        return [apply_permutations(self.spec, p, m) for p, m in pairs]


@jax.jit
def _mean(trees: Sequence[Params]) -> Params:
    def avg(*xs):
        if not (hasattr(xs[0], "dtype") and jnp.issubdtype(xs[0].dtype, jnp.inexact)):
            return xs[0]
        acc = xs[0].astype(jnp.promote_types(xs[0].dtype, jnp.float32))
        for x in xs[1:]:
            acc = acc + x.astype(acc.dtype)
        return (acc / len(xs)).astype(xs[0].dtype)

    return jax.tree.map(avg, *trees)


def merge_many(
    spec: PermutationSpec,
    models: Sequence[Params],
    *,
    max_iter: int = 100,
    key: PRNGKey | None = None,
    solver: str = "auto",
    max_iter_matching: int = 100,
) -> MergeManyOutput:
    r"""MergeMany: align ``N`` models into one basin, then average them.

    Args:
      spec: Which leaf axes share a permutation (at least one group).
      models: ``N >= 2`` models with the same structure, shapes and dtypes: any
        pytrees, equinox modules included (leaves that are not arrays are held static;
        ``merged`` takes them from ``models[0]``).
      max_iter: Maximum number of rounds over the models.
      key: PRNG key for the visiting order of the models (round ``r`` visits
        ``jax.random.permutation(fold_in(key, r), N)``) and of the groups inside each
        weight matching; ``None`` visits models and groups in order.
      solver: LAP solver for :func:`fusionjax.alignment.weight_matching`.
      max_iter_matching: ``max_iter`` of each weight matching.

    Returns:
      A :class:`MergeManyOutput` with each model's permutations (relative to the
      model as given) and the merged mean.

    Raises:
      ValueError: if the spec has no groups, fewer than two models are given, they
        differ in structure (the message names the model and the path), or a weight
        matching input is invalid.

    Examples:
      >>> import numpy as np
      >>> from fusionjax.alignment import PermutationSpec
      >>> spec = PermutationSpec({"h": [("0", 1), ("1", 0)]})
      >>> rng = np.random.default_rng(0)
      >>> base = {"0": rng.normal(size=(8, 5)).astype(np.float32),
      ...         "1": rng.normal(size=(5, 2)).astype(np.float32)}
      >>> perm = np.array([4, 0, 3, 1, 2])
      >>> copy = {"0": base["0"][:, perm], "1": base["1"][perm]}
      >>> out = merge_many(spec, [base, copy, base])
      >>> a = out.aligned([base, copy, base])   # all three in one basin
      >>> bool(np.allclose(a[0]["0"], a[1]["0"])), bool(np.allclose(out.merged["0"], a[2]["0"]))
      (True, True)

    References:
      Ainsworth, Hayase & Srinivasa, `Git Re-Basin: Merging Models modulo Permutation
      Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023
    """
    check_spec(spec)
    if not isinstance(models, (list, tuple)):
        raise TypeError(f"models must be a list or tuple of pytrees, got {type(models).__name__}.")
    if len(models) < 2:
        raise ValueError(f"merge_many needs at least two models, got {len(models)}.")
    for i, m in enumerate(models[1:], start=1):
        validation.check_same_structure(models[0], m, name=f"models[{i}]", ref_name="models[0]")
    rest = _pytree.partition(models[0])[1]
    models = [_pytree.partition(m)[0] for m in models]  # compute on the array leaves
    num = len(models)
    sizes = spec.sizes(models[0])
    perms = [{g: np.arange(n, dtype=np.int32) for g, n in sizes.items()} for _ in range(num)]
    current = list(models)
    total = _sum(current)
    converged = False
    rounds = 0
    for r in range(max_iter):
        rounds += 1
        if key is None:
            order = np.arange(num)
        else:
            order = np.asarray(jax.random.permutation(jax.random.fold_in(key, r), num))
        changed = False
        for i in order:
            i = int(i)
            others = _mean_of_others(total, current[i], num - 1)
            step_key = None if key is None else jax.random.fold_in(key, 1_000_003 + r * num + i)
            out = _weight_matching.weight_matching(
                spec,
                others,
                current[i],
                max_iter=max_iter_matching,
                key=step_key,
                solver=solver,
            )
            step = {g: np.asarray(p) for g, p in out.permutations.items()}
            if any(not np.array_equal(p, np.arange(p.shape[0])) for p in step.values()):
                changed = True
                current[i] = _apply_jit(spec, out.permutations, current[i])
                total = _sum(current)  # recomputed (one compiled sum): no drift
                # Unit k of the new model is unit step[k] of the current one, which is
                # unit perms[i][step[k]] of the input.
                perms[i] = {g: perms[i][g][step[g]] for g in sizes}
        if not changed:
            converged = True
            break
    return MergeManyOutput(
        permutations=[{g: jnp.asarray(p) for g, p in pi.items()} for pi in perms],
        merged=_pytree.combine(_mean(current), rest),
        converged=jnp.asarray(converged),
        rounds=rounds,
        spec=spec,
    )


def _is_float(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


@jax.jit
def _sum(trees):
    def add(*xs):
        if not _is_float(xs[0]):
            return xs[0]
        acc = xs[0].astype(jnp.promote_types(xs[0].dtype, jnp.float32))
        for x in xs[1:]:
            acc = acc + x.astype(acc.dtype)
        return acc

    return jax.tree.map(add, *trees)


_apply_jit = jax.jit(apply_permutations, static_argnums=0)


@functools.partial(jax.jit, static_argnums=2)
def _mean_of_others(total, x, count: int):
    """``(total - x) / count`` on float leaves (one program per model structure)."""

    def f(t, v):
        if not _is_float(v):
            return v
        return ((t - v.astype(t.dtype)) / count).astype(v.dtype)

    return jax.tree.map(f, total, x)
