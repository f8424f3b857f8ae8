"""`layout.scale: proportional`: the role counts re-planned for the ranks a job got (hand-computed splits), the
refusal when a job is too small, the config checks of `slurm.min_nodes`, and the refusal before the ranks connect."""

from __future__ import annotations

import dataclasses

import pytest

from hpc_rlhf.config.loading import load_config
from hpc_rlhf.config.schema import Config, ConfigError, LayoutConfig, RoleConfig
from hpc_rlhf.distributed.layout import LayoutError, plan_layout
from hpc_rlhf.distributed.world import WorldInfo
from hpc_rlhf.errors import UsageError
from hpc_rlhf.launch import check_layout_fits


def layout(generator=(1, 1), actor=2, critic=0, reward=0, reference=0, colocate=False, share=None):
    return LayoutConfig(generator=RoleConfig(gpus=generator[0], tp=generator[1]), actor=RoleConfig(gpus=actor),
                        critic=RoleConfig(gpus=critic), reward=RoleConfig(gpus=reward),
                        reference=RoleConfig(gpus=reference, share_with=share), colocate=colocate,
                        scale="proportional")


def counts(plan) -> dict[str, int]:
    return {name: len(ranks) for name, ranks in plan.role_ranks.items()}


@pytest.mark.parametrize("ranks, expected", [
    (2, {"generator": 1, "actor": 1}),   # exact 0.67 / 1.33: one each
    (3, {"generator": 1, "actor": 2}),   # the configured split
    (4, {"generator": 1, "actor": 3}),   # 1.33 / 2.67: the larger remainder takes the last rank
    (6, {"generator": 2, "actor": 4}),
])
def test_disaggregated_counts_scale_by_largest_remainder(ranks, expected):
    plan = plan_layout(layout(), ranks, 1)
    assert counts(plan) == expected
    assert plan.scaled_from == 3 and plan.world_size == ranks


def test_generator_keeps_whole_engines_and_sharing_roles_follow_their_target():
    big = layout(generator=(4, 2), actor=4, critic=2, reward=1, reference=1, share="reward")
    plan = plan_layout(big, 22, 2)  # twice the configured 11 ranks (reference shares the reward ranks)
    assert counts(plan) == {"generator": 8, "actor": 8, "critic": 4, "reward": 2, "reference": 2}
    assert all(len(engine) == 2 for engine in plan.engines) and len(plan.engines) == 4
    assert plan.ranks_of("reference") == plan.ranks_of("reward")
    # 10 of 11 ranks: exact generator 1.82 engines, actor 3.64, critic 1.82, reward 0.91 -> floors (at least one)
    # 1 engine + 3 + 1 + 1 = 7 ranks; the 3 left go to the largest remainders: a generator engine (0.82, ahead of
    # the critic's 0.82 in role order), then the critic (0.82 > the actor's 0.64)
    assert counts(plan_layout(big, 10, 2)) == {"generator": 4, "actor": 3, "critic": 2, "reward": 1, "reference": 1}


def test_colocated_roles_span_whatever_ranks_the_job_has():
    plan = plan_layout(layout(generator=(3, 1), actor=3, colocate=True), 2, 2)
    assert counts(plan) == {"generator": 2, "actor": 2} and plan.scaled_from == 3
    assert plan.describe() == ("layout for 1 node x 2 = 2 ranks: colocated, every rank is generator, actor "
                               "(scaled from 3)")


def test_too_few_ranks_is_one_line_with_the_arithmetic():
    with pytest.raises(LayoutError) as err:
        plan_layout(layout(generator=(2, 2), actor=2, critic=1), 3, 1)
    message = str(err.value)
    assert "\n" not in message
    assert message == ("layout.scale: proportional: the job has 3 ranks, fewer than one rank (one engine of "
                       "generator.tp=2 for the generator) per role: generator 2 + actor 1 + critic 1 = 4")


def test_fixed_layouts_are_planned_as_before():
    fixed = LayoutConfig(generator=RoleConfig(gpus=1), actor=RoleConfig(gpus=2), colocate=False)
    assert counts(plan_layout(fixed, 3, 3)) == {"generator": 1, "actor": 2}
    assert plan_layout(fixed, 3, 3).scaled_from is None
    with pytest.raises(LayoutError, match="layout needs generator 1 \\+ actor 2 = 3 ranks"):
        plan_layout(fixed, 2, 2)


def test_launch_refuses_a_job_the_layout_cannot_fit_before_connecting():
    cfg = Config(layout=layout(generator=(2, 2), actor=2))
    info = WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0, master_addr="127.0.0.1",
                     master_port=1, launcher="slurm")
    with pytest.raises(UsageError, match=r"^this job has 1 rank\(s\), 1 per node: layout.scale: proportional: "
                                         r"the job has 1 ranks"):
        check_layout_fits(cfg, info)
    check_layout_fits(cfg, dataclasses.replace(info, world_size=6, local_world_size=2))  # 3 nodes of 2: it fits


def _load(tmp_path, layout_yaml: str, slurm_yaml: str):
    path = tmp_path / "c.yaml"
    path.write_text(f"layout: {layout_yaml}\nslurm: {slurm_yaml}\n")
    return load_config(path)


DISAGGREGATED = "{colocate: false, generator: {gpus: 2, tp: 2}, actor: {gpus: 2}%s}"


def test_config_checks_min_nodes_and_both_ends_of_the_range(tmp_path):
    with pytest.raises(ConfigError, match=r"slurm.min_nodes .*needs a layout that is re-planned .*"
                                          r"set layout.scale: proportional"):
        _load(tmp_path, DISAGGREGATED % "", "{gpus_per_node: 2, nodes: 2, min_nodes: 1}")
    with pytest.raises(ConfigError, match=r"layout.scale .* on 1 node\(s\) x 2 \(slurm.min_nodes..slurm.nodes\): "
                                          r"layout.scale: proportional: the job has 2 ranks"):
        _load(tmp_path, DISAGGREGATED % ", scale: proportional", "{gpus_per_node: 2, nodes: 2, min_nodes: 1}")
    # 2 nodes: generator 2 (one engine) + actor 2; 3 nodes: 1.5 engines -> 1, the ranks left go to the actor: 2 + 4
    loaded = _load(tmp_path, DISAGGREGATED % ", scale: proportional", "{gpus_per_node: 2, nodes: 3, min_nodes: 2}")
    assert (loaded.config.slurm.min_nodes, loaded.config.slurm.nodes) == (2, 3)
    # batch sizes must split over every allocation of the range: on 5 nodes, 6 actor ranks
    with pytest.raises(ConfigError, match=r"train_batch_size=8 is not a multiple of micro_train_batch_size x "
                                          r"data-parallel ranks \(actor.gpus\) = 2 x 6 = 12, as re-planned for 5 node\(s\) x 2 = 10 ranks"):
        _load(tmp_path, DISAGGREGATED % ", scale: proportional", "{gpus_per_node: 2, nodes: 6, min_nodes: 2}")
