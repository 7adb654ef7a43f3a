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
log-partition :math:`K(\alpha) = \log \mathbb E_P[e^{\alpha d}]`; with :math:`\mu(\alpha) =
\mathbb E_{\tilde P}[d] = K'(\alpha)`:

.. math::
  A = \alpha K'(\alpha) - K(\alpha),\quad B = K(\alpha) - \alpha K'(0),\quad
  A' = \alpha \mathrm{Var}_{\tilde P}(d),\quad B' = \mu(\alpha) - \mu(0),

both zero at :math:`\alpha = 0` and increasing for :math:`\alpha \ge 0`, :math:`B` convex
(:math:`B'' = \mathrm{Var}_{\tilde P}(d)`, :math:`A'' = \mathrm{Var} + \alpha\kappa_3`).
*Bracket.* :math:`f'/2 = (A-a)A' + (B-b)B'` is negative where :math:`A < a` and
:math:`B < b` and positive where :math:`A > a` and :math:`B > b`, so with the crossings
:math:`A(\alpha_A) = a`, :math:`B(\alpha_B) = b` every minimiser lies in
:math:`[\min(\alpha_A, \alpha_B), \max(\alpha_A, \alpha_B)] \cap [0, \alpha_{\max}]`; any
evaluated point with both divergences below (above) the targets is a lower (upper) end.
*Algorithm.* (1) ``crossing_iterations`` (default 3) passes each evaluate two points, one
Newton step towards each crossing (from :math:`\sqrt{2a/\mathrm{Var}_P(d)}` and
:math:`\sqrt{2b/\mathrm{Var}_P(d)}`, since :math:`A \approx B \approx \alpha^2
\mathrm{Var}_P(d)/2` for small :math:`\alpha`; each step kept inside its crossing's
bracket, else bisection; :math:`B` convex makes Newton from the right monotone); the
:math:`A`-point needs :math:`\mathrm{Var}`, the :math:`B`-point only :math:`\mu`. Every
point narrows the bracket and records :math:`f`. (2) ``num_iterations`` (default 6)
safeguarded Newton steps on :math:`f'` (third moment for :math:`f''`) from the best point
so far, inside the tightest sign change of :math:`f'` around it. The point returned is the
best *evaluated* one, so ``objective`` is exactly :math:`f` there.
*Several basins.* The curve :math:`(A, B)(\alpha)` is monotone in both coordinates, with
slope :math:`dB/dA = \overline{\mathrm{Var}}_{[0,\alpha]} / \mathrm{Var}(\alpha)`; where
:math:`\mathrm{Var}_{\tilde P}(d)` jumps (peaked :math:`P`, large :math:`|d|`) it runs
nearly parallel to one axis, then the other, and :math:`f` (the squared distance to
:math:`(a, b)`) can have a local minimum near each crossing *inside* the bracket: no
bracketing removes that. On a 0.001 grid, the logit-scale-6 inputs of the tests (32 rows)
have one minimum in the bracket; at logit scale 8 (256 rows) 3 rows have two, at scale 10
with the expert as far from its base as two random models, 23-30 rows in 256. The solver
starts step (2) from the best crossing point, which picks the right basin on the tests'
inputs; it ends above the 0.1 grid's objective on 1 row in 256 at scale 8 (by 0.12 %) and
on 5 in 256 at scale 10 (by up to 28 %; 76 % with the expert 1.4 random models away).

**Cost.** One evaluation is two passes over ``[..., V]``: a max, then one fused pass per
moment (XLA:CPU recomputes the exponential in each: a pass with :math:`\mu` and
:math:`\mathrm{Var}` costs ~1.5x one with :math:`\mu` only). The grid evaluates
:math:`\lfloor\alpha_{\max}/\text{step}\rfloor + 1 = 21` points with the two moments
:math:`A, B` need; the exact solver ``2 crossing_iterations + num_iterations`` points
(default 12: 3 with the sums of orders 0-2, 3 with orders 0-1, 6 with orders 0-3), so
its cost is close to the grid's (``benchmarks/README.md``). All in float32; ``-inf``
logits are handled by masks, never by ``0 \cdot \infty``.

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
_STATIC = ("solver", "alpha_max", "grid_step", "num_iterations", "crossing_iterations", "targets")


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


