r"""Permutation specs derived automatically from a model's jaxpr.

:func:`derive_spec` traces ``apply_fn(params, *args)`` with :func:`jax.make_jaxpr` and
finds which axes must carry the same permutation, by union-find over *nodes*
``(value, axis)``. Every equation of the jaxpr says which of its operands' axes are the
same units as which of its outputs' axes, e.g. :math:`y = x W` (``dot_general``) ties
the contracting axis of :math:`x` to the first axis of :math:`W` (since
:math:`\sum_k x_{k} W_{kj} = \sum_k x_{\pi(k)} W_{\pi(k) j}`) and the free axis of
:math:`W` to the last axis of :math:`y`. A class of the union is a set of axes that can
be permuted by one permutation :math:`P` while every equation stays equivariant, so the
function is unchanged unless the class reaches something that is not equivariant:

* the axes of the example inputs and of the outputs (whose order the caller fixes);
* constants, ``iota`` and random numbers, whose values are not permuted;
* axes whose order matters: spatial axes of a convolution, sliced, padded, gathered,
  concatenated, sorted, cumulated or ``argmax``-ed axes, axes that a ``reshape``
  merges or splits;
* every axis of an operation the tracer does not know (sound: it never guesses).

Such classes are *frozen* and dropped. Each remaining class that holds a parameter axis
is one group of the :class:`~fusionjax.alignment.PermutationSpec`, restricted to the
parameter leaves. Groups come in the order of their first appearance in the forward
pass (the order OT fusion processes them).

Value identity is per *call site*: JAX caches the inner jaxpr of a function it traces
twice with the same shapes (every ``nn.relu`` of a given shape is the same ``jit``
jaxpr), so nested jaxprs (``jit``, ``custom_jvp_call``, ``custom_vjp_call``,
``closed_call``, ``checkpoint``, ``cond``, ``scan``, ``while``) are walked afresh at
each equation that calls them, with new nodes tied to the caller's operands and results.

References:
  Ainsworth, Hayase & Srinivasa, `Git Re-Basin: Merging Models modulo Permutation
  Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023 (permutation specs)

  Stoica et al., `ZipIt! Merging Models from Different Tasks without Training
  <https://arxiv.org/abs/2305.03053>`_, ICLR 2024 (merging over a graph of the
  model's features)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from fusionjax._src.base import Params
from fusionjax.alignment._spec import PermutationSpec, path_str

_log = logging.getLogger(__name__)

Node = tuple[int, int]
"""``(value id, axis)``: one axis of one value at one call site."""

_ELEMENTWISE = frozenset(
    "abs acos acosh add add_any and asin asinh atan atan2 atanh bessel_i0e bessel_i1e cbrt "
    "ceil clamp clz complex conj convert_element_type copy copy_p cos cosh digamma div eq "
    "erf erf_inv erfc exp exp2 expm1 floor ge gt igamma igammac imag integer_pow is_finite "
    "le lgamma log log1p logistic lt max min mul mulhi ne neg nextafter not or polygamma "
    "population_count pow real reduce_precision rem round rsqrt select_n shift_left "
    "shift_right_arithmetic shift_right_logical sign sin sinh sqrt square stop_gradient sub "
    "tan tanh xor zeta".split()
)
_REDUCE = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or reduce_xor".split()
)
_ARG_REDUCE = frozenset({"argmax", "argmin"})
_ALONG_AXIS = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
_WINDOW = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min"})
_CALLS = frozenset(
    "jit pjit closed_call core_call custom_jvp_call custom_vjp_call custom_vjp_call_jaxpr "
    "checkpoint remat remat2".split()
)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


class _Graph:
    """Union-find over ``(value, axis)`` nodes, with frozen classes and first-use order."""

    def __init__(self):
        self.shapes: list[tuple[int, ...]] = []
        self.deps: list[tuple[bool, bool]] = []  # (depends on params, depends on inputs)
        self.parent: dict[Node, Node] = {}
        self.frozen: set[Node] = set()  # roots of frozen classes
        self.order: dict[Node, int] = {}

    def value(self, shape, deps=(False, False)) -> int:
        """A new value id of shape ``shape``."""
        self.shapes.append(tuple(shape))
        self.deps.append(tuple(deps))
        return len(self.shapes) - 1

    def ndim(self, v: int) -> int:
        return len(self.shapes[v])

    def size(self, node: Node) -> int:
        return self.shapes[node[0]][node[1]]

    def find(self, node: Node) -> Node:
        root = node
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while node != root:  # path compression
            self.parent[node], node = root, self.parent[node]
        return root

    def union(self, a: Node, b: Node) -> None:
        """Puts ``a`` and ``b`` in one class (frozen if either was); unequal sizes freeze both."""
        if self.size(a) != self.size(b):
            self.freeze(a)
            self.freeze(b)
            return
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.frozen:
                self.frozen.add(ra)

    def freeze(self, node: Node) -> None:
        self.frozen.add(self.find(node))

    def freeze_all(self, v: int) -> None:
        for a in range(self.ndim(v)):
            self.freeze((v, a))

    def touch(self, v: int) -> None:
        """Records the first use of ``v``'s axes (for the forward order of groups)."""
        for a in range(self.ndim(v)):
            self.order.setdefault((v, a), len(self.order))


