"""SLURM environment parsing: tasks-per-node forms, node lists, and a rank's place, from hand-made environments."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpc_rlhf.slurm import (
    SlurmEnv,
    SlurmEnvError,
    expand_nodelist,
    in_slurm_job,
    parse_tasks_per_node,
)


@pytest.mark.parametrize("value, expected", [
    ("8", (8,)),
    ("2(x3)", (2, 2, 2)),
    ("2(x3),1", (2, 2, 2, 1)),
    ("4,2(x2)", (4, 2, 2)),
    ("1(x1)", (1,)),
])
def test_tasks_per_node_forms(value, expected):
    assert parse_tasks_per_node(value) == expected


@pytest.mark.parametrize("value", ["", "x", "2(x)", "2(3)", "2(x3", "2,,1", "-1", "2(x0)"])
def test_bad_tasks_per_node_names_the_variable(value):
    with pytest.raises(SlurmEnvError, match="SLURM_STEP_TASKS_PER_NODE"):
        parse_tasks_per_node(value, "SLURM_STEP_TASKS_PER_NODE")


def compress(counts: list[int]) -> str:
    """SLURM's run-length form, written independently of the parser: [2, 2, 1] -> '2(x2),1'."""
    parts: list[str] = []
    index = 0
    while index < len(counts):
        run = 1
        while index + run < len(counts) and counts[index + run] == counts[index]:
            run += 1
        parts.append(f"{counts[index]}(x{run})" if run > 1 else str(counts[index]))
        index += run
    return ",".join(parts)


@given(st.lists(st.integers(1, 9), min_size=1, max_size=12))
def test_tasks_per_node_round_trip(counts):
    assert parse_tasks_per_node(compress(counts)) == tuple(counts)


@pytest.mark.parametrize("nodelist, expected", [
    ("n1", ("n1",)),
    ("n[1-3]", ("n1", "n2", "n3")),
    ("n[08-10]", ("n08", "n09", "n10")),
    ("n[9-11]", ("n9", "n10", "n11")),
    ("login1,gpu[1,3-4]", ("login1", "gpu1", "gpu3", "gpu4")),
    ("dgx-h100-[001-002],n[5]", ("dgx-h100-001", "dgx-h100-002", "n5")),
])
def test_nodelist_expansion(nodelist, expected):
    assert expand_nodelist(nodelist) == expected


@pytest.mark.parametrize("nodelist", ["n[3-1]", "x[1-2]y", "n[1-2", "n[a]", "n[1-]", "n[1-2]]"])
def test_bad_nodelist_is_rejected_with_its_text(nodelist):
    with pytest.raises(SlurmEnvError, match="node list"):
        expand_nodelist(nodelist)


def step_env(**overrides: str) -> dict[str, str]:
    """The variables `srun` gives task 3 of `sbatch --nodes=2 --ntasks-per-node=2` (restarted once)."""
    env = {
        "SLURM_JOB_ID": "1234", "SLURM_JOB_NAME": "ppo", "SLURM_RESTART_COUNT": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_NTASKS": "4",
        "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_NODEID": "1", "SLURM_LOCALID": "1",
        "SLURM_SUBMIT_DIR": "/home/me/project",
    }
    env.update(overrides)
    return env


def test_task_in_a_step():
    env = SlurmEnv.from_environ(step_env(), expand=expand_nodelist)
    assert env.job_id == "1234" and env.job_name == "ppo" and env.restart_count == 1
    assert env.nodes == ("gpu07", "gpu08") and env.tasks_per_node == (2, 2)
    assert (env.procid, env.ntasks, env.nodeid, env.localid) == (3, 4, 1, 1)
    assert env.in_step and env.local_world_size == 2 and env.node_name == "gpu08" and env.master_node == "gpu07"
    assert env.submit_dir == "/home/me/project" and env.array_task_id is None


def test_step_values_win_over_the_job_when_a_step_uses_part_of_the_allocation():
    env = SlurmEnv.from_environ(step_env(SLURM_JOB_NODELIST="gpu[07-09]", SLURM_TASKS_PER_NODE="2(x3)",
                                         SLURM_NTASKS="6"), expand=expand_nodelist)
    assert env.nodes == ("gpu07", "gpu08") and env.ntasks == 4


def test_batch_script_sees_the_job():
    batch = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x3)",
             "SLURM_NTASKS": "6", "SLURM_PROCID": "0", "SLURM_NODEID": "0", "SLURM_LOCALID": "0",
             # step variables left over from an enclosing step are ignored outside a step
             "SLURM_STEP_NODELIST": "n1"}
    env = SlurmEnv.from_environ(batch, expand=expand_nodelist)
    assert not env.in_step and env.nodes == ("n1", "n2", "n3") and env.ntasks == 6 and env.restart_count == 0


def test_not_in_a_job():
    assert not in_slurm_job({})
    assert in_slurm_job({"SLURM_JOB_ID": "1"})
    with pytest.raises(SlurmEnvError, match="SLURM_JOB_ID is not set"):
        SlurmEnv.from_environ({}, expand=expand_nodelist)


@pytest.mark.parametrize("overrides, message", [
    ({"SLURM_PROCID": "4"}, "SLURM_PROCID=4 is outside 0..3"),
    ({"SLURM_LOCALID": "2"}, "SLURM_LOCALID=2 is outside 0..1 on node gpu08"),
    ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 is outside 0..1"),
    ({"SLURM_STEP_NUM_TASKS": "5"}, "add up to 4, not to the 5 tasks"),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x3)"}, "2 nodes"),
    ({"SLURM_RESTART_COUNT": "one"}, "SLURM_RESTART_COUNT='one' is not an integer"),
    ({"SLURM_PROCID": ""}, "SLURM_PROCID='' is not an integer"),
])
def test_inconsistent_environment_names_the_variable(overrides, message):
    with pytest.raises(SlurmEnvError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SlurmEnv.from_environ(step_env(**overrides), expand=expand_nodelist)


@given(st.lists(st.integers(1, 8), min_size=1, max_size=6), st.data())
def test_every_rank_of_a_block_layout_parses_consistently(counts, data):
    """Under block distribution rank r sits on the node whose cumulative task range holds r."""
    ntasks = sum(counts)
    rank = data.draw(st.integers(0, ntasks - 1))
    node, first = 0, 0
    while rank >= first + counts[node]:
        first += counts[node]
        node += 1
    env = SlurmEnv.from_environ(step_env(
        SLURM_STEP_NODELIST=f"n[1-{len(counts)}]" if len(counts) > 1 else "n1",
        SLURM_STEP_TASKS_PER_NODE=compress(counts), SLURM_STEP_NUM_TASKS=str(ntasks),
        SLURM_PROCID=str(rank), SLURM_NODEID=str(node), SLURM_LOCALID=str(rank - first)), expand=expand_nodelist)
    assert env.node_name == f"n{node + 1}"
    assert env.local_world_size == counts[node]
    assert env.num_nodes == len(counts) and env.ntasks == ntasks
