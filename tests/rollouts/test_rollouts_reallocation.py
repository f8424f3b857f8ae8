"""Rollouts written by a layout of 3 generator engines, found by a run resumed with 2 (or 4): complete iterations are
kept and read whole by any number of readers; an incomplete one is set aside to be generated again when the weights
allow it, refused with the reason when they do not."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_rlhf.rollouts import RolloutReader, ShardWriter, commit_iteration, committed_shards, generator_shard_name
from hpc_rlhf.trainers.ppo.resume import RolloutRepairError, check_rollouts

OLD = [generator_shard_name(e) for e in range(3)]


def write_iteration(run_dir: Path, iteration: int, make_rows, shards: int, complete: bool) -> None:
    for e in range(shards):  # engine e holds groups 2e, 2e + 1 (2 prompts x 2 samples)
        ShardWriter(run_dir).write(iteration, OLD[e], make_rows(2, 2, first_group=2 * e, seed=e))
    if complete:
        commit_iteration(run_dir, iteration, OLD)


@pytest.mark.parametrize("engines", [2, 4])
def test_complete_iterations_of_another_engine_count_are_kept_and_read_whole(run_dir, make_rows, engines):
    for iteration in range(2):
        write_iteration(run_dir, iteration, make_rows, 3, complete=True)
    new = [generator_shard_name(e) for e in range(engines)]
    # async_queue 1, resumed at 1: iteration 1 was generated before the checkpoint and is needed as it is
    assert check_rollouts(run_dir, 1, 3, 1, new, saved_engines=3) == []
    assert committed_shards(run_dir, 1) == OLD
    reader = RolloutReader(run_dir)
    parts = [reader.read(1, rank=r, world_size=engines) for r in range(engines)]
    groups = sorted(g for part in parts for g in part.column("group_id").to_pylist())
    assert groups == sorted([g for g in range(6) for _ in range(2)]), "every row once, whatever the readers"


def test_an_incomplete_iteration_of_the_old_layout_is_set_aside(run_dir, make_rows):
    write_iteration(run_dir, 0, make_rows, 3, complete=True)
    write_iteration(run_dir, 1, make_rows, 2, complete=False)  # the job stopped while engine 2 still generated
    lines = check_rollouts(run_dir, 1, 3, 0, OLD[:2], saved_engines=3)
    assert lines == ["rollouts: iteration 1 was left incomplete by 3 generator engines (2 shard(s) committed); "
                     "moved to rollouts/damaged/iter_000001/ and generated again by this run's 2"]
    assert committed_shards(run_dir, 1) == [] and committed_shards(run_dir, 0) == OLD
    assert sorted(p.name for p in (run_dir / "rollouts" / "damaged" / "iter_000001").glob("*.arrow")) == \
        ["generator_0000.arrow", "generator_0001.arrow"]
    # the same engine count leaves it alone: its engines complete it
    write_iteration(run_dir, 2, make_rows, 2, complete=False)
    assert check_rollouts(run_dir, 1, 3, 0, OLD, saved_engines=3) == []
    assert committed_shards(run_dir, 2) == OLD[:2]


def test_an_incomplete_iteration_that_other_weights_would_regenerate_is_refused(run_dir, make_rows):
    write_iteration(run_dir, 0, make_rows, 3, complete=True)
    write_iteration(run_dir, 1, make_rows, 1, complete=False)
    # async_queue 2: iteration 1 was generated with weight version 0; a run resumed at 1 would use version 1
    with pytest.raises(RolloutRepairError, match=r"iteration 1 are incomplete and were split over 3 generator "
                                                 r"engines; this run has 2 and would generate them with weight "
                                                 r"version 1, not 0"):
        check_rollouts(run_dir, 1, 4, 2, OLD[:2], saved_engines=3)