# ----------------------------------------------------------------------------- rules
# A rule ties the axes of an equation's operands ``ins`` to those of its results ``outs``
# (value ids). Call rules also evaluate (return the results) when ``vals`` is given.


def _freeze_rule(w, eqn, ins, outs, vals):
    """Unknown (or unsupported) operation: every axis of its operands and results freezes."""
    _log.debug("derive_spec: freezing every axis at %s", eqn.primitive.name)
    for v in (*ins, *outs):
        w.g.freeze_all(v)


def _map_axes(g, a: int, b: int, pairs) -> None:
    """``union((a, i), (b, j))`` for ``(i, j)`` in ``pairs``."""
    for i, j in pairs:
        g.union((a, i), (b, j))


def _elementwise_rule(w, eqn, ins, outs, vals):
    """``out[i] = f(x[i], y[i], ...)``: equal axes tie; size-1 (broadcast) axes and scalars skip."""
    g = w.g
    for out in outs:
        for v in ins:
            if g.ndim(v) == 0:
                continue
            if g.ndim(v) != g.ndim(out):
                return _freeze_rule(w, eqn, ins, outs, vals)
            for a in range(g.ndim(v)):
                if g.shapes[v][a] == g.shapes[out][a]:
                    g.union((v, a), (out, a))
                elif g.shapes[v][a] != 1:
                    g.freeze((v, a))
                    g.freeze((out, a))


def _record_contraction(w, x: int, y: int, axes, vals, k: int) -> None:
    """Remembers ``x`` as the input of a layer whose weights ``y`` depend on the params."""
    if vals is not None and w.g.deps[y][0] and w.g.deps[x][1]:
        for a in axes:
            w.recorded.setdefault((x, a), vals[k])


def _dot_general_rule(w, eqn, ins, outs, vals):
    r""":math:`\sum_k x_{\ldots k} y_{k \ldots}`: contracting pairs tie; other axes map out."""
    g, (lhs, rhs), (out,) = w.g, ins, outs
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    _map_axes(g, lhs, rhs, zip(lc, rc, strict=True))
    _map_axes(g, lhs, out, ((a, k) for k, a in enumerate(lb)))
    _map_axes(g, rhs, out, ((b, k) for k, b in enumerate(rb)))
    lfree = [a for a in range(g.ndim(lhs)) if a not in (*lc, *lb)]
    rfree = [b for b in range(g.ndim(rhs)) if b not in (*rc, *rb)]
    _map_axes(g, lhs, out, ((a, len(lb) + k) for k, a in enumerate(lfree)))
    _map_axes(g, rhs, out, ((b, len(lb) + len(lfree) + k) for k, b in enumerate(rfree)))
    _record_contraction(w, lhs, rhs, lc, vals, 0)
    _record_contraction(w, rhs, lhs, rc, vals, 1)


def _conv_rule(w, eqn, ins, outs, vals):
    """Input features tie to the kernel's, its output features to the result's; spatial freeze."""
    g, (lhs, rhs), (out,) = w.g, ins, outs
    p = eqn.params
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return _freeze_rule(w, eqn, ins, outs, vals)
    ls, rs, outs_spec = p["dimension_numbers"]
    g.union((lhs, ls[1]), (rhs, rs[1]))
    g.union((rhs, rs[0]), (out, outs_spec[1]))
    g.union((lhs, ls[0]), (out, outs_spec[0]))
    for v, spec in ((lhs, ls), (rhs, rs), (out, outs_spec)):
        for a in spec[2:]:
            g.freeze((v, a))
    _record_contraction(w, lhs, rhs, ls[1:2], vals, 0)
    _record_contraction(w, rhs, lhs, rs[1:2], vals, 1)


