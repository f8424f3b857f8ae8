"""plan_layout: role assignment by rank, TP engines inside nodes, and errors that show the arithmetic."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.config import LayoutConfig, RoleConfig
from hpc_rlhf.distributed.layout import ROLE_ORDER, LayoutError, plan_layout


def make_layout(generator=(0, 1), actor=0, critic=0, reward=0, reference=0, colocate=False) -> LayoutConfig:
    return LayoutConfig(generator=RoleConfig(gpus=generator[0], tp=generator[1]), actor=RoleConfig(gpus=actor),
                        critic=RoleConfig(gpus=critic), reward=RoleConfig(gpus=reward),
                        reference=RoleConfig(gpus=reference), colocate=colocate)


def test_disaggregated_ranks_follow_role_order_node_by_node():
    plan = plan_layout(make_layout(generator=(4, 2), actor=2, critic=1, reference=1), world_size=8, ranks_per_node=4)
    assert plan.ranks_of("generator") == (0, 1, 2, 3)
    assert plan.ranks_of("actor") == (4, 5)
    assert plan.ranks_of("critic") == (6,)
    assert plan.ranks_of("reward") == ()
    assert plan.ranks_of("reference") == (7,)
    assert plan.engines == ((0, 1), (2, 3))
    assert plan.num_nodes == 2
    assert plan.weight_sync_ranks() == (0, 1, 2, 3, 4)
    r3 = plan.roles_of(3)
    assert (r3.roles, r3.node, dict(r3.role_index), r3.generator_engine, r3.tp_rank) == (
        ("generator",), 0, {"generator": 3}, 1, 1)
    r5 = plan.roles_of(5)
    assert (r5.roles, r5.node, dict(r5.role_index), r5.generator_engine, r5.tp_rank) == (
        ("actor",), 1, {"actor": 1}, None, None)
    assert plan.roles_of(7).roles == ("reference",)


def test_colocated_every_rank_holds_every_present_role():
    plan = plan_layout(make_layout(generator=(4, 2), actor=4, reference=4, colocate=True), 4, 2)
    for rank in range(4):
        roles = plan.roles_of(rank)
        assert roles.roles == ("generator", "actor", "reference")
        assert dict(roles.role_index) == {"generator": rank, "actor": rank, "reference": rank}
        assert (roles.generator_engine, roles.tp_rank) == (rank // 2, rank % 2)
    assert plan.ranks_of("critic") == ()
    assert plan.weight_sync_ranks() == (0, 1, 2, 3)


def test_total_mismatch_shows_the_arithmetic():
    layout = make_layout(generator=(16, 2), actor=16, critic=8, reward=4, reference=4)
    with pytest.raises(LayoutError) as err:
        plan_layout(layout, world_size=16, ranks_per_node=8)
    assert ("layout needs generator 16 + actor 16 + critic 8 + reward 4 + reference 4 = 48 ranks "
            "but the job has 2 nodes x 8 = 16") in str(err.value)


def test_tp_must_divide_generator_ranks_and_node_size():
    with pytest.raises(LayoutError) as err:
        plan_layout(make_layout(generator=(6, 4), actor=2), world_size=8, ranks_per_node=6 + 2)
    message = str(err.value)
    assert "generator.gpus=6 is not a multiple of generator.tp=4 (6 % 4 = 2)" in message
    with pytest.raises(LayoutError, match=r"generator.tp=4 does not divide the 6 ranks per node \(6 % 4 = 2\)"):
        plan_layout(make_layout(generator=(8, 4), actor=4), world_size=12, ranks_per_node=6)


def test_colocated_roles_must_span_the_job():
    with pytest.raises(LayoutError, match=r"every present role must span the whole job of 1 node x 4 = 4 ranks, "
                                          r"but actor.gpus=2, reference.gpus=1"):
        plan_layout(make_layout(generator=(4, 1), actor=2, reference=1, colocate=True), 4, 4)


def test_other_invalid_inputs_name_the_field():
    with pytest.raises(LayoutError, match=r"layout.critic.tp: tensor parallelism is only for the generator"):
        plan_layout(LayoutConfig(generator=RoleConfig(1), actor=RoleConfig(1), critic=RoleConfig(1, tp=2),
                                 reward=RoleConfig(0), reference=RoleConfig(0), colocate=False), 3, 3)
    with pytest.raises(LayoutError, match=r"layout.actor.gpus: must be >= 0, got -1"):
        plan_layout(make_layout(generator=(2, 1), actor=-1), 1, 1)
    with pytest.raises(LayoutError, match=r"world_size=10 is not a whole number of nodes of ranks_per_node=4"):
        plan_layout(make_layout(generator=(5, 1), actor=5), 10, 4)
    with pytest.raises(LayoutError, match=r"every role has gpus=0"):
        plan_layout(make_layout(), 2, 2)
    with pytest.raises(LayoutError, match=r"weight sync needs actor and generator ranks"):
        plan_layout(make_layout(actor=2), 2, 2).weight_sync_ranks()
    with pytest.raises(LayoutError, match=r"rank 4 is outside the job of 4 ranks"):
        plan_layout(make_layout(generator=(2, 1), actor=2), 4, 2).roles_of(4)


@st.composite
def valid_layouts(draw):
    ranks_per_node = draw(st.integers(1, 8))
    tp = draw(st.sampled_from([d for d in range(1, ranks_per_node + 1) if ranks_per_node % d == 0]))
    engines = draw(st.integers(0, 4))
    others = [draw(st.integers(0, 6)) for _ in range(4)]
    used = engines * tp + sum(others)
    padding = (-used) % ranks_per_node  # give the remainder to the actor so the total is whole nodes
    others[0] += padding
    if used + padding == 0:
        others[0] = ranks_per_node
    layout = make_layout(generator=(engines * tp, tp), actor=others[0], critic=others[1], reward=others[2],
                         reference=others[3])
    return layout, sum(others) + engines * tp, ranks_per_node


@settings(max_examples=150, deadline=None)
@given(valid_layouts())
def test_disaggregated_plan_invariants(case):
    layout, world_size, ranks_per_node = case
    plan = plan_layout(layout, world_size, ranks_per_node)
    # every rank has exactly one role, and role groups partition the ranks into contiguous blocks in role order
    assert all(len(plan.roles_of(r).roles) == 1 for r in range(world_size))
    flat = [r for name in ROLE_ORDER for r in plan.ranks_of(name)]
    assert flat == list(range(world_size))
    for name in ROLE_ORDER:
        assert len(plan.ranks_of(name)) == getattr(layout, name).gpus
        for index, rank in enumerate(plan.ranks_of(name)):
            assert plan.roles_of(rank).role_index[name] == index
    # engines: tp consecutive ranks, on one node, consistent with each rank's engine index and TP rank
    for engine, members in enumerate(plan.engines):
        assert len(members) == layout.generator.tp
        assert len({r // ranks_per_node for r in members}) == 1
        for tp_rank, rank in enumerate(members):
            assert (plan.roles_of(rank).generator_engine, plan.roles_of(rank).tp_rank) == (engine, tp_rank)