def _moments(log_p, d, alpha, shift, order: int):
    r"""Divergence and moments of ``d`` under :math:`\tilde P(\alpha)`, in two passes.

    ``d`` is centred at :math:`\mu(0)`, so :math:`c(\alpha) = \log\sum_v P e^{\alpha d} =
    B(\alpha)` and :math:`m_1 = \mathbb E_{\tilde P}[d] = \mu(\alpha) - \mu(0) = B'(\alpha)`.
    Returns ``(c, m1)`` for ``order=1``, plus the central second moment for ``order=2`` and
    the third for ``order=3``; the moments are taken around ``shift`` (near :math:`m_1`,
    so central moments are not differences of large numbers). Rows are ``[N, V]`` and
    ``alpha``, ``shift`` ``[N, 1]``: the 2-D layout is what XLA:CPU reduces fastest.
    """
    z = log_p + alpha * d
    zmax = jnp.max(z, axis=-1, keepdims=True)
    e = jnp.exp(z - zmax)
    u = d - shift
    s0 = jnp.sum(e, axis=-1, keepdims=True)
    s1 = jnp.sum(e * u, axis=-1, keepdims=True) / s0
    c, m1 = zmax + jnp.log(s0), shift + s1
    if order == 1:
        return c, m1
    s2 = jnp.sum(e * u * u, axis=-1, keepdims=True) / s0
    var = jnp.maximum(s2 - s1 * s1, 0.0)
    if order == 2:
        return c, m1, var
    s3 = jnp.sum(e * u * u * u, axis=-1, keepdims=True) / s0
    return c, m1, var, s3 - 3.0 * s1 * s2 + 2.0 * s1 * s1 * s1


def _divergences(alpha, c, m1):
    r""":math:`(A, B)` from :math:`c` and :math:`m_1` (clipped at 0 against rounding)."""
    return jnp.maximum(alpha * m1 - c, 0.0), jnp.maximum(c, 0.0)


def _solve_grid(log_p, d, a, b, alpha_max: float, grid_step: float):
    """The paper's search: one pass with the two moments :math:`A, B` need per point."""
    n = int(round(alpha_max / grid_step)) + 1
    grid = jnp.minimum(jnp.arange(n, dtype=d.dtype) * grid_step, alpha_max)
    zero = jnp.zeros((), d.dtype)

    def body(carry, alpha):
        best_f, best_alpha = carry
        big_a, big_b = _divergences(alpha, *_moments(log_p, d, alpha, zero, 1))
        f = (big_a - a) ** 2 + (big_b - b) ** 2
        better = f < best_f
        return (jnp.where(better, f, best_f), jnp.where(better, alpha, best_alpha)), None

    init = (jnp.full(a.shape, jnp.inf, a.dtype), jnp.zeros(a.shape, a.dtype))
    (best_f, best_alpha), _ = jax.lax.scan(body, init, grid)
    return best_alpha, best_f


def _safeguarded(x, g, slope, lo, hi, hi_open):
    """A Newton step for ``g = 0`` kept inside ``(lo, hi)``, else bisection.

    ``hi_open`` marks an upper end not evaluated yet (``alpha_max`` at the start), which a
    Newton step past it may land on: that is how a crossing beyond ``alpha_max`` ends there.
    """
    step = x - g / jnp.where(slope > 0, slope, 1.0)
    ok = slope > 0
    inside = ok & (step > lo) & (step < hi)
    to_end = ok & hi_open & (step >= hi)
    return jnp.where(inside, step, jnp.where(to_end, hi, 0.5 * (lo + hi)))