def _broadcast_rule(w, eqn, ins, outs, vals):
    """Operand axis ``i`` is result axis ``broadcast_dimensions[i]``, unless size 1 is broadcast."""
    if len(ins) != 1:
        return _freeze_rule(w, eqn, ins, outs, vals)
    g, (x,), (out,) = w.g, ins, outs
    for i, j in enumerate(eqn.params["broadcast_dimensions"]):
        if g.shapes[x][i] == g.shapes[out][j]:
            g.union((x, i), (out, j))


def _reshape_blocks(src: Sequence[int], dst: Sequence[int]):
    """Pairs ``(src axes, dst axes)`` of equal product, ignoring size-1 axes."""
    s = [i for i, n in enumerate(src) if n != 1]
    d = [j for j, n in enumerate(dst) if n != 1]
    i = j = 0
    while i < len(s) or j < len(d):
        bs, bd, ps, pd = [s[i]], [d[j]], src[s[i]], dst[d[j]]
        i, j = i + 1, j + 1
        while ps != pd:
            if ps < pd:
                bs.append(s[i])
                ps, i = ps * src[s[i]], i + 1
            else:
                bd.append(d[j])
                pd, j = pd * dst[d[j]], j + 1
        yield bs, bd


def _reshape_rule(w, eqn, ins, outs, vals):
    """Axes that survive unchanged map; merged or split axes freeze."""
    g, (out,) = w.g, outs
    if len(ins) != 1 or eqn.params.get("dimensions") is not None or 0 in g.shapes[ins[0]]:
        return _freeze_rule(w, eqn, ins, outs, vals)
    (x,) = ins
    for bs, bd in _reshape_blocks(g.shapes[x], g.shapes[out]):
        if len(bs) == len(bd) == 1:
            g.union((x, bs[0]), (out, bd[0]))
        else:
            for a in bs:
                g.freeze((x, a))
            for a in bd:
                g.freeze((out, a))


def _transpose_rule(w, eqn, ins, outs, vals):
    """Result axis ``i`` is operand axis ``permutation[i]``."""
    _map_axes(w.g, ins[0], outs[0], ((a, i) for i, a in enumerate(eqn.params["permutation"])))


def _keep_axes(w, x: int, out: int, dropped, freeze: bool) -> None:
    """Maps the axes of ``x`` not in ``dropped`` to ``out`` in order; may freeze the dropped."""
    kept = [a for a in range(w.g.ndim(x)) if a not in dropped]
    _map_axes(w.g, x, out, ((a, k) for k, a in enumerate(kept)))
    if freeze:
        for a in dropped:
            w.g.freeze((x, a))


def _reduce_rule(w, eqn, ins, outs, vals):
    """Sum/max/... over ``axes``: invariant to their order (they stay free); the rest map."""
    _keep_axes(w, ins[0], outs[0], eqn.params["axes"], freeze=False)


def _arg_reduce_rule(w, eqn, ins, outs, vals):
    """``argmax``/``argmin`` return positions: the reduced axes freeze, the rest map."""
    _keep_axes(w, ins[0], outs[0], eqn.params["axes"], freeze=True)


def _squeeze_rule(w, eqn, ins, outs, vals):
    """Removes size-1 ``dimensions``; the rest map."""
    _keep_axes(w, ins[0], outs[0], [d % w.g.ndim(ins[0]) for d in eqn.params["dimensions"]], False)


def _along_axis(w, vs: Sequence[int], axis: int) -> None:
    """Values of one shape: ``axis`` freezes on each, the other axes tie across all."""
    g = w.g
    for v in vs:
        g.freeze((v, axis % g.ndim(v)))
        if g.ndim(v) != g.ndim(vs[0]):
            g.freeze_all(v)
            continue
        for a in range(g.ndim(v)):
            if a != axis % g.ndim(v):
                g.union((vs[0], a), (v, a))


def _cumulative_rule(w, eqn, ins, outs, vals):
    """``cumsum`` etc. depend on the order along ``axis``."""
    _along_axis(w, [*ins, *outs], eqn.params["axis"])


def _sort_rule(w, eqn, ins, outs, vals):
    """``sort`` (and ``argsort``): the sorted dimension freezes, the others tie across operands."""
    _along_axis(w, [*ins, *outs], eqn.params["dimension"])


def _concatenate_rule(w, eqn, ins, outs, vals):
    """The joined dimension freezes, the others tie across operands and result."""
    _along_axis(w, [*ins, *outs], eqn.params["dimension"])


def _split_rule(w, eqn, ins, outs, vals):
    """The split axis freezes, the others tie across operand and results."""
    _along_axis(w, [*ins, *outs], eqn.params["axis"])


