"""Process groups for a `LayoutPlan`: one per role, one per generator tensor-parallel engine, and the weight-sync group.

`torch.distributed.new_group` is a collective over the whole world: every rank must call it for every group, members
or not, in the same order, or the job deadlocks. `build_role_groups` is therefore called by every rank with the same
plan, and always creates the groups in this fixed order:
  1. one group per present role that owns its ranks, in the order generator, actor, critic, reward, reference;
  2. one group per generator engine (its TP ranks), in engine order;
  3. the weight-sync group: actor rank 0 and every generator rank;
  4. with `ring_attn_size` > 1 only: the sequence-parallel groups (`ring_attn_size` consecutive ranks) of the actor,
     critic, reward and reference, in that order; a role that shares another's ranks uses that role's groups.
A role placed with `share_with` gets no group of its own: it uses the group of the role whose ranks it shares (the
same members, and one communicator fewer). Role groups may therefore overlap only by being the same group.
Each rank keeps only the groups it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from hpc_rlhf.config.schema import SEQUENCE_PARALLEL_ROLES
from hpc_rlhf.distributed.layout import ROLE_ORDER, LayoutError, LayoutPlan, RankRoles


@dataclass
class RoleGroups:
    """The process groups one rank belongs to, next to the plan that produced them."""

    plan: LayoutPlan
    rank: int
    roles: RankRoles
    role_groups: dict[str, dist.ProcessGroup] = field(default_factory=dict)
    tp_group: dist.ProcessGroup | None = None
    weight_sync_group: dist.ProcessGroup | None = None
    sequence_groups: dict[str, dist.ProcessGroup] = field(default_factory=dict)

    def group(self, role: str) -> dist.ProcessGroup:
        """This rank's group for `role`; a clear error if the rank does not hold that role."""
        if role not in self.role_groups:
            held = ", ".join(self.roles.roles) or "none"
            raise LayoutError(f"rank {self.rank} holds roles [{held}], not {role!r}; it has no {role} group")
        return self.role_groups[role]

    def sequence_group(self, role: str) -> dist.ProcessGroup | None:
        """This rank's sequence-parallel group for `role`; None without sequence parallelism."""
        return self.sequence_groups.get(role)

    @property
    def in_weight_sync(self) -> bool:
        return self.weight_sync_group is not None


def build_role_groups(plan: LayoutPlan, rank: int, *, backend: str | None = None,
                      ring_attn_size: int = 1) -> RoleGroups:
    """Create every group of `plan` (collectively, on all ranks) and return those that `rank` belongs to.

    `backend` None uses the default process group's backend (NCCL on GPU, gloo on CPU). `ring_attn_size` > 1 adds
    the sequence-parallel groups (`ds.ring_attn_size`).
    """
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before building role groups")
    if dist.get_world_size() != plan.world_size:
        raise LayoutError(f"the plan is for {plan.world_size} ranks but the initialised world has "
                          f"{dist.get_world_size()}")
    roles = plan.roles_of(rank)
    result = RoleGroups(plan=plan, rank=rank, roles=roles)
    for role in ROLE_ORDER:
        members = plan.ranks_of(role)
        if not members or role in plan.shared_with:
            continue
        group = dist.new_group(list(members), backend=backend, group_desc=f"role_{role}")
        if rank in members:
            result.role_groups[role] = group
    for role, owner in plan.shared_with.items():  # no collective here: the same group object, on its members only
        if rank in plan.ranks_of(role):
            result.role_groups[role] = result.role_groups[owner]
    for engine, members in enumerate(plan.engines):
        group = dist.new_group(list(members), backend=backend, group_desc=f"generator_engine_{engine}")
        if rank in members:
            result.tp_group = group
    if plan.ranks_of("actor") and plan.ranks_of("generator"):
        members = plan.weight_sync_ranks()
        group = dist.new_group(list(members), backend=backend, group_desc="weight_sync")
        if rank in members:
            result.weight_sync_group = group
    splitting = [role for role in SEQUENCE_PARALLEL_ROLES if plan.shared_with.get(role) not in SEQUENCE_PARALLEL_ROLES]
    for role in splitting:  # roles on ranks of their own: groups of their own
        for members in plan.sequence_parallel_groups(role, ring_attn_size):
            group = dist.new_group(list(members), backend=backend, group_desc=f"sequence_parallel_{role}")
            if rank in members:
                result.sequence_groups[role] = group
    for role, owner in plan.shared_with.items():  # on the ranks of another splitting role: the same groups
        if role in SEQUENCE_PARALLEL_ROLES and owner in result.sequence_groups:
            result.sequence_groups[role] = result.sequence_groups[owner]
    return result
