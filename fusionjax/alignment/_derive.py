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
* constants and ``iota``, whose values are not permuted (random bits, being i.i.d., are
  not frozen: a dropout mask permutes in distribution);
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

Modules: :mod:`~fusionjax.alignment._derive_rules` (one rule per primitive), this one
(union-find, walker, :func:`derive_spec`), :mod:`~fusionjax.alignment._group_activations`
(the values of each group's units, from the same walk).

References:
  Ainsworth, Hayase & Srinivasa, `Git Re-Basin: Merging Models modulo Permutation
  Symmetries <https://arxiv.org/abs/2209.04836>`_, ICLR 2023 (permutation specs)

  Stoica et al., `ZipIt! Merging Models from Different Tasks without Training
  <https://arxiv.org/abs/2305.03053>`_, ICLR 2024 (merging over a graph of the
  model's features)
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import numpy as np
from jax.extend import core as jcore

from fusionjax._src import pytrees
from fusionjax._src.base import Params
from fusionjax.alignment._derive_rules import _RULES
from fusionjax.alignment._derive_rules import Node
from fusionjax.alignment._derive_rules import _freeze_rule
from fusionjax.alignment._spec import PermutationSpec
from fusionjax.alignment._spec import path_str


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

    ``params`` and ``inputs`` are the static halves of
    :func:`fusionjax._src.pytrees.jit_partition`: non-array leaves (Python flags such as
    ``train=False``, the activation functions of an equinox module) stay static.
    """

    params: tuple
    inputs: tuple
    paths: tuple[str, ...]
    returns_updates: bool = False


def _split(params: Params, args, kwargs) -> tuple[_Layout, list, list]:
    """``(layout, param arrays, input arrays)``; raises if two param leaves share a path."""
    p_flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = tuple(path_str(kp) for kp, x in p_flat if _is_array(x))
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"two leaves of params share the path {twice[0]!r}; rename a key")
    p_arrays, p_static = pytrees.jit_partition(params, _is_array)
    a_arrays, a_static = pytrees.jit_partition((args, kwargs), _is_array)
    # linen's ``apply(..., mutable=[...])`` returns ``(outputs, updated variables)``.
    updates = bool(kwargs.get("mutable", False))
    return _Layout(p_static, a_static, paths, updates), p_arrays, a_arrays


def _trace(apply_fn: Callable, layout: _Layout, p_arrays, a_arrays):
    """``make_jaxpr`` of ``apply_fn`` as a function of the array leaves only.

    Returns:
      ``(closed jaxpr, variable path or None per output)``: an output is an updated
      variable (path of the variable it replaces) when ``apply_fn`` returns
      ``(outputs, updated variables)``, as linen does with ``mutable=[...]``.
    """

    def flat_fn(p_arrays, a_arrays):
        f_args, f_kwargs = pytrees.jit_combine(a_arrays, layout.inputs)
        params = pytrees.jit_combine(p_arrays, layout.params)
        return apply_fn(params, *f_args, **f_kwargs)

    closed, shapes = jax.make_jaxpr(flat_fn, return_shape=True)(p_arrays, a_arrays)
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    updated = [None] * len(flat)
    if layout.returns_updates and isinstance(shapes, tuple) and len(shapes) == 2:
        for k, (kp, _) in enumerate(flat):
            if kp and kp[0] == jax.tree_util.SequenceKey(1):
                updated[k] = path_str(kp[1:])
    return closed, updated


def _freeze_outputs(g: _Graph, out_ids, updated, p_ids, paths) -> None:
    """Outputs freeze (the caller fixes their order), except updated variables.

    An updated variable (e.g. BatchNorm's new running mean under ``mutable``) is tied
    axis by axis to the variable it replaces: permuting the model permutes it alike,
    so train mode gives the spec of eval mode.
    """
    by_path = dict(zip(paths, p_ids, strict=True))
    for v, path in zip(out_ids, updated, strict=True):
        p = by_path.get(path)
        if p is not None and g.shapes[p] == g.shapes[v]:
            for a in range(g.ndim(v)):
                g.union((p, a), (v, a))
        else:
            g.freeze_all(v)


def _analyse(apply_fn, layout: _Layout, p_arrays, a_arrays, evaluate: bool):
    """Traces and walks the model. Returns the walker and the groups.

    Groups are ``[(root, [(path, axis), ...])]`` in forward order: the classes holding
    a parameter axis that are not frozen, have more than one unit and more than one node.
    """
    closed, updated = _trace(apply_fn, layout, p_arrays, a_arrays)
    w = _Walker()
    g = w.g
    p_ids = [g.value(np.shape(x), (True, False)) for x in p_arrays]
    a_ids = [g.value(np.shape(x), (False, True)) for x in a_arrays]
    for v in a_ids:
        g.freeze_all(v)
    vals = [*p_arrays, *a_arrays] if evaluate else None
    out_ids, _ = w.walk(closed, [*p_ids, *a_ids], vals)
    _freeze_outputs(g, out_ids, updated, p_ids, layout.paths)

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
        ``lambda m, x: m(x)`` for an equinox module. Outputs are frozen, except the
        updated variables of linen's ``apply(..., mutable=[...])``, which follow the
        variables they replace: train mode (``train=True``, ``mutable=["batch_stats"]``,
        active dropout with ``rngs=``) gives the spec of eval mode.
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
