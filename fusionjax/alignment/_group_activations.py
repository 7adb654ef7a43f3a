r"""The hidden units of every group of a model, as the inputs of the layers that read them."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fusionjax._src.base import Params
from fusionjax.alignment._derive import _analyse
from fusionjax.alignment._derive import _Layout
from fusionjax.alignment._derive import _split
from fusionjax.alignment._derive_rules import Node
from fusionjax.alignment._spec import PermutationSpec
from fusionjax.alignment._spec import check_spec


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
      ValueError: if ``spec`` has no groups, or a group of ``spec`` starts with an
        axis that no derived group holds (the message names the group and the path).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> def mlp(p, x):
      ...     return jax.nn.relu(x @ p["w1"]) @ p["w2"]
      >>> params = {"w1": jnp.ones((3, 5)), "w2": jnp.ones((5, 2))}
      >>> group_activations(mlp, params, jnp.ones((4, 3)))["P_0"].shape
      (4, 5)
    """
    if spec is not None:
        check_spec(spec)
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