def _rev_rule(w, eqn, ins, outs, vals):
    """Reversed ``dimensions`` freeze; the rest map."""
    g, (x,), (out,) = w.g, ins, outs
    for a in range(g.ndim(x)):
        if a in eqn.params["dimensions"]:
            g.freeze((x, a))
            g.freeze((out, a))
        else:
            g.union((x, a), (out, a))


def _where_whole(w, x: int, out: int, whole: Sequence[bool]) -> None:
    """Axis ``a`` maps ``x -> out`` where ``whole[a]`` (untouched), else freezes on both."""
    for a, keep in enumerate(whole):
        if keep:
            w.g.union((x, a), (out, a))
        else:
            w.g.freeze((x, a))
            w.g.freeze((out, a))


def _slice_rule(w, eqn, ins, outs, vals):
    """Axes sliced whole (start 0, full limit, stride 1) map; the others freeze."""
    p, shape = eqn.params, w.g.shapes[ins[0]]
    strides = p["strides"] or (1,) * len(shape)
    whole = [
        s == 0 and e == n and st == 1
        for s, e, st, n in zip(p["start_indices"], p["limit_indices"], strides, shape, strict=True)
    ]
    _where_whole(w, ins[0], outs[0], whole)


def _pad_rule(w, eqn, ins, outs, vals):
    """Unpadded axes map; padded ones freeze."""
    whole = [tuple(c) == (0, 0, 0) for c in eqn.params["padding_config"]]
    _where_whole(w, ins[0], outs[0], whole)


def _dynamic_slice_rule(w, eqn, ins, outs, vals):
    """Axes taken whole map (a full-size start clamps to 0); the others freeze."""
    shape = w.g.shapes[ins[0]]
    whole = [s == n for s, n in zip(eqn.params["slice_sizes"], shape, strict=True)]
    _where_whole(w, ins[0], outs[0], whole)


def _dynamic_update_slice_rule(w, eqn, ins, outs, vals):
    """Axes the update covers whole map across operand, update and result; the others freeze."""
    g, (x, upd), (out,) = w.g, ins[:2], outs
    whole = [u == n for u, n in zip(g.shapes[upd], g.shapes[x], strict=True)]
    _where_whole(w, x, out, whole)
    _where_whole(w, upd, out, whole)


def _window_rule(w, eqn, ins, outs, vals):
    """Pooling: axes with a trivial window (size 1, stride 1, no padding or dilation) map."""
    p = eqn.params
    whole = [
        (d, s, tuple(pad), bd, wd) == (1, 1, (0, 0), 1, 1)
        for d, s, pad, bd, wd in zip(
            p["window_dimensions"],
            p["window_strides"],
            p["padding"],
            p["base_dilation"],
            p["window_dilation"],
            strict=True,
        )
    ]
    _where_whole(w, ins[0], outs[0], whole)


def _gather_rule(w, eqn, ins, outs, vals):
    """Operand axes neither indexed nor sliced map to their offset axis; all else freezes."""
    g, (x, idx), (out,) = w.g, ins, outs
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    passthrough = [
        a
        for a in range(g.ndim(x))
        if a not in dn.collapsed_slice_dims and a not in dn.operand_batching_dims
    ]
    tied_x, tied_out = set(), set()
    for a, o in zip(passthrough, dn.offset_dims, strict=True):
        if a not in dn.start_index_map and sizes[a] == g.shapes[x][a]:
            g.union((x, a), (out, o))
            tied_x.add(a)
            tied_out.add(o)
    for v, tied in ((x, tied_x), (out, tied_out)):
        for a in range(g.ndim(v)):
            if a not in tied:
                g.freeze((v, a))
    g.freeze_all(idx)


def _barrier_rule(w, eqn, ins, outs, vals):
    """``optimization_barrier`` is the identity on each operand."""
    for x, out in zip(ins, outs, strict=True):
        _map_axes(w.g, x, out, ((a, a) for a in range(w.g.ndim(x))))


def _sub_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, (jcore.Jaxpr, jcore.ClosedJaxpr)):
            return sub
    return None


def _tie_values(g, a: int, b: int, offset: int = 0) -> None:
    """Axis ``i`` of ``a`` is axis ``i + offset`` of ``b``; ``b``'s first ``offset`` axes freeze."""
    for i in range(g.ndim(a)):
        g.union((a, i), (b, i + offset))
    for i in range(offset):
        g.freeze((b, i))


