r"""The rules of :func:`~fusionjax.alignment.derive_spec`: how each primitive ties axes.

A rule receives the walker ``w`` (its union-find graph ``w.g``), the equation, the
value ids of its operands ``ins`` and results ``outs``, and, when the jaxpr is being
evaluated (:func:`~fusionjax.alignment.group_activations`), the operands' values
``vals``. It ties the axes that must carry the same units (``w.g.union``) and freezes
those whose order matters (``w.g.freeze``); a call rule walks its inner jaxpr and also
returns the results' values. A primitive without a rule freezes every axis it touches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Sequence

from jax.extend import core as jcore

_log = logging.getLogger("fusionjax.alignment._derive")

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


def _random_bits_rule(w, eqn, ins, outs, vals):
    """Random bits are i.i.d., so permuting their axes changes nothing in distribution.

    The key operands freeze; the results' axes stay free, so a dropout mask does not
    freeze the units it multiplies (the permuted model draws an equally distributed
    mask). Constants and ``iota`` still freeze: their values are not exchangeable.
    """
    for v in ins:
        w.g.freeze_all(v)


def _bitcast_rule(w, eqn, ins, outs, vals):
    """``bitcast_convert_type`` between equal widths is elementwise; otherwise it freezes."""
    if len(ins) == 1 and w.g.shapes[ins[0]] == w.g.shapes[outs[0]]:
        return _elementwise_rule(w, eqn, ins, outs, vals)
    return _freeze_rule(w, eqn, ins, outs, vals)


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
    "random_bits": _random_bits_rule,
    "bitcast_convert_type": _bitcast_rule,
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
