r"""Dynamic Logit Fusion (Fan et al., NeurIPS 2024): a per-token transfer weight, solved.

Notation (the paper's). :math:`M_S` are the strong (large, untuned) model's logits,
:math:`M_t` a small tuned expert's and :math:`M` the small base's;
:math:`P = \mathrm{softmax}(M_S)`, :math:`Q_t = \mathrm{softmax}(M_t)`,
:math:`Q = \mathrm{softmax}(M)`, :math:`d = \log Q_t - \log Q` and

.. math::
  \tilde P(\alpha) \propto P\, e^{\alpha d} = \mathrm{softmax}(M_S + \alpha (M_t - M)).

At every position :math:`\alpha` minimises

.. math::
  f(\alpha) = \big(A(\alpha) - a\big)^2 + \big(B(\alpha) - b\big)^2,\quad
  A = \mathrm{KL}(\tilde P\|P),\; B = \mathrm{KL}(P\|\tilde P),\;
  a = \mathrm{KL}(Q_t\|Q),\; b = \mathrm{KL}(Q\|Q_t):

the strong model moves away from itself as far as the expert moved from its base,
measured both ways. The paper searches a grid, :math:`\alpha \in \{0, 0.1, \dots, 2\}`
(``solver="grid"``).

**The exact solver.** :math:`\tilde P(\alpha)` is an exponential family with
log-partition :math:`c(\alpha) = \log \sum_v P(v) e^{\alpha d(v)}`, so with
:math:`\mu(\alpha) = \mathbb E_{\tilde P}[d] = c'(\alpha)`:

.. math::
  A = \alpha\mu(\alpha) - c(\alpha),\quad B = c(\alpha) - \alpha\mu(0),\quad
  A' = \alpha \mathrm{Var}_{\tilde P}(d),\quad B' = \mu(\alpha) - \mu(0),

both zero at :math:`\alpha = 0` and non-decreasing for :math:`\alpha \ge 0`
(:math:`B'' = \mathrm{Var}_{\tilde P}(d)`, :math:`A'' = \mathrm{Var} + \alpha\kappa_3`).
So :math:`f'(\alpha)/2 = (A-a)A' + (B-b)B'` is negative while both divergences are below
their targets and positive once both are above; ``solver="exact"`` finds its sign
change by safeguarded Newton (Newton steps that leave the bracket, or meet
:math:`f'' \le 0`, are replaced by bisection). Between the two crossings :math:`f`
need not be unimodal — on strongly peaked distributions with large :math:`|d|` the tests
found two basins — so the solver first evaluates :math:`f` and :math:`f'` at
``scan_points`` evenly spaced points (default 9, step 0.25), brackets the best one on the
side where :math:`f` decreases, and runs ``num_iterations`` (default 6) Newton steps in
that bracket. The point returned is the best *evaluated* one, so ``objective`` is
exactly :math:`f` there and is never above the scan's best. Measured against a 0.002
grid: equal to 0.004 on random, peaked (logits scale 6) and nearly-equal-expert
distributions and at :math:`V = 32768`; on extreme cases (logit scale 10, expert and base
as far apart as two random models) 2 positions in 256 fell in a second basin, up to 1.1 %
above the 0.1-grid's objective.

**Cost.** One evaluation at :math:`\alpha` is two passes over ``[..., V]`` — a max, then
one fused pass for :math:`\sum e^{z}` and the first three moments of :math:`d` around a
shift (the previous evaluation's mean, so the central moments are not differences of
large numbers) — for both solvers. The grid evaluates :math:`\lfloor\alpha_{\max}/
\text{step}\rfloor + 1 = 21` points, the exact solver ``scan_points + num_iterations``
(default 15), plus set-up passes. All in float32; ``-inf`` logits are handled by masks, never
by ``0 \cdot \infty``.

**Masked tokens.** A token both small models rule out (``-inf``) has :math:`d = 0` (no
evidence); a token exactly one of them rules out is removed from the strong model's
support for that expert (as in :mod:`fusionjax.logits`' steering functions), so
:math:`\tilde P(\alpha)` remains one exponential family through :math:`P` and the
targets are sums over the tokens both small models allow.

**Several experts.** The paper's multi-task objective sums the single-expert terms over
all :math:`T` experts' targets, :math:`\sum_t (A - a_t)^2 + (B - b_t)^2`, and to avoid a
:math:`T`-dimensional search it lets *one* expert act per decoding step: its pseudo-code
searches :math:`\alpha` for each expert alone ("perform α search only for one task, for
a total of T times") and keeps the (expert, α) with the smallest summed loss. Since
:math:`\sum_t (x - a_t)^2 = T (x - \bar a)^2 + \sum_t (a_t - \bar a)^2`, that is the
single-expert problem with the centroid targets :math:`(\bar a, \bar b)`, solved per
expert, then the expert with the smallest objective is chosen
(``targets="centroid"``, the default). ``targets="own"`` instead gives each expert its
own targets :math:`(a_t, b_t)` and chooses the smallest :math:`f_t` (not the paper's).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fusionjax._src import validation
from fusionjax._src.base import ArrayLike
from fusionjax.logits import _checks

Solver = Literal["exact", "grid"]
Targets = Literal["centroid", "own"]
_STATIC = ("solver", "alpha_max", "grid_step", "num_iterations", "scan_points", "targets")


class DynamicAlphaOutput(NamedTuple):
    r"""The solved transfer weight of :func:`dynamic_alpha` (a pytree; crosses ``jax.jit``).

    Attributes:
      alpha: ``[...]`` the weight :math:`\alpha` of the chosen expert at every position.
      objective: ``[...]`` the minimised objective there (with several experts and
        ``targets="centroid"``, the paper's sum over every expert's targets).
      expert_index: ``[...]`` int32, which expert acts (0 with a single expert).
    """

    alpha: jax.Array
    objective: jax.Array
    expert_index: jax.Array


class DynamicFusionOutput(NamedTuple):
    r"""The fused next-token distribution of :func:`dynamic_logit_fusion` (a pytree).

    Attributes:
      log_probs: ``[..., V]`` :math:`\log\mathrm{softmax}(M_S + \alpha\, d)` with the chosen
        expert's :math:`d`.
      alpha: ``[...]`` the weights used.
      expert_index: ``[...]`` int32, which expert acts at every position.
    """

    log_probs: jax.Array
    alpha: jax.Array
    expert_index: jax.Array


class _Problem(NamedTuple):
    log_p: jax.Array  # [E, ..., V] strong log-probs (per-expert support)
    d: jax.Array  # [E, ..., V] centred d - mu0, finite
    mu0: jax.Array  # [E, ..., 1]
    var0: jax.Array  # [E, ..., 1]
    a: jax.Array  # [E, ..., 1] KL(Q_t || Q)
    b: jax.Array  # [E, ..., 1] KL(Q || Q_t)


def _stack_experts(expert_logits, ref: jax.Array) -> jax.Array:
    if isinstance(expert_logits, (list, tuple)):
        if not expert_logits:
            raise ValueError("expert_logits is empty: at least one expert is needed.")
        xs = [_checks.as_logits(x, f"expert_logits[{i}]") for i, x in enumerate(expert_logits)]
        for i, x in enumerate(xs):
            _checks.same_shape(x, f"expert_logits[{i}]", ref, "strong_logits")
        return jnp.stack(xs)
    x = _checks.as_logits(expert_logits, "expert_logits")
    if x.shape == ref.shape:
        return x[None]
    if x.ndim == ref.ndim + 1 and x.shape[1:] == ref.shape:
        return x
    raise ValueError(
        f"expert_logits must have the shape of strong_logits, {ref.shape} (one expert), or "
        f"[E, ...] = (E, *{ref.shape}) (E experts stacked), got {x.shape}."
    )


def _problem(strong_logits, expert_logits, base_logits, where) -> _Problem:
    s = _checks.as_logits(strong_logits, "strong_logits")
    base = _checks.as_logits(base_logits, "base_logits")
    _checks.same_shape(base, "base_logits", s, "strong_logits")
    experts = _stack_experts(expert_logits, s)
    mask = _checks.vocab_mask(where, s.shape)
    dtype = jnp.promote_types(jnp.promote_types(s.dtype, base.dtype), experts.dtype)
    s, base, experts = (x.astype(dtype) for x in (s, base, experts))
    ls = _checks.log_softmax(_checks.apply_mask(s, mask))
    lq = _checks.log_softmax(_checks.apply_mask(base, mask))
    lt = _checks.log_softmax(_checks.apply_mask(experts, mask))  # [E, ..., V]
    d, one_side = _checks.masked_difference(lt, lq[None])
    log_p = _checks.log_softmax(jnp.where(one_side, -jnp.inf, ls[None]))
    p = jnp.exp(log_p)
    mu0 = jnp.sum(p * d, axis=-1, keepdims=True)
    dc = jnp.where(jnp.isneginf(log_p), 0.0, d - mu0).astype(dtype)
    var0 = jnp.sum(p * dc * dc, axis=-1, keepdims=True)
    a = jnp.sum(jnp.exp(lt) * d, axis=-1, keepdims=True)
    b = -jnp.sum(jnp.exp(lq)[None] * d, axis=-1, keepdims=True)
    # KLs are >= 0; float rounding of near-equal distributions must not make them negative.
    return _Problem(log_p, dc, mu0, var0, jnp.maximum(a, 0.0), jnp.maximum(b, 0.0))


def _evaluate(log_p, d, alpha, shift):
    r"""``(B, m1, var, k3)`` at ``alpha`` in two passes; ``d`` is centred at :math:`\mu(0)`.

    :math:`B = \log\sum_v P e^{\alpha d} = c(\alpha) - \alpha\mu(0)`, :math:`m_1 =
    \mu(\alpha) - \mu(0)`, and the central second and third moments under
    :math:`\tilde P(\alpha)`, from moments around ``shift`` (near :math:`m_1`).
    """
    z = log_p + alpha * d
    zmax = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - zmax)
    u = d - shift
    s0 = jnp.sum(e, axis=-1, keepdims=True)
    s1 = jnp.sum(e * u, axis=-1, keepdims=True) / s0
    s2 = jnp.sum(e * u * u, axis=-1, keepdims=True) / s0
    s3 = jnp.sum(e * u * u * u, axis=-1, keepdims=True) / s0
    big_b = zmax + jnp.log(s0)
    m1 = shift + s1
    var = jnp.maximum(s2 - s1 * s1, 0.0)
    k3 = s3 - 3.0 * s1 * s2 + 2.0 * s1 * s1 * s1
    return big_b, m1, var, k3


def _objective(alpha, big_b, m1, a, b):
    big_a = jnp.maximum(alpha * m1 - big_b, 0.0)
    big_b = jnp.maximum(big_b, 0.0)
    return (big_a - a) ** 2 + (big_b - b) ** 2, big_a, big_b


def _solve_grid(pr: _Problem, a, b, alpha_max: float, grid_step: float):
    n = int(round(alpha_max / grid_step)) + 1
    grid = jnp.minimum(jnp.arange(n, dtype=pr.d.dtype) * grid_step, alpha_max)

    def body(carry, alpha):
        best_f, best_alpha = carry
        big_b, m1, _, _ = _evaluate(pr.log_p, pr.d, alpha, jnp.zeros((), pr.d.dtype))
        f, _, _ = _objective(alpha, big_b, m1, a, b)
        better = f < best_f
        return (jnp.where(better, f, best_f), jnp.where(better, alpha, best_alpha)), None

    init = (jnp.full(a.shape, jnp.inf, a.dtype), jnp.zeros(a.shape, a.dtype))
    (best_f, best_alpha), _ = jax.lax.scan(body, init, grid)
    return best_alpha, best_f


def _solve_exact(pr: _Problem, a, b, alpha_max: float, num_iterations: int, scan_points: int):
    dtype = pr.d.dtype
    zero = jnp.zeros(a.shape, dtype)

    def g_terms(alpha, shift):
        big_b, m1, var, k3 = _evaluate(pr.log_p, pr.d, alpha, shift)
        f, big_a, big_b = _objective(alpha, big_b, m1, a, b)
        da, db = alpha * var, m1  # A', B'
        g = (big_a - a) * da + (big_b - b) * db
        dg = da * da + (big_a - a) * (var + alpha * k3) + db * db + (big_b - b) * var
        return f, g, dg, m1

    # 1. Scan: f and f' at scan_points nodes; the best node picks the basin.
    h = alpha_max / (scan_points - 1)
    nodes = jnp.minimum(jnp.arange(scan_points, dtype=dtype) * h, alpha_max)

    def scan_body(carry, t):
        best = carry
        f, g, dg, m1 = g_terms(jnp.full(a.shape, t, dtype), best[4])
        better = f < best[0]
        new = (f, jnp.full(a.shape, t, dtype), g, dg, m1)
        return tuple(jnp.where(better, n, o) for n, o in zip(new, best, strict=True)), None

    init = (jnp.full(a.shape, jnp.inf, dtype), zero, zero, zero, zero)
    (best_f, t_best, g_best, dg_best, m1_best), _ = jax.lax.scan(scan_body, init, nodes)
    # 2. Bracket next to the best node, on the side where f decreases.
    down_right = (g_best < 0) | (t_best <= 0)
    lo = jnp.where(down_right, t_best, jnp.maximum(t_best - h, 0.0))
    hi = jnp.where(down_right, jnp.minimum(t_best + h, alpha_max), t_best)
    newton = t_best - g_best / jnp.where(dg_best > 0, dg_best, 1.0)
    ok = (dg_best > 0) & (newton > lo) & (newton < hi)
    alpha = jnp.where(ok, newton, 0.5 * (lo + hi))
    best_alpha = t_best

    # 3. Safeguarded Newton on f' inside the bracket; keep the best evaluated point.
    def body(_, state):
        lo, hi, alpha, shift, best_f, best_alpha = state
        f, g, dg, m1 = g_terms(alpha, shift)
        better = f < best_f
        best_f = jnp.where(better, f, best_f)
        best_alpha = jnp.where(better, alpha, best_alpha)
        lo = jnp.where(g < 0, alpha, lo)
        hi = jnp.where(g < 0, hi, alpha)
        newton = alpha - g / jnp.where(dg > 0, dg, 1.0)
        ok = (dg > 0) & (newton > lo) & (newton < hi)
        alpha = jnp.where(ok, newton, 0.5 * (lo + hi))
        return lo, hi, alpha, m1, best_f, best_alpha

    state = (lo, hi, alpha, m1_best, best_f, best_alpha)
    *_, best_f, best_alpha = jax.lax.fori_loop(0, num_iterations, body, state)
    return best_alpha, best_f


def _check_options(solver, alpha_max, grid_step, num_iterations, targets, scan_points=9):
    if solver not in ("exact", "grid"):
        raise ValueError(f"solver must be 'exact' or 'grid', got {solver!r}.")
    if targets not in ("centroid", "own"):
        raise ValueError(f"targets must be 'centroid' or 'own', got {targets!r}.")
    for name, value in (("alpha_max", alpha_max), ("grid_step", grid_step)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name} must be a Python number (it decides the search), got "
                            f"{type(value).__name__}.")
        validation.check_hparam(name, value, lower=0.0, lower_open=True)
    if not isinstance(num_iterations, int) or isinstance(num_iterations, bool) or (
        num_iterations < 1
    ):
        raise ValueError(f"num_iterations must be a positive Python int, got {num_iterations!r}.")
    if not isinstance(scan_points, int) or isinstance(scan_points, bool) or scan_points < 2:
        raise ValueError(f"scan_points must be a Python int >= 2, got {scan_points!r}.")


def _solve(strong_logits, expert_logits, base_logits, *, solver, alpha_max, grid_step,
           num_iterations, scan_points, targets, where):
    _check_options(solver, alpha_max, grid_step, num_iterations, targets, scan_points)
    return _solve_jit(strong_logits, expert_logits, base_logits, where, solver=solver,
                      alpha_max=float(alpha_max), grid_step=float(grid_step),
                      num_iterations=num_iterations, scan_points=scan_points, targets=targets)


@functools.partial(
    jax.jit,
    static_argnames=_STATIC,
)
def _solve_jit(strong_logits, expert_logits, base_logits, where, *, solver, alpha_max,
               grid_step, num_iterations, scan_points, targets):
    pr = _problem(strong_logits, expert_logits, base_logits, where)
    n_experts = pr.a.shape[0]
    if targets == "centroid":
        a = jnp.broadcast_to(jnp.mean(pr.a, axis=0, keepdims=True), pr.a.shape)
        b = jnp.broadcast_to(jnp.mean(pr.b, axis=0, keepdims=True), pr.b.shape)
        spread = jnp.sum((pr.a - a) ** 2 + (pr.b - b) ** 2, axis=0)
        scale = float(n_experts)
    else:
        a, b, spread, scale = pr.a, pr.b, jnp.zeros(pr.a.shape[1:], pr.a.dtype), 1.0
    if solver == "grid":
        alpha, f = _solve_grid(pr, a, b, float(alpha_max), float(grid_step))
    else:
        alpha, f = _solve_exact(pr, a, b, float(alpha_max), num_iterations, scan_points)
    objective = scale * f + spread[None]  # [E, ..., 1]
    index = jnp.argmin(objective, axis=0)  # [..., 1], first on ties
    pick = lambda x: jnp.take_along_axis(x, index[None], axis=0)[0]  # noqa: E731
    return pr, index, pick(alpha), pick(objective)


def dynamic_alpha(
    strong_logits: ArrayLike,
    expert_logits: ArrayLike | Sequence[ArrayLike],
    base_logits: ArrayLike,
    *,
    solver: Solver = "exact",
    alpha_max: float = 2.0,
    grid_step: float = 0.1,
    num_iterations: int = 6,
    scan_points: int = 9,
    targets: Targets = "centroid",
    where: ArrayLike | None = None,
) -> DynamicAlphaOutput:
    r"""Dynamic Logit Fusion's per-position weight :math:`\alpha` (and which expert acts).

    Minimises :math:`f(\alpha) = (\mathrm{KL}(\tilde P\|P) - \mathrm{KL}(Q_t\|Q))^2 +
    (\mathrm{KL}(P\|\tilde P) - \mathrm{KL}(Q\|Q_t))^2` over :math:`\alpha \in [0,
    \alpha_{\max}]` at every position, with :math:`\tilde P \propto P e^{\alpha(\log Q_t -
    \log Q)}`; see the module docstring for the exact solver and the multi-expert rule.

    Args:
      strong_logits: ``[..., V]`` logits :math:`M_S` of the strong (large) model.
      expert_logits: The small tuned experts' logits: ``[..., V]`` (one expert),
        ``[E, ..., V]`` stacked, or a list of ``E`` arrays ``[..., V]``.
      base_logits: ``[..., V]`` logits :math:`M` of the small base model.
      solver: ``"exact"`` (safeguarded Newton on :math:`f'`) or ``"grid"`` (the paper's
        search over :math:`\{0, \text{step}, \dots, \alpha_{\max}\}`, first minimum on ties).
      alpha_max: Upper end of the search interval (the paper: 2); a Python number.
      grid_step: Spacing of the grid (the paper: 0.1); a Python number.
      num_iterations: Newton/bisection iterations of the exact solver after its scan (each
        two passes over ``[..., V]``); a Python int.
      scan_points: Evenly spaced points of :math:`[0, \alpha_{\max}]` at which the exact
        solver first evaluates :math:`f` and :math:`f'` to choose the basin; a Python int.
      targets: ``"centroid"`` (the paper's summed objective over all experts' targets) or
        ``"own"`` (each expert matched to its own divergences); irrelevant for one expert.
      where: Optional ``[V]`` or ``[..., V]`` boolean mask of allowed tokens (all models).

    Returns:
      A :class:`DynamicAlphaOutput` ``(alpha, objective, expert_index)``, each ``[...]``.

    Raises:
      ValueError: If shapes disagree or an option is out of range.

    Examples:
      >>> import jax
      >>> import fusionjax as fj
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> strong = jax.random.normal(k1, (4, 100))
      >>> expert, base = jax.random.normal(k2, (4, 100)), jax.random.normal(k3, (4, 100))
      >>> exact = fj.logits.dynamic_alpha(strong, expert, base)
      >>> grid = fj.logits.dynamic_alpha(strong, expert, base, solver="grid")
      >>> bool(jax.numpy.all(exact.objective <= grid.objective + 1e-6))
      True

    References:
      Fan et al., `On Giant's Shoulders: Effortless Weak to Strong by Dynamic Logits
      Fusion <https://arxiv.org/abs/2406.15480>`_, NeurIPS 2024.
    """
    _, index, alpha, objective = _solve(
        strong_logits, expert_logits, base_logits, solver=solver, alpha_max=alpha_max,
        grid_step=grid_step, num_iterations=num_iterations, scan_points=scan_points,
        targets=targets, where=where,
    )
    return DynamicAlphaOutput(alpha[..., 0], objective[..., 0], index[..., 0].astype(jnp.int32))


def dynamic_logit_fusion(
    strong_logits: ArrayLike,
    expert_logits: ArrayLike | Sequence[ArrayLike],
    base_logits: ArrayLike,
    *,
    solver: Solver = "exact",
    alpha_max: float = 2.0,
    grid_step: float = 0.1,
    num_iterations: int = 6,
    scan_points: int = 9,
    targets: Targets = "centroid",
    where: ArrayLike | None = None,
) -> DynamicFusionOutput:
    r"""Dynamic Logit Fusion: :math:`\log\mathrm{softmax}(M_S + \alpha^\star (M_t - M))` per token.

    :math:`\alpha^\star` and the acting expert :math:`t` come from :func:`dynamic_alpha`
    (same arguments); the logit difference is taken between log-probabilities
    (:math:`\log Q_t - \log Q`, equal up to a per-position constant).

    Args:
      strong_logits: ``[..., V]`` logits of the strong (large) model.
      expert_logits: ``[..., V]``, ``[E, ..., V]`` or a list of ``E`` arrays ``[..., V]``.
      base_logits: ``[..., V]`` logits of the small base model.
      solver: ``"exact"`` or ``"grid"``; see :func:`dynamic_alpha`.
      alpha_max: Upper end of the search interval; a Python number.
      grid_step: Spacing of the grid; a Python number.
      num_iterations: Iterations of the exact solver after its scan; a Python int.
      scan_points: Points of the exact solver's scan; a Python int.
      targets: ``"centroid"`` (the paper) or ``"own"``; see :func:`dynamic_alpha`.
      where: Optional ``[V]`` or ``[..., V]`` boolean mask of allowed tokens.

    Returns:
      A :class:`DynamicFusionOutput` ``(log_probs [..., V], alpha [...], expert_index [...])``.

    Raises:
      ValueError: If shapes disagree or an option is out of range.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> strong = jnp.zeros((2, 5))
      >>> out = fj.logits.dynamic_logit_fusion(strong, strong, strong)  # expert == base
      >>> out.alpha
      Array([0., 0.], dtype=float32)

    References:
      Fan et al., `On Giant's Shoulders: Effortless Weak to Strong by Dynamic Logits
      Fusion <https://arxiv.org/abs/2406.15480>`_, NeurIPS 2024.
    """
    _check_options(solver, alpha_max, grid_step, num_iterations, targets, scan_points)
    return _fusion_jit(strong_logits, expert_logits, base_logits, where, solver=solver,
                       alpha_max=float(alpha_max), grid_step=float(grid_step),
                       num_iterations=num_iterations, scan_points=scan_points, targets=targets)


@functools.partial(
    jax.jit,
    static_argnames=_STATIC,
)
def _fusion_jit(strong_logits, expert_logits, base_logits, where, **options):
    pr, index, alpha, _ = _solve_jit.__wrapped__(
        strong_logits, expert_logits, base_logits, where, **options
    )
    pick = lambda x: jnp.take_along_axis(x, index[None], axis=0)[0]  # noqa: E731
    log_p, d = pick(pr.log_p), pick(pr.d)
    log_probs = _checks.log_softmax(log_p + alpha * d)
    return DynamicFusionOutput(log_probs, alpha[..., 0], index[..., 0].astype(jnp.int32))


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    r""":math:`\sum_v p (\log p - \log q)` over the last axis, 0 where :math:`p = 0`."""
    p = jnp.exp(log_p)
    safe = jnp.where(p > 0, log_p - jnp.where(jnp.isneginf(log_q), 0.0, log_q), 0.0)
    return jnp.sum(p * safe, axis=-1)


def fusion_objective(
    strong_logits: ArrayLike,
    expert_logits: ArrayLike,
    base_logits: ArrayLike,
    alpha: ArrayLike,
) -> jax.Array:
    r"""Dynamic Logit Fusion's objective :math:`f(\alpha)` for one expert, from explicit KLs.

    :math:`f(\alpha) = (\mathrm{KL}(\tilde P\|P) - \mathrm{KL}(Q_t\|Q))^2 +
    (\mathrm{KL}(P\|\tilde P) - \mathrm{KL}(Q\|Q_t))^2` with :math:`\tilde P =
    \mathrm{softmax}(M_S + \alpha(\log Q_t - \log Q))`, each KL summed directly over the
    vocabulary (no exponential-family identities): a reference for the solvers, and a
    way to inspect the objective along a grid (``jax.vmap`` over ``alpha``). Inputs must
    be finite.

    Args:
      strong_logits: ``[..., V]`` logits of the strong model.
      expert_logits: ``[..., V]`` logits of one small tuned expert.
      base_logits: ``[..., V]`` logits of the small base.
      alpha: A scalar or ``[...]`` weight.

    Returns:
      ``[...]`` the objective.

    Examples:
      >>> import jax.numpy as jnp
      >>> import fusionjax as fj
      >>> z = jnp.array([0.0, 1.0, 2.0])
      >>> float(fj.logits.fusion_objective(z, z, z, 1.0))
      0.0
    """
    return _fusion_objective(strong_logits, expert_logits, base_logits, alpha)


@jax.jit
def _fusion_objective(strong_logits, expert_logits, base_logits, alpha):
    s = _checks.as_logits(strong_logits, "strong_logits")
    e = _checks.as_logits(expert_logits, "expert_logits")
    q = _checks.as_logits(base_logits, "base_logits")
    _checks.same_shape(e, "expert_logits", s, "strong_logits")
    _checks.same_shape(q, "base_logits", s, "strong_logits")
    ls, lt, lq = (_checks.log_softmax(x) for x in (s, e, q))
    al = _checks.per_example(alpha, s.shape[:-1], "alpha", s.dtype)
    lpt = _checks.log_softmax(ls + al * (lt - lq))
    return (_kl(lpt, ls) - _kl(lt, lq)) ** 2 + (_kl(ls, lpt) - _kl(lq, lt)) ** 2