def _call_rule(w, eqn, ins, outs, vals):
    """``jit``, ``custom_jvp_call``, ...: walks the inner jaxpr with fresh nodes for this call."""
    sub = _sub_jaxpr(eqn)
    inner = sub.jaxpr if isinstance(sub, jcore.ClosedJaxpr) else sub
    if inner is None or len(inner.invars) != len(ins) or len(inner.outvars) != len(outs):
        return _freeze_rule(w, eqn, ins, outs, vals)
    inner_outs, out_vals = w.walk(sub, ins, vals)
    for o, io in zip(outs, inner_outs, strict=True):
        _tie_values(w.g, o, io)
    return out_vals


def _cond_rule(w, eqn, ins, outs, vals):
    """Every branch is walked on the same operands; all their constraints hold together."""
    for branch in eqn.params["branches"]:
        inner_outs, _ = w.walk(branch, ins[1:], None)
        for o, io in zip(outs, inner_outs, strict=True):
            _tie_values(w.g, o, io)


def _scan_rule(w, eqn, ins, outs, vals):
    """The body once, its carry tied to itself (a fixed point); the scanned axis freezes."""
    g, p = w.g, eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    body_in = [*ins[: nc + nk], *(g.value(g.shapes[x][1:], g.deps[x]) for x in ins[nc + nk :])]
    for x, b in zip(ins[nc + nk :], body_in[nc + nk :], strict=True):
        _tie_values(g, b, x, offset=1)
    body_out, _ = w.walk(p["jaxpr"], body_in, None)
    for k in range(nk):
        _tie_values(g, body_out[k], ins[nc + k])
        _tie_values(g, body_out[k], outs[k])
    for ys, b in zip(outs[nk:], body_out[nk:], strict=True):
        _tie_values(g, b, ys, offset=1)


def _while_rule(w, eqn, ins, outs, vals):
    """Condition and body walked on the carry, the body's result tied back to it."""
    p = eqn.params
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    carry = ins[cn + bn :]
    w.walk(p["cond_jaxpr"], [*ins[:cn], *carry], None)
    body_out, _ = w.walk(p["body_jaxpr"], [*ins[cn : cn + bn], *carry], None)
    for b, c, o in zip(body_out, carry, outs, strict=True):
        _tie_values(w.g, b, c)
        _tie_values(w.g, b, o)


_RULES: dict[str, Callable] = {
    "dot_general": _dot_general_rule,
    "conv_general_dilated": _conv_rule,
    "broadcast_in_dim": _broadcast_rule,
    "reshape": _reshape_rule,
    "transpose": _transpose_rule,
    "squeeze": _squeeze_rule,
    "rev": _rev_rule,
    "sort": _sort_rule,
    "concatenate": _concatenate_rule,
    "split": _split_rule,
    "slice": _slice_rule,
    "pad": _pad_rule,
    "dynamic_slice": _dynamic_slice_rule,
    "dynamic_update_slice": _dynamic_update_slice_rule,
    "gather": _gather_rule,
    "optimization_barrier": _barrier_rule,
    "cond": _cond_rule,
    "scan": _scan_rule,
    "while": _while_rule,
    **dict.fromkeys(_ELEMENTWISE, _elementwise_rule),
    **dict.fromkeys(_REDUCE, _reduce_rule),
    **dict.fromkeys(_ARG_REDUCE, _arg_reduce_rule),
    **dict.fromkeys(_ALONG_AXIS, _cumulative_rule),
    **dict.fromkeys(_WINDOW, _window_rule),
    **dict.fromkeys(_CALLS, _call_rule),
}


# ---------------------------------------------------------------------------- walker


def _bind(eqn, vals):
    """Evaluates one equation on concrete (or traced) operands, as ``jax.core.eval_jaxpr`` does."""
    out = eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