def _solve_exact(pr, a, b, alpha_max: float, crossing_iterations: int, num_iterations: int):
    log_p, d = pr.log_p, pr.d
    dtype = d.dtype
    zero = jnp.zeros(a.shape, dtype)
    amax = jnp.full(a.shape, alpha_max, dtype)
    # Small-alpha cumulants: A ~ B ~ alpha^2 Var_P(d) / 2.
    inv_var = 1.0 / jnp.where(pr.var0 > 0, pr.var0, 1.0)
    def guess(t):
        return jnp.where(pr.var0 > 0, jnp.minimum(jnp.sqrt(2.0 * t * inv_var), amax), amax)

    def record(best, x, f):
        better = f < best[0]
        return jnp.where(better, f, best[0]), jnp.where(better, x, best[1])

    # 1. The two crossings A(alpha_A) = a, B(alpha_B) = b, one Newton search each (both
    #    functions increase; B is convex), evaluated side by side. Every point evaluated
    #    also narrows the bracket [lo, hi] of the global minimiser: f' < 0 where A < a and
    #    B < b, f' > 0 where A > a and B > b.
    def cross(i, state):
        xa, xb, sa, sb, sides, lo, hi, best, pts = state
        (loa, hia, opa), (lob, hib, opb) = sides
        ca, m1a, vara = _moments(log_p, d, xa, sa, 2)  # A' = alpha Var needs Var
        cb, m1b = _moments(log_p, d, xb, sb, 1)  # B' = m1 does not
        aa, ab = _divergences(xa, ca, m1a)
        ba, bb = _divergences(xb, cb, m1b)
        for x, big_a, big_b in ((xa, aa, ab), (xb, ba, bb)):
            best = record(best, x, (big_a - a) ** 2 + (big_b - b) ** 2)
            lo = jnp.where((big_a <= a) & (big_b <= b), jnp.maximum(lo, x), lo)
            hi = jnp.where((big_a >= a) & (big_b >= b), jnp.minimum(hi, x), hi)
        below_a, below_b = aa < a, bb < b
        loa, hia = jnp.where(below_a, xa, loa), jnp.where(below_a, hia, xa)
        lob, hib = jnp.where(below_b, xb, lob), jnp.where(below_b, hib, xb)
        opa, opb = opa & below_a, opb & below_b
        xa_new = _safeguarded(xa, aa - a, xa * vara, loa, hia, opa)
        xb_new = _safeguarded(xb, bb - b, m1b, lob, hib, opb)
        pts = (pts[0].at[i].set(xa), pts[1].at[i].set((aa - a) * xa * vara + (ab - b) * m1a))
        return (xa_new, xb_new, m1a, m1b, ((loa, hia, opa), (lob, hib, opb)), lo, hi, best, pts)

    xa0, xb0 = guess(a), guess(b)
    opn = jnp.ones(a.shape, bool)
    best = (a * a + b * b, zero)  # f(0)
    state = (xa0, xb0, xa0 * pr.var0, xb0 * pr.var0, ((zero, amax, opn), (zero, amax, opn)),
             zero, amax, best, (jnp.zeros((crossing_iterations, *a.shape), dtype),) * 2)
    *_, lo, hi, best, (xs, gs) = jax.lax.fori_loop(0, crossing_iterations, cross, state)

    # 2. Safeguarded Newton on f' from the best point so far, inside the tightest
    #    sign-change bracket the evaluated points give around it.
    x0 = best[1]
    lo = jnp.maximum(lo, jnp.max(jnp.where((xs <= x0[None]) & (gs < 0), xs, 0.0), axis=0))
    hi = jnp.minimum(hi, jnp.min(jnp.where((xs >= x0[None]) & (gs > 0), xs, alpha_max), axis=0))
    lo, hi = jnp.minimum(lo, x0), jnp.maximum(hi, x0)
    x = jnp.where((x0 > lo) & (x0 < hi), x0, 0.5 * (lo + hi))
    x = jnp.where(hi - lo > 0, x, lo)
    shift = x * pr.var0

    def body(_, state):
        x, shift, lo, hi, best = state
        c, m1, var, k3 = _moments(log_p, d, x, shift, 3)
        big_a, big_b = _divergences(x, c, m1)
        f = (big_a - a) ** 2 + (big_b - b) ** 2
        best = record(best, x, f)
        da, db = x * var, m1  # A', B'
        g = (big_a - a) * da + (big_b - b) * db
        dg = da * da + (big_a - a) * (var + x * k3) + db * db + (big_b - b) * var
        lo, hi = jnp.where(g < 0, x, lo), jnp.where(g < 0, hi, x)
        return _safeguarded(x, g, dg, lo, hi, jnp.zeros_like(opn)), m1, lo, hi, best

    *_, best = jax.lax.fori_loop(0, num_iterations, body, (x, shift, lo, hi, best))
    return best[1], best[0]


def _check_options(solver, alpha_max, grid_step, num_iterations, targets, crossing_iterations=3):
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
    n = crossing_iterations
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"crossing_iterations must be a positive Python int, got {n!r}.")


