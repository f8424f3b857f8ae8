"""plan_layout: role assignment by rank, TP engines inside nodes, roles sharing ranks, and errors that show the
arithmetic; plus role groups of a shared rank in a real 3-rank gloo job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.config.schema import LayoutConfig, RoleConfig
from hpc_rlhf.distributed.layout import ROLE_ORDER, LayoutError, plan_layout
from hpc_rlhf.distributed.world import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_layout(generator=(0, 1), actor=0, critic=0, reward=0, reference=0, colocate=False,
                shares: dict[str, str] | None = None) -> LayoutConfig:
    shares = shares or {}
    return LayoutConfig(generator=RoleConfig(gpus=generator[0], tp=generator[1], share_with=shares.get("generator")),
                        actor=RoleConfig(gpus=actor, share_with=shares.get("actor")),
                        critic=RoleConfig(gpus=critic, share_with=shares.get("critic")),
                        reward=RoleConfig(gpus=reward, share_with=shares.get("reward")),
                        reference=RoleConfig(gpus=reference, share_with=shares.get("reference")), colocate=colocate)


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


# ----------------------------------------------------------------------------------------------- sharing ranks
def seven_b_layout(**shares: str) -> LayoutConfig:
    """configs/ppo_7b_8gpu.yaml's layout: generator 4 (TP2), actor 2, critic 1, reward 1, reference 1."""
    return make_layout(generator=(4, 2), actor=2, critic=1, reward=1, reference=1, shares=shares)