class _Walker:
    """Walks a jaxpr, applying the rules; optionally evaluates it and records layer inputs."""

    def __init__(self):
        self.g = _Graph()
        self.recorded: dict[Node, Any] = {}

    def walk(self, jaxpr, ins: Sequence[int], vals: Sequence[Any] | None):
        """Walks ``jaxpr`` (closed or open) with its inputs bound to values ``ins``.

        Returns:
          ``(result value ids, result values or None)``. Each call makes fresh nodes,
          so two calls of one cached jaxpr never share them.
        """
        g = self.g
        consts = jaxpr.consts if isinstance(jaxpr, jcore.ClosedJaxpr) else ()
        jaxpr = jaxpr.jaxpr if isinstance(jaxpr, jcore.ClosedJaxpr) else jaxpr
        env: dict[Any, tuple[int, Any]] = {}
        for var, c in zip(jaxpr.constvars, consts, strict=True):
            env[var] = (self.constant(var.aval), c)
        for k, (var, v) in enumerate(zip(jaxpr.invars, ins, strict=True)):
            env[var] = (v, None if vals is None else vals[k])

        def read(var):
            if isinstance(var, jcore.Literal):
                return self.constant(var.aval), var.val
            return env[var]

        for eqn in jaxpr.eqns:
            in_ids, in_vals = zip(*map(read, eqn.invars), strict=True) if eqn.invars else ((), ())
            deps = tuple(any(g.deps[v][k] for v in in_ids) for k in (0, 1))
            out_ids = [g.value(getattr(o.aval, "shape", ()), deps) for o in eqn.outvars]
            for v in (*in_ids, *out_ids):
                g.touch(v)
            ev = None if vals is None else list(in_vals)
            rule = _RULES.get(eqn.primitive.name, _freeze_rule)
            out_vals = rule(self, eqn, list(in_ids), out_ids, ev)
            if ev is not None and out_vals is None:
                out_vals = _bind(eqn, ev)
            for k, (o, i) in enumerate(zip(eqn.outvars, out_ids, strict=True)):
                env[o] = (i, None if out_vals is None else out_vals[k])
        outs = [read(v) for v in jaxpr.outvars]
        return [i for i, _ in outs], (None if vals is None else [x for _, x in outs])

    def constant(self, aval) -> int:
        """A frozen value (a literal or a closed-over constant)."""
        v = self.g.value(getattr(aval, "shape", ()))
        self.g.freeze_all(v)
        return v


# ------------------------------------------------------------------------ public API


class _Layout(NamedTuple):
    """Where the array leaves of ``params`` and of the inputs go; hashable (static under jit).

    Non-array leaves (Python flags such as ``train=False``, the activation functions of
    an equinox module) are kept here as ``(index, leaf)`` pairs and stay static.
    """

    params_def: Any
    params_static: tuple
    inputs_def: Any
    inputs_static: tuple
    paths: tuple[str, ...]


def _split(params: Params, args, kwargs) -> tuple[_Layout, list, list]:
    """``(layout, param arrays, input arrays)``; raises if two param leaves share a path."""
    p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
    a_flat, a_def = jax.tree_util.tree_flatten((args, kwargs))
    p_leaves = [x for _, x in p_flat]
    paths = tuple(path_str(kp) for kp, x in p_flat if _is_array(x))
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"two leaves of params share the path {twice[0]!r}; rename a key")
    static = lambda xs: tuple((i, x) for i, x in enumerate(xs) if not _is_array(x))  # noqa: E731
    arrays = lambda xs: [x for x in xs if _is_array(x)]  # noqa: E731
    layout = _Layout(p_def, static(p_leaves), a_def, static(a_flat), paths)
    return layout, arrays(p_leaves), arrays(a_flat)


def _fill(treedef, static: tuple, arrays: Sequence[Any]):
    """The tree with its static leaves back in place between ``arrays``."""
    leaves, it, fixed = [], iter(arrays), dict(static)
    for i in range(treedef.num_leaves):
        leaves.append(fixed[i] if i in fixed else next(it))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _trace(apply_fn: Callable, layout: _Layout, p_arrays, a_arrays) -> jcore.ClosedJaxpr:
    """``make_jaxpr`` of ``apply_fn`` as a function of the array leaves only."""

    def flat_fn(p_arrays, a_arrays):
        f_args, f_kwargs = _fill(layout.inputs_def, layout.inputs_static, a_arrays)
        params = _fill(layout.params_def, layout.params_static, p_arrays)
        return apply_fn(params, *f_args, **f_kwargs)

    return jax.make_jaxpr(flat_fn)(p_arrays, a_arrays)


