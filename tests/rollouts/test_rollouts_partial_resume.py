"""A resume with partial rollouts: a generator shard whose responses were still in progress at the checkpoint (saved in
RUN_DIR/rollouts/partial/) is not a missing shard; the resumed run finishes it. Without that record the same gap is
refused, since the resumed run would generate it with other weights."""

from __future__ import annotations

import pytest

from hpc_rlhf.rollouts import ShardWriter, generator_shard_name
from hpc_rlhf.trainers.ppo.partial_rollout import CarriedIteration, Response, carried_shards, save_carried
from hpc_rlhf.trainers.ppo.resume import RolloutRepairError, check_rollouts

SHARDS = [generator_shard_name(e) for e in range(2)]


def test_a_shard_in_progress_is_not_missing(run_dir, make_rows):
    # async_queue 1, resumed at iteration 1 (checkpoint after tick 1): engine 0 finished iteration 1, engine 1 not
    ShardWriter(run_dir).write(1, SHARDS[0], make_rows(1, 2, first_group=0, seed=0))
    with pytest.raises(RolloutRepairError, match="generator_0001"):
        check_rollouts(run_dir, 1, 3, 1, SHARDS)
    in_progress = CarriedIteration(iteration=1, prompt_indices=[3], responses=[Response(prompt_ids=[1, 2])] * 2)
    save_carried(run_dir, 1, 1, [in_progress])
    save_carried(run_dir, 1, 0, [])
    carried = carried_shards(run_dir, 1, 2)
    assert carried == {1: {SHARDS[1]}}
    assert check_rollouts(run_dir, 1, 3, 1, SHARDS, carried=carried) == []