def _solve(strong_logits, expert_logits, base_logits, *, solver, alpha_max, grid_step,
           num_iterations, crossing_iterations, targets, where):
    _check_options(solver, alpha_max, grid_step, num_iterations, targets, crossing_iterations)
    return _solve_jit(strong_logits, expert_logits, base_logits, where, solver=solver,
                      alpha_max=float(alpha_max), grid_step=float(grid_step),
                      num_iterations=num_iterations,
                      crossing_iterations=crossing_iterations, targets=targets)


def _solve_core(strong_logits, expert_logits, base_logits, where, *, solver, alpha_max,
                grid_step, num_iterations, crossing_iterations, targets):
    pr = _problem(strong_logits, expert_logits, base_logits, where)
    n_experts = pr.a.shape[0]
    if targets == "centroid":
        a = jnp.broadcast_to(jnp.mean(pr.a, axis=0, keepdims=True), pr.a.shape)
        b = jnp.broadcast_to(jnp.mean(pr.b, axis=0, keepdims=True), pr.b.shape)
        spread = jnp.sum((pr.a - a) ** 2 + (pr.b - b) ** 2, axis=0)
        scale = float(n_experts)
    else:
        a, b, spread, scale = pr.a, pr.b, jnp.zeros(pr.a.shape[1:], pr.a.dtype), 1.0
    # The solvers see rows: [E * N, V] and [E * N, 1] (XLA:CPU reduces 2-D arrays fastest).
    rows = _Problem(*(x.reshape(-1, x.shape[-1]) for x in pr))
    a2, b2 = a.reshape(-1, 1), b.reshape(-1, 1)
    if solver == "grid":
        alpha, f = _solve_grid(rows.log_p, rows.d, a2, b2, alpha_max, grid_step)
    else:
        alpha, f = _solve_exact(rows, a2, b2, alpha_max, crossing_iterations, num_iterations)
    alpha, f = alpha.reshape(a.shape), f.reshape(a.shape)
    objective = scale * f + spread[None]  # [E, ..., 1]
    index = jnp.argmin(objective, axis=0)  # [..., 1], first on ties
    pick = lambda x: jnp.take_along_axis(x, index[None], axis=0)[0]  # noqa: E731
    return pr, index, pick(alpha), pick(objective)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _solve_jit(strong_logits, expert_logits, base_logits, where, **options):
    _, index, alpha, objective = _solve_core(
        strong_logits, expert_logits, base_logits, where, **options
    )
    return index, alpha, objective


def dynamic_alpha(
    strong_logits: ArrayLike,
    expert_logits: ArrayLike | Sequence[ArrayLike],
    base_logits: ArrayLike,
    *,
    solver: Solver = "exact",
    alpha_max: float = 2.0,
    grid_step: float = 0.1,
    num_iterations: int = 6,
    crossing_iterations: int = 3,
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
      solver: ``"exact"`` (bracket between the crossings, then safeguarded Newton on
        :math:`f'`) or ``"grid"`` (the paper's
        search over :math:`\{0, \text{step}, \dots, \alpha_{\max}\}`, first minimum on ties).
      alpha_max: Upper end of the search interval (the paper: 2); a Python number.
      grid_step: Spacing of the grid (the paper: 0.1); a Python number.
      num_iterations: Safeguarded Newton steps of the exact solver on :math:`f'` after its
        crossing searches (each two passes over ``[..., V]``, four moments); a Python int.
      crossing_iterations: Passes of the exact solver's two Newton searches for the
        crossings :math:`A = a`, :math:`B = b` that bracket the minimiser (each pass
        evaluates two points); a Python int.
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
    index, alpha, objective = _solve(
        strong_logits, expert_logits, base_logits, solver=solver, alpha_max=alpha_max,
        grid_step=grid_step, num_iterations=num_iterations, crossing_iterations=crossing_iterations,
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
    crossing_iterations: int = 3,
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
      num_iterations: Newton steps of the exact solver on :math:`f'`; a Python int.
      crossing_iterations: Passes of the exact solver's crossing searches; a Python int.
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
    _check_options(solver, alpha_max, grid_step, num_iterations, targets, crossing_iterations)
    return _fusion_jit(strong_logits, expert_logits, base_logits, where, solver=solver,
                       alpha_max=float(alpha_max), grid_step=float(grid_step),
                       num_iterations=num_iterations,
                      crossing_iterations=crossing_iterations, targets=targets)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _fusion_jit(strong_logits, expert_logits, base_logits, where, **options):
    pr, index, alpha, _ = _solve_core(
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