def _analyse(apply_fn, layout: _Layout, p_arrays, a_arrays, evaluate: bool):
    """Traces and walks the model. Returns the walker and the groups.

    Groups are ``[(root, [(path, axis), ...])]`` in forward order: the classes holding
    a parameter axis that are not frozen, have more than one unit and more than one node.
    """
    closed = _trace(apply_fn, layout, p_arrays, a_arrays)
    w = _Walker()
    g = w.g
    p_ids = [g.value(np.shape(x), (True, False)) for x in p_arrays]
    a_ids = [g.value(np.shape(x), (False, True)) for x in a_arrays]
    for v in a_ids:
        g.freeze_all(v)
    vals = [*p_arrays, *a_arrays] if evaluate else None
    out_ids, _ = w.walk(closed, [*p_ids, *a_ids], vals)
    for v in out_ids:
        g.freeze_all(v)

    first: dict[Node, int] = {}
    count: dict[Node, int] = {}
    for v, shape in enumerate(g.shapes):
        for a in range(len(shape)):
            r = g.find((v, a))
            count[r] = count.get(r, 0) + 1
            if (v, a) in g.order:
                first[r] = min(first.get(r, g.order[(v, a)]), g.order[(v, a)])
    members: dict[Node, list] = {}
    for v, path in zip(p_ids, layout.paths, strict=True):
        for a in range(g.ndim(v)):
            r = g.find((v, a))
            if r not in g.frozen and count[r] > 1 and g.size(r) > 1:
                members.setdefault(r, []).append((g.order.get((v, a), len(g.order)), path, a))
    groups = sorted(members.items(), key=lambda kv: first.get(kv[0], len(g.order)))
    return w, [(r, [(p, a) for _, p, a in sorted(m)]) for r, m in groups]


def derive_spec(apply_fn: Callable, params: Params, *args, **kwargs) -> PermutationSpec:
    r"""The permutation symmetries of ``apply_fn(params, *args, **kwargs)``, read from its jaxpr.

    Two axes land in one group when the forward pass forces them to carry the same
    units: a ``dot_general`` contracting :math:`x_{\ldots k}` with :math:`W_{k\ldots}`
    ties :math:`x`'s axis to :math:`W`'s, elementwise ops and broadcasts tie equal
    axes, reductions leave the reduced axis free (a sum is permutation invariant),
    reshapes and transposes move axes, and nested jaxprs (``jit``, ``custom_jvp_call``,
    ``custom_vjp_call``, ``checkpoint``, ``cond``, ``scan``, ``while``) are followed per
    call site. Permuting every group by any :math:`P_g` (with
    :func:`~fusionjax.alignment.apply_permutations`) leaves the outputs unchanged.

    Axes of the inputs and outputs are *frozen*, and so is every axis that reaches an
    order-dependent operation (conv spatial axes, slices, pads, gathers, concatenation,
    sort, ``cumsum``, ``argmax``, merging or splitting reshapes, grouped convolutions),
    a constant, or an operation the tracer does not know. Groups that touch a frozen
    axis are dropped, so the spec may be smaller than the true symmetry group, never
    wrong.

    Args:
      apply_fn: A pure function ``apply_fn(params, *args, **kwargs)``: a linen
        ``model.apply``, ``lambda state, x: nnx.merge(graphdef, state)(x)``, or
        ``lambda m, x: m(x)`` for an equinox module. It must not return updated state
        (e.g. call linen with ``train=False`` and no ``mutable``): outputs are frozen.
      params: The model's parameters (a linen variables dict, an ``nnx.State``, an
        equinox module, ...). Leaves may be ``jax.ShapeDtypeStruct``; non-array leaves
        are held static.
      *args: Example inputs; only shapes and dtypes matter. Non-array leaves are static.
      **kwargs: More inputs or static flags, e.g. ``train=False``.

    Returns:
      A :class:`~fusionjax.alignment.PermutationSpec` over the leaf paths of
      ``params`` with groups ``"P_0", "P_1", ...`` in order of first appearance in the
      forward pass; within a group, axes are in order of first use.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> def mlp(p, x):
      ...     return jax.nn.relu(x @ p["w1"] + p["b1"][None]) @ p["w2"]
      >>> params = {"w1": jnp.zeros((3, 5)), "b1": jnp.zeros(5), "w2": jnp.zeros((5, 2))}
      >>> derive_spec(mlp, params, jnp.zeros((4, 3)))
      PermutationSpec(1 groups)
        P_0: w1[1], b1[0], w2[0]

    References:
      Ainsworth et al, `Git Re-Basin <https://arxiv.org/abs/2209.04836>`_, ICLR 2023
    """
    layout, p_arrays, a_arrays = _split(params, args, kwargs)
    _, groups = _analyse(apply_fn, layout, p_arrays, a_arrays, evaluate=False)
    return PermutationSpec({f"P_{k}": axes for k, (_, axes) in enumerate(groups)})


