r"""Fused decoding with a stacked group of experts spread over devices.

:func:`generate_sharded` is :func:`fusionjax.decoding.generate` with every stacked member's
``[E]`` axis split over one axis of a device mesh: expert parameters and KV caches live on
the devices that own them (``E / D`` experts each), and each step runs, inside
``jax.shard_map``, the local experts' forwards (``jax.vmap``) and then an ``all_gather`` of
their next-token logits ``[E/D, B, V] -> [E, B, V]``. The fusion rule and the sampler then
run on every device on the same, replicated values, so every device chooses the same token
and no further communication is needed; non-stacked members (the strong model) are
replicated.

Gather or reduce? Gathering moves ``E * B * V`` floats per step whatever the rule is, and
leaves ``fuse`` unchanged (it sees ``[E, B, V]`` exactly as in the single-device loop, so
the tokens are identical). A rule that is a weighted sum over experts could instead
``psum`` a ``[B, V]`` partial sum (``D`` times less traffic), but that would tie the loop to
one family of rules; with experts' forwards costing ``O(params)`` per step, the gather of
``E * B * V`` logits is small next to them unless ``V`` is very large and the experts tiny.

Only the experts' axis is sharded: the batch and the members that are not stacked are
replicated (for a strong model too big for one device, shard its parameters with the
model's own ``jax.sharding`` annotations; the loop does not change them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from fusionjax.decoding._loop import FuseFn
from fusionjax.decoding._loop import GenerateOutput
from fusionjax.decoding._loop import Member
from fusionjax.decoding._loop import generate


class _ExpertPlacement(NamedTuple):
    """How the loop runs a stacked group: sharded over ``mesh.shape[axis_name]`` devices."""

    mesh: Mesh
    axis_name: str

    def place(self, tree):
        sharding = NamedSharding(self.mesh, PartitionSpec(self.axis_name))
        kind = dict(zip(self.mesh.axis_names, self.mesh.axis_types, strict=True))[self.axis_name]
        if kind == AxisType.Explicit:
            return jax.sharding.reshard(tree, sharding)
        return jax.lax.with_sharding_constraint(tree, sharding)

    def apply_group(self, forward, apply, params, tokens, cache, positions):
        axis = self.axis_name
        sharded, replicated = PartitionSpec(axis), PartitionSpec()

        def local(params, tokens, cache, positions):
            last, cache = forward(apply, params, tokens, cache, positions)
            return jax.lax.all_gather(last, axis, axis=0, tiled=True), cache

        run = jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(sharded, replicated, sharded, replicated),
            out_specs=(replicated, sharded),
            # A tiled all_gather leaves the same [E, B, V] on every device, which the
            # varying-axes check does not infer; the replicated out_spec is correct.
            check_vma=False,
        )
        return run(params, tokens, cache, positions)


def generate_sharded(
    members: Sequence[Member],
    fuse: FuseFn,
    *,
    mesh: Mesh,
    axis_name: str | None = None,
    **kwargs: Any,
) -> GenerateOutput:
    """:func:`fusionjax.decoding.generate` with stacked experts sharded over a mesh axis.

    Stacked members' parameters are placed with ``PartitionSpec(axis_name)`` on their
    leading ``[E]`` axis (a no-op if they already are), their caches are made sharded the
    same way, and each step's expert logits are all-gathered before ``fuse``; the result is
    the same as :func:`~fusionjax.decoding.generate`'s (see the module docstring).

    Args:
      members: As for :func:`~fusionjax.decoding.generate`; at least one with
        ``stacked=True`` whose ``E`` is a multiple of the axis size.
      fuse: As for :func:`~fusionjax.decoding.generate`.
      mesh: The device mesh, e.g. ``jax.make_mesh((4,), ("experts",))``.
      axis_name: The mesh axis experts are split over; the mesh's only axis by default.
      **kwargs: :func:`~fusionjax.decoding.generate`'s keyword arguments
        (``max_new_tokens``, ``sampling``, ``key``, ``stop_tokens``, ...).

    Returns:
      A :class:`~fusionjax.decoding.GenerateOutput`.

    Raises:
      ValueError: If ``axis_name`` is not a mesh axis, no member is stacked, or a stacked
        group's ``E`` is not a multiple of the axis size.
    """
    if axis_name is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(f"generate_sharded: mesh has axes {mesh.axis_names}; pass axis_name=.")
        axis_name = mesh.axis_names[0]
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"generate_sharded: axis_name={axis_name!r} is not one of the mesh's axes "
            f"{mesh.axis_names}."
        )
    devices = mesh.shape[axis_name]
    members = list(members)
    if not any(isinstance(m, Member) and m.stacked for m in members):
        raise ValueError("generate_sharded: no member has stacked=True; nothing to shard.")
    placed = []
    sharding = NamedSharding(mesh, PartitionSpec(axis_name))
    for i, m in enumerate(members):
        if isinstance(m, Member) and m.stacked:
            leaves = jax.tree.leaves(m.params)
            e = leaves[0].shape[0] if leaves and leaves[0].ndim else 0
            if e % devices:
                raise ValueError(
                    f"members[{i}] stacks {e} experts, not a multiple of the {devices} devices "
                    f"of mesh axis {axis_name!r}."
                )
            m = m._replace(params=jax.device_put(m.params, sharding))
        placed.append(m)
    return generate(placed, fuse, _placement=_ExpertPlacement(mesh, axis_name), **kwargs)
