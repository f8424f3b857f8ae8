"""build_role_groups with 6 gloo ranks on 3 'nodes': each rank is in exactly the groups the plan says."""

from __future__ import annotations

import pytest

from tests.distributed.rank_runs import assert_ranks_succeeded


def mask(ranks) -> int:
    return sum(1 << r for r in ranks)


@pytest.mark.timeout(120)
def test_role_tp_and_weight_sync_groups(launch_ranks, tmp_path):
    # layout in workers.groups_scenario: generator 2 (tp 2) -> ranks 0-1, actor 2 -> 2-3, critic -> 4, reference -> 5
    runs = launch_ranks("groups", 6, timeout_s=100)
    assert_ranks_succeeded(runs)
    records = [run.record(tmp_path) for run in runs]
    role_of = {0: "generator", 1: "generator", 2: "actor", 3: "actor", 4: "critic", 5: "reference"}
    members = {"generator": [0, 1], "actor": [2, 3], "critic": [4], "reference": [5]}
    for rank, record in enumerate(records):
        role = role_of[rank]
        assert record["roles"] == [role]
        assert record["role_index"] == {role: members[role].index(rank)}
        # the all-reduce of 1 << rank over each group this rank holds sums exactly that group's members
        assert record["role_masks"] == {role: mask(members[role])}
        assert record["tp_mask"] == (mask([0, 1]) if role == "generator" else None)
        assert (record["engine"], record["tp_rank"]) == ((0, rank) if role == "generator" else (None, None))
        assert record["sync_mask"] == (mask([0, 1, 2]) if rank in (0, 1, 2) else None)


@pytest.mark.timeout(120)
def test_sequence_parallel_groups(launch_ranks, tmp_path):
    # layout in workers.sequence_groups_scenario: generator 0-1, actor 2-3, reward 4-5 with the reference on them
    runs = launch_ranks("sequence_groups", 6, timeout_s=100)
    assert_ranks_succeeded(runs)
    records = [run.record(tmp_path) for run in runs]
    assert [record["sequence_masks"] for record in records] == [
        {}, {}, {"actor": mask([2, 3])}, {"actor": mask([2, 3])},
        {"reward": mask([4, 5]), "reference": mask([4, 5])}, {"reward": mask([4, 5]), "reference": mask([4, 5])}]
    assert all(record["same_reward_reference"] for record in records[4:])
