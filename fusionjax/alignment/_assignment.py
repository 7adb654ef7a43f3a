r"""Linear assignment (maximisation) for permutation alignment.

Every alignment method here reduces, per group of units, to a *linear assignment
problem* (LAP): given a score matrix :math:`S \in \mathbb{R}^{n\times n}` (rows: units of
``ref``, columns: units of ``other``), find the permutation :math:`\pi` maximising
:math:`\sum_i S_{i,\pi(i)}`. The result follows :func:`fusionjax.alignment.apply_permutations`'
gather convention: unit ``i`` of the aligned model is unit ``perm[i]`` of ``other``.

Two exact solvers are offered:

* ``"scipy"``: :func:`scipy.optimize.linear_sum_assignment` on the host (a shortest
  augmenting path method in C). Measured on a 2-core AMD EPYC (XLA:CPU): 512 x 512
  random scores 10.6 ms, near-diagonal 4.0 ms.
* ``"hungarian"``: :func:`optax.assignment.hungarian_algorithm` (the Hungarian method in
  :mod:`jax.lax` loops), jittable, so a whole alignment can run in one compiled program
  with no host round trip: 24.5 / 6.2 ms at 512 on the same machine. Its sequential
  inner loops cost a few microseconds per iteration on XLA:CPU.

``solver="auto"`` picks ``"hungarian"`` when the inputs are traced (under
:func:`jax.jit`, where a host solver cannot run) and ``"scipy"`` otherwise. Measured on
random MLP pairs with 3 groups of ``n`` units (warm, compiled loop vs host loop): n = 16
1.9 vs 2.7 ms, 64 6.2 vs 5.9 ms, 256 120 vs 81 ms, 512 0.49 vs 0.25 s, while the compiled
loop compiled more slowly (1.4-1.6 vs 0.6-1.2 s); see ``benchmarks/README.md``. On an
accelerator the compiled loop avoids one host round trip per solve, but its sequential
solver loops are slow there too (not measured).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

SOLVERS = ("auto", "scipy", "hungarian")


def check_solver(solver: str) -> None:
    """Raises ``ValueError`` unless ``solver`` is one of :data:`SOLVERS`."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}.")


def resolve_solver(solver: str, sizes: Iterable[int], traced: bool) -> str:
    """The concrete solver (``"scipy"`` or ``"hungarian"``) that ``solver`` stands for.

    Args:
      solver: ``"auto"``, ``"scipy"`` or ``"hungarian"``.
      sizes: Group sizes of the problem.
      traced: Whether any input is a tracer (inside :func:`jax.jit`).

    Returns:
      ``"scipy"`` or ``"hungarian"``.

    Raises:
      ValueError: for an unknown solver, or ``"scipy"`` with traced inputs.
    """
    check_solver(solver)
    del sizes  # measured: no group size where the compiled loop wins warm and compiled
    if solver == "auto":
        return "hungarian" if traced else "scipy"
    if solver == "scipy" and traced:
        raise ValueError(
            'solver="scipy" runs on the host and cannot be used under jax.jit; use '
            'solver="hungarian" (or "auto").'
        )
    return solver


def assign_scipy(score: np.ndarray) -> np.ndarray:
    """The permutation maximising ``sum_i score[i, perm[i]]`` (scipy, on the host).

    Args:
      score: ``[n, n]`` scores, any float dtype (scipy computes in float64).

    Returns:
      ``perm``: int32 ``[n]``.
    """
    _, cols = scipy.optimize.linear_sum_assignment(np.asarray(score), maximize=True)
    return cols.astype(np.int32)


def assign_hungarian(score: jax.Array) -> jax.Array:
    """The permutation maximising ``sum_i score[i, perm[i]]`` (optax, jittable).

    Args:
      score: ``[n, n]`` scores.

    Returns:
      ``perm``: int32 ``[n]``.
    """
    n = score.shape[0]
    if n == 0:
        return jnp.zeros((0,), jnp.int32)
    rows, cols = optax.assignment.hungarian_algorithm(-score)
    # The pairs (rows[k], cols[k]) are the assignment; optax versions differ in which of
    # the two they return sorted, so scatter into row order.
    return jnp.zeros((n,), jnp.int32).at[rows].set(cols.astype(jnp.int32))