def test_reference_on_the_reward_rank_of_an_8_rank_job():
    plan = plan_layout(seven_b_layout(reference="reward"), world_size=8, ranks_per_node=4)
    assert dict(plan.role_ranks) == {"generator": (0, 1, 2, 3), "actor": (4, 5), "critic": (6,), "reward": (7,),
                                     "reference": (7,)}
    assert dict(plan.shared_with) == {"reference": "reward"}
    assert plan.engines == ((0, 1), (2, 3)) and plan.weight_sync_ranks() == (0, 1, 2, 3, 4)
    shared = plan.roles_of(7)
    assert (shared.roles, dict(shared.role_index), shared.node) == (("reward", "reference"),
                                                                   {"reward": 0, "reference": 0}, 1)
    assert [plan.roles_of(r).node for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [plan.roles_of(r).roles for r in range(7)] == [("generator",)] * 4 + [("actor",)] * 2 + [("critic",)]
    # the same job on one node of 8
    one_node = plan_layout(seven_b_layout(reference="reward"), world_size=8, ranks_per_node=8)
    assert one_node.num_nodes == 1 and one_node.ranks_of("reference") == (7,)


def test_a_role_may_share_the_ranks_of_a_later_role():
    # critic comes before reward in ROLE_ORDER; it still lands on reward's ranks, and no rank is left unused
    layout = make_layout(generator=(2, 1), actor=2, critic=2, reward=2, reference=2, shares={"critic": "reward"})
    plan = plan_layout(layout, world_size=8, ranks_per_node=2)
    assert plan.ranks_of("actor") == (2, 3)
    assert plan.ranks_of("reward") == plan.ranks_of("critic") == (4, 5)
    assert plan.ranks_of("reference") == (6, 7)
    assert dict(plan.roles_of(5).role_index) == {"critic": 1, "reward": 1}
    assert plan.roles_of(5).node == 2


def test_world_size_of_the_config_counts_shared_ranks_once():
    assert seven_b_layout(reference="reward").world_size() == 8
    assert seven_b_layout().world_size() == 9
    assert make_layout(generator=(2, 1), actor=2, reference=2, shares={"reference": "actor"}).world_size() == 4


def test_total_mismatch_names_the_sharing_role():
    with pytest.raises(LayoutError) as err:
        plan_layout(seven_b_layout(reference="reward"), world_size=12, ranks_per_node=4)
    assert ("layout needs generator 4 + actor 2 + critic 1 + reward 1 = 8 ranks (reference shares the reward ranks) "
            "but the job has 3 nodes x 4 = 12") in str(err.value)


@pytest.mark.parametrize("layout, expected", [
    (make_layout(generator=(4, 2), actor=2, critic=1, reward=0, reference=1, shares={"reference": "reward"}),
     "layout.reference.share_with=reward but layout.reward.gpus=0: the role to share with is absent"),
    (seven_b_layout(reference="generator"),
     "layout.reference.share_with=generator: generator ranks run generation engines, not DeepSpeed models, so no "
     "role can share them"),
    (seven_b_layout(generator="actor"),
     "layout.generator.share_with=actor: the generator keeps ranks of its own"),
    (seven_b_layout(critic="reward", reward="reference"),
     "layout.critic.share_with=reward and layout.reward.share_with=reference: chains are not supported; point "
     "layout.critic.share_with at reference"),
    (seven_b_layout(reward="reference", reference="reward"),
     "layout.reward.share_with=reference, layout.reference.share_with=reward: a cycle; one of these roles must own "
     "its ranks"),
    (seven_b_layout(actor="critic", critic="reward", reward="actor"),
     "layout.actor.share_with=critic, layout.critic.share_with=reward, layout.reward.share_with=actor: a cycle"),
    (seven_b_layout(reference="reference"),
     "layout.reference.share_with=reference: a role cannot share ranks with itself"),
    (seven_b_layout(reference="judge"),
     "layout.reference.share_with=judge: not a role; roles are generator, actor, critic, reward, reference"),
    (make_layout(generator=(4, 2), actor=2, critic=1, reward=1, reference=2, shares={"reference": "reward"}),
     "layout.reference.share_with=reward: layout.reference.gpus=2 must equal layout.reward.gpus=1, because a sharing "
     "role runs on exactly the ranks of the role it shares (2 != 1)"),
    (make_layout(generator=(4, 2), actor=2, critic=1, reward=1, reference=0, shares={"reference": "reward"}),
     "layout.reference.share_with=reward: layout.reference.gpus=0 means the reference is absent; a sharing role takes "
     "as many ranks as the role it shares: set layout.reference.gpus=1 (= layout.reward.gpus)"),
    (make_layout(generator=(4, 1), actor=4, reward=4, reference=4, colocate=True, shares={"reference": "reward"}),
     "layout.reference.share_with=reward: sharing ranks only means something in a disaggregated layout; with "
     "layout.colocate: true every rank already holds every role"),
])
def test_impossible_sharing_is_refused_with_the_fields(layout, expected):
    world = 8 if not layout.colocate else 4
    with pytest.raises(LayoutError) as err:
        plan_layout(layout, world_size=world, ranks_per_node=world)
    assert expected in str(err.value)


def test_a_chain_into_a_cycle_reports_both_once():
    layout = seven_b_layout(actor="critic", critic="reward", reward="critic")
    with pytest.raises(LayoutError) as err:
        plan_layout(layout, world_size=8, ranks_per_node=8)
    lines = [line for line in str(err.value).splitlines() if "share_with" in line]
    assert lines == [
        "layout.actor.share_with=critic and layout.critic.share_with=reward: chains are not supported; point "
        "layout.actor.share_with at the role that owns the ranks",
        "layout.critic.share_with=reward, layout.reward.share_with=critic: a cycle; one of these roles must own its "
        "ranks (remove its share_with)"]


@st.composite
def sharing_layouts(draw):
    """A valid disaggregated layout in which one non-generator role shares the ranks of another."""
    layout, world_size, ranks_per_node = draw(valid_layouts())
    candidates = ["actor", "critic", "reward", "reference"]
    sharer = draw(st.sampled_from(candidates))
    owner = draw(st.sampled_from([name for name in candidates if name != sharer]))
    owner_gpus = getattr(layout, owner).gpus
    if owner_gpus == 0:  # give the owner a node of ranks so that it is present
        owner_gpus = getattr(layout, owner).gpus = ranks_per_node
        world_size += ranks_per_node
    world_size -= getattr(layout, sharer).gpus
    setattr(layout, sharer, RoleConfig(gpus=owner_gpus, share_with=owner))
    if world_size == 0 or world_size % ranks_per_node:  # the sharer's old ranks left a partial node: pad the owner
        padding = ranks_per_node - world_size % ranks_per_node if world_size % ranks_per_node else ranks_per_node
        getattr(layout, owner).gpus += padding
        getattr(layout, sharer).gpus += padding
        world_size += padding
    return layout, world_size, ranks_per_node, sharer, owner


@settings(max_examples=150, deadline=None)
@given(sharing_layouts())
def test_sharing_plan_invariants(case):
    layout, world_size, ranks_per_node, sharer, owner = case
    assert layout.world_size() == world_size
    plan = plan_layout(layout, world_size, ranks_per_node)
    assert plan.ranks_of(sharer) == plan.ranks_of(owner) and dict(plan.shared_with) == {sharer: owner}
    # the owning roles still partition the job into contiguous blocks in role order
    flat = [r for name in ROLE_ORDER if name != sharer for r in plan.ranks_of(name)]
    assert flat == list(range(world_size))
    for rank in range(world_size):
        roles = plan.roles_of(rank)
        assert roles.node == rank // ranks_per_node
        assert (sharer in roles.roles) == (owner in roles.roles)
        assert len(roles.roles) == (2 if owner in roles.roles else 1)
        assert list(roles.roles) == [name for name in ROLE_ORDER if name in roles.roles]
        if owner in roles.roles:
            assert roles.role_index[sharer] == roles.role_index[owner] == plan.ranks_of(owner).index(rank)



def test_the_8_gpu_ppo_config_places_reward_and_reference_on_one_gpu():
    from hpc_rlhf.config.loading import load_config
    from hpc_rlhf.slurm.job_spec import layout_summary

    cfg = load_config(str(REPO_ROOT / "configs" / "ppo_7b_8gpu.yaml"), []).config
    assert cfg.layout.world_size() == cfg.slurm.nodes * cfg.slurm.gpus_per_node == 8
    plan = plan_layout(cfg.layout, 8, cfg.slurm.gpus_per_node)
    assert plan.roles_of(7).roles == ("reward", "reference") and plan.engines == ((0, 1), (2, 3))
    assert layout_summary(cfg) == "generator 4, actor 2, critic 1, reward+reference 1"


def test_config_check_names_the_sharing_field_and_its_source():
    from hpc_rlhf.config.schema import ConfigError
    from hpc_rlhf.config.loading import load_config

    config = str(REPO_ROOT / "configs" / "ppo_7b_8gpu.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(config, ["--layout.reference.share_with=critic", "--layout.critic.share_with=reward"])
    assert ("layout.reference.share_with=critic and layout.critic.share_with=reward: chains are not supported; point "
            "layout.reference.share_with at reward (layout.reference.share_with from command line, "
            "layout.critic.share_with from command line)") in str(err.value)
    with pytest.raises(ConfigError) as err:  # without sharing, the 9 ranks do not fit the 8 GPUs
        load_config(config, ["--layout.reference.share_with="])
    assert "reward.gpus=1 + reference.gpus=1 = 9 ranks, but the job has slurm.nodes x slurm.gpus_per_node" in str(
        err.value)
    with pytest.raises(ConfigError) as err:  # sharing counts once: 8 ranks do not fit 2 nodes of 8
        load_config(config, ["--slurm.nodes=2"])
    assert ("critic.gpus=1 + reward.gpus=1 = 8 ranks (reference shares the reward ranks), but the job has "
            "slurm.nodes x slurm.gpus_per_node = 2 x 8 = 16") in str(err.value)

# A rank of the job below: build the role groups and all-reduce 1 << rank in each group the rank holds, so that the
# sum names the group's members; the same group object must serve the reward and the reference.
GROUPS_WORKER = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from hpc_rlhf.config.schema import LayoutConfig, RoleConfig
    from hpc_rlhf.distributed import build_role_groups, detect_world, init_distributed, plan_layout

    info = detect_world()
    world = init_distributed(info, timeout_s=60)
    layout = LayoutConfig(generator=RoleConfig(1), actor=RoleConfig(1), critic=RoleConfig(0), reward=RoleConfig(1),
                          reference=RoleConfig(1, share_with="reward"), colocate=False)
    groups = build_role_groups(plan_layout(layout, info.world_size, 1), info.rank)

    def members(group):
        value = torch.tensor([1 << info.rank])
        dist.all_reduce(value, group=group)
        return int(value.item())

    record = {"roles": list(groups.roles.roles), "masks": {r: members(g) for r, g in groups.role_groups.items()},
              "same_group": (groups.role_groups.get("reward") is groups.role_groups.get("reference")),
              "sync": members(groups.weight_sync_group) if groups.in_weight_sync else None}
    with open(f"{sys.argv[1]}/rank{info.rank}.json", "w") as out:
        json.dump(record, out)
    dist.barrier()  # every record is written
    # Leave without tearing the groups down: this job checks membership only (teardown has its own tests), and on a
    # loaded machine rank 0, which hosts the store, was seen aborting in the destructor of a gloo group.
    import os
    os._exit(0)
""")


@pytest.mark.timeout(120)
def test_role_groups_of_a_shared_rank_in_a_real_gloo_job(tmp_path):
    """3 ranks, one per node: generator 0, actor 1, reward + reference 2."""
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI", "TORCHELASTIC_"))}
    procs = []
    for rank in range(3):
        env = {**base, "RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), base.get("PYTHONPATH", "")]))}
        procs.append(subprocess.Popen([sys.executable, "-c", GROUPS_WORKER, str(tmp_path)], env=env, cwd=REPO_ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [proc.communicate(timeout=100)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outputs)
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(3)]
    assert [r["roles"] for r in records] == [["generator"], ["actor"], ["reward", "reference"]]
    assert records[0]["masks"] == {"generator": 0b001}
    assert records[1]["masks"] == {"actor": 0b010}
    assert records[2]["masks"] == {"reward": 0b100, "reference": 0b100} and records[2]["same_group"]
    assert [r["sync"] for r in records] == [0b011, 0b011, None]
