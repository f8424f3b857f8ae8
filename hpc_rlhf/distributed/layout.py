"""Which rank plays which role: a pure plan computed from the config's `layout`, before any process group exists.

Disaggregated mode hands ranks out in the order generator, actor, critic, reward, reference, node by node (rank r lives
on node r // ranks_per_node). Generator ranks start at rank 0 and form tensor-parallel engines of `tp` consecutive ranks;
because `tp` divides `ranks_per_node`, an engine never spans two nodes. A role with `share_with: other` takes no ranks
of its own: it is placed on exactly the ranks of `other` (same `gpus` count), so small models such as a reward model and
a reference can live on one GPU; such a rank holds both roles and runs them one after the other. Colocated mode gives
every rank every present role. A role with `gpus = 0` is absent. Every inconsistency raises one `LayoutError` that
shows the arithmetic.

With `layout.scale: proportional` the configured counts are proportions, re-planned for the ranks the job actually has
(`hpc_rlhf.config.layout_scaling`) before the plan is made.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hpc_rlhf.config.layout_scaling import ScaleError, configured_world_size, scale_role_sizes
from hpc_rlhf.config.schema import SEQUENCE_PARALLEL_ROLES, layout_share_problems

ROLE_ORDER: tuple[str, ...] = ("generator", "actor", "critic", "reward", "reference")


class LayoutError(ValueError):
    """The layout cannot be laid over the job; each line of the message names a field and shows the arithmetic."""


@dataclass(frozen=True)
class RankRoles:
    """What one rank does: its roles, its index inside each role group, and its generator engine and TP rank."""

    rank: int
    node: int
    roles: tuple[str, ...]
    role_index: Mapping[str, int]
    generator_engine: int | None = None
    tp_rank: int | None = None

    def has(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class LayoutPlan:
    """The whole job's role assignment; identical on every rank because it is a pure function of its inputs.

    `shared_with` maps each role placed with `share_with` to the role whose ranks it uses (empty when none is).
    """

    world_size: int
    ranks_per_node: int
    colocate: bool
    generator_tp: int
    role_ranks: Mapping[str, tuple[int, ...]]
    engines: tuple[tuple[int, ...], ...]
    ranks: tuple[RankRoles, ...]
    shared_with: Mapping[str, str] = field(default_factory=dict)
    scaled_from: int | None = None  # the ranks the configured counts add up to, when re-planned proportionally

    def describe(self) -> str:
        """The plan in one line, e.g. 'layout for 2 nodes x 1 = 2 ranks: generator 1, actor 1 (scaled from 3)'."""
        roles = ", ".join(f"{name} {len(ranks)}" + (f" (on the {self.shared_with[name]} ranks)"
                                                    if name in self.shared_with else "")
                          for name, ranks in self.role_ranks.items())
        kind = "colocated, every rank is " + ", ".join(self.role_ranks) if self.colocate else roles
        scaled = f" (scaled from {self.scaled_from})" if self.scaled_from not in (None, self.world_size) else ""
        return (f"layout for {self.num_nodes} node{'s' if self.num_nodes != 1 else ''} x {self.ranks_per_node} = "
                f"{self.world_size} ranks: {kind}{scaled}")

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.ranks_per_node

    def roles_of(self, rank: int) -> RankRoles:
        if not 0 <= rank < self.world_size:
            raise LayoutError(f"rank {rank} is outside the job of {self.world_size} ranks")
        return self.ranks[rank]

    def ranks_of(self, role: str) -> tuple[int, ...]:
        """Global ranks of `role`, empty when the role is absent."""
        if role not in ROLE_ORDER:
            raise LayoutError(f"unknown role {role!r}; roles are {', '.join(ROLE_ORDER)}")
        return self.role_ranks.get(role, ())

    def data_share(self, role: str, rank: int, ring_attn_size: int = 1) -> tuple[int, int]:
        """(which share, how many shares) of `role`'s samples `rank` takes. The ranks of one sequence-parallel group
        (`ring_attn_size` consecutive ranks of the actor, critic or reference) take the same share; other roles
        split no sequences, so each of their ranks takes its own."""
        members = self.ranks_of(role)
        if rank not in members:
            raise LayoutError(f"rank {rank} does not hold the {role} role (its ranks are {list(members)})")
        ring = ring_attn_size if role in SEQUENCE_PARALLEL_ROLES else 1
        if ring < 1 or len(members) % ring:
            raise LayoutError(f"ds.ring_attn_size={ring} does not divide layout.{role}.gpus={len(members)}")
        return members.index(rank) // ring, len(members) // ring

    def sequence_parallel_groups(self, role: str, ring_attn_size: int) -> tuple[tuple[int, ...], ...]:
        """`role`'s ranks cut into sequence-parallel groups of `ring_attn_size` consecutive ranks (none for roles
        that split no sequences, or when `ring_attn_size` is 1)."""
        members = self.ranks_of(role)
        if ring_attn_size == 1 or role not in SEQUENCE_PARALLEL_ROLES or not members:
            return ()
        self.data_share(role, members[0], ring_attn_size)  # raises unless ring_attn_size divides the role
        return tuple(members[i:i + ring_attn_size] for i in range(0, len(members), ring_attn_size))

    def weight_sync_ranks(self) -> tuple[int, ...]:
        """The weight-broadcast group: actor rank 0 followed by every generator rank (deduplicated when colocated)."""
        actors, generators = self.ranks_of("actor"), self.ranks_of("generator")
        if not actors or not generators:
            raise LayoutError(f"weight sync needs actor and generator ranks; layout has actor.gpus={len(actors)}, "
                              f"generator.gpus={len(generators)}")
        return tuple(sorted({actors[0], *generators}))


def _role_sizes(layout: Any) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """(gpus, tp) per role and the `share_with` targets that are set, read from a LayoutConfig-like object with one
    RoleConfig attribute per role (`tp` and `share_with` may be missing)."""
    sizes, shares = {}, {}
    for name in ROLE_ORDER:
        role = getattr(layout, name, None)
        if role is None:
            raise LayoutError(f"layout.{name}: missing (expected an object with `gpus` and `tp`)")
        sizes[name] = (int(role.gpus), int(getattr(role, "tp", 1)))
        target = getattr(role, "share_with", None)
        if target:
            shares[name] = str(target)
    return sizes, shares


def _check(sizes: dict[str, tuple[int, int]], shares: dict[str, str], colocate: bool, world_size: int,
           ranks_per_node: int) -> list[str]:
    """Every reason the layout does not fit the job, one line each."""
    if world_size < 1 or ranks_per_node < 1:
        return [(f"the job must have at least one rank and one rank per node, got world_size={world_size}, "
                 f"ranks_per_node={ranks_per_node}")]
    if world_size % ranks_per_node:
        return [(f"world_size={world_size} is not a whole number of nodes of ranks_per_node={ranks_per_node} "
                 f"({world_size} % {ranks_per_node} = {world_size % ranks_per_node})")]
    errors = []
    nodes = world_size // ranks_per_node
    job = f"{nodes} node{'s' if nodes != 1 else ''} x {ranks_per_node} = {world_size}"
    for name, (gpus, tp) in sizes.items():
        if gpus < 0:
            errors.append(f"layout.{name}.gpus: must be >= 0, got {gpus}")
        if name != "generator" and tp != 1:
            errors.append(f"layout.{name}.tp: tensor parallelism is only for the generator, got tp={tp}")
    gen_gpus, tp = sizes["generator"]
    if tp < 1:
        errors.append(f"layout.generator.tp: must be >= 1, got {tp}")
    elif gen_gpus > 0:
        if gen_gpus % tp:
            errors.append(f"layout.generator.gpus={gen_gpus} is not a multiple of generator.tp={tp} "
                          f"({gen_gpus} % {tp} = {gen_gpus % tp})")
        if ranks_per_node % tp:
            errors.append(f"layout.generator.tp={tp} does not divide the {ranks_per_node} ranks per node "
                          f"({ranks_per_node} % {tp} = {ranks_per_node % tp}), so an engine would span two nodes")
    errors += layout_share_problems({name: gpus for name, (gpus, _) in sizes.items()}, shares, colocate)
    present = {name: gpus for name, (gpus, _) in sizes.items() if gpus > 0}
    if not present:
        errors.append(f"layout: every role has gpus=0; the job has {job} ranks to give out")
    elif colocate:
        wrong = [f"{name}.gpus={gpus}" for name, gpus in present.items() if gpus != world_size]
        if wrong:
            errors.append(f"layout.colocate: every present role must span the whole job of {job} ranks, but "
                          f"{', '.join(wrong)}")
    else:
        owners = {name: gpus for name, gpus in present.items() if name not in shares}
        total = sum(owners.values())
        if total != world_size:
            terms = " + ".join(f"{name} {gpus}" for name, gpus in owners.items())
            sharers = [f"{name} shares the {target} ranks" for name, target in shares.items() if name in present]
            shared = f" ({', '.join(sharers)})" if sharers else ""
            errors.append(f"layout needs {terms} = {total} ranks{shared} but the job has {job}")
    return errors


def plan_layout(layout: Any, world_size: int, ranks_per_node: int) -> LayoutPlan:
    """Assign roles to the ranks of a `world_size`-rank job with `ranks_per_node` ranks per node.

    `layout` is a `hpc_rlhf.config.schema.LayoutConfig` (or any object with the same attributes); with
    `scale: proportional` its counts are re-planned for `world_size` first. Raises `LayoutError`.
    """
    sizes, shares = _role_sizes(layout)
    colocate = bool(getattr(layout, "colocate", False))
    scaled_from = None
    if getattr(layout, "scale", "fixed") == "proportional":
        scaled_from = configured_world_size(sizes, shares, colocate)
        try:
            sizes = scale_role_sizes(sizes, shares, colocate, world_size, ROLE_ORDER)
        except ScaleError as err:
            raise LayoutError(str(err)) from None
    errors = _check(sizes, shares, colocate, world_size, ranks_per_node)
    if errors:
        raise LayoutError("\n".join(errors))

    owned: dict[str, tuple[int, ...]] = {}
    start = 0
    for name in ROLE_ORDER:
        gpus = sizes[name][0]
        if gpus == 0 or name in shares:
            continue
        owned[name] = tuple(range(world_size)) if colocate else tuple(range(start, start + gpus))
        start += 0 if colocate else gpus
    # A sharing role may come before the role it shares in ROLE_ORDER, so it is placed once every owner is.
    role_ranks = {name: owned[shares[name]] if name in shares else owned[name]
                  for name in ROLE_ORDER if sizes[name][0] > 0}

    tp = sizes["generator"][1]
    generators = role_ranks.get("generator", ())
    engines = tuple(generators[i:i + tp] for i in range(0, len(generators), tp))

    ranks = []
    for rank in range(world_size):
        roles = tuple(name for name, members in role_ranks.items() if rank in members)
        index = {name: role_ranks[name].index(rank) for name in roles}
        engine = index["generator"] // tp if "generator" in index else None
        tp_rank = index["generator"] % tp if "generator" in index else None
        ranks.append(RankRoles(rank=rank, node=rank // ranks_per_node, roles=roles, role_index=index,
                               generator_engine=engine, tp_rank=tp_rank))
    return LayoutPlan(world_size=world_size, ranks_per_node=ranks_per_node, colocate=colocate, generator_tp=tp,
                      role_ranks=role_ranks, engines=engines, ranks=tuple(ranks), shared_with=dict(shares),
                      scaled_from=scaled_from)