def _match_groups(spec: PermutationSpec, groups, paths, p_arrays) -> dict[str, Node]:
    """``{spec group: derived root}``: the derived group holding the spec group's first axis."""
    ndim = dict(zip(paths, (np.ndim(x) for x in p_arrays), strict=True))
    owner = {(p, a): r for r, axes in groups for p, a in axes}
    out = {}
    for name, axes in spec.groups.items():
        path, axis = axes[0]
        if path not in ndim:
            raise ValueError(f"spec group {name!r} names {path!r}, not an array leaf of params")
        key = (path, axis % max(ndim[path], 1))
        if key not in owner:
            raise ValueError(
                f"spec group {name!r}: {path!r} axis {axis} is in no group derived from the "
                "model (it is frozen or never used); its activations cannot be found"
            )
        out[name] = owner[key]
    return out


def group_activations(
    apply_fn: Callable,
    params: Params,
    *args,
    spec: PermutationSpec | None = None,
    **kwargs,
) -> dict[str, jax.Array]:
    r"""The hidden units of every group, as inputs of the layers that read them.

    Evaluates the model's jaxpr and keeps, for each derived group, the intermediate
    values that carry the group's axis as the *contracting* operand of a
    ``dot_general``/``conv_general_dilated`` whose other operand depends on the
    parameters: the inputs :math:`h` of the next layer :math:`hW` (post-ReLU units of an
    MLP, the LayerNorm outputs that feed attention and the MLP for a transformer's
    residual stream, queries and keys for the per-head query-key dimension). Each value
    is moved to put the group's axis last and flattened to ``[M_i, n]``; several values
    are concatenated along ``M``. Activation matching correlates these columns between
    two models (Git Re-Basin, Sec. 3.1); REPAIR renormalises them.

    Rows index the same input positions (batch, tokens, pixels) in every model: axes of
    a value that belong to *another* group (e.g. the per-head dimension when collecting
    the heads of an attention output ``[B, T, heads, d_head]``) are averaged out, since
    their order differs between models. So permuting the model by :math:`P_g` permutes
    the columns of ``acts[g]`` by :math:`P_g` and nothing else:
    ``acts'[g] == acts[g][:, perm[g]]``.

    Args:
      apply_fn: As for :func:`derive_spec`.
      params: The model's parameters.
      *args: Inputs (here the values matter), e.g. a batch ``[B, ...]``.
      spec: Optional spec whose group names to use (e.g. a hand spec): each of its
        groups takes the activations of the derived group that holds its first
        ``(path, axis)``. Default: the groups of :func:`derive_spec`.
      **kwargs: More inputs or static flags, as for :func:`derive_spec`.

    Returns:
      ``{group: array [M, n]}``. A group whose units never feed a parametrised
      contraction is left out.

    Raises:
      ValueError: if a group of ``spec`` starts with an axis that no derived group
        holds (the message names the group and the path).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> def mlp(p, x):
      ...     return jax.nn.relu(x @ p["w1"]) @ p["w2"]
      >>> params = {"w1": jnp.ones((3, 5)), "w2": jnp.ones((5, 2))}
      >>> group_activations(mlp, params, jnp.ones((4, 3)))["P_0"].shape
      (4, 5)
    """
    layout, p_arrays, a_arrays = _split(params, args, kwargs)
    try:
        hash((apply_fn, layout, spec))
    except TypeError:  # an unhashable static leaf: compile for this call only
        run = jax.jit(functools.partial(_activations, apply_fn, layout, spec))
        return run(p_arrays, a_arrays)
    return _cached_activations(apply_fn, layout, spec, p_arrays, a_arrays)


def _activations(apply_fn, layout: _Layout, spec, p_arrays, a_arrays) -> dict[str, jax.Array]:
    """The body of :func:`group_activations`, to run under ``jax.jit``."""
    w, groups = _analyse(apply_fn, layout, p_arrays, a_arrays, evaluate=True)
    if spec is None:
        names = {f"P_{k}": r for k, (r, _) in enumerate(groups)}
    else:
        names = _match_groups(spec, groups, layout.paths, p_arrays)
    grouped = {r for r, _ in groups}
    by_root: dict[Node, list] = {}
    for (v, a), x in w.recorded.items():
        rest = [b for b in range(w.g.ndim(v)) if b != a]
        other = tuple(i for i, b in enumerate(rest) if w.g.find((v, b)) in grouped)
        x = jnp.mean(jnp.moveaxis(x, a, -1), axis=other) if other else jnp.moveaxis(x, a, -1)
        by_root.setdefault(w.g.find((v, a)), []).append(x.reshape(-1, w.g.shapes[v][a]))
    return {k: jnp.concatenate(by_root[r]) for k, r in names.items() if r in by_root}


# Compiled once per (apply_fn, layout, spec, shapes): activation matching calls it per batch.
_cached_activations = jax.jit(_activations, static_argnums=(0, 1, 2))
