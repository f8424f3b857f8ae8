"""Waiting for rollout data (hpc_rlhf/rollouts/waiting.py): a rank waits for the generator shards, for a complete
iteration and for filled columns, sees data another thread commits while it waits, and times out naming what it
waited for."""

from __future__ import annotations

import threading
import time

import pytest

from hpc_rlhf.rollouts import (
    ShardWriter,
    commit_iteration,
    iteration_ready,
    wait_for_iteration,
    wait_for_shards,
    wait_until,
)

SHARDS = ["generator_0000", "generator_0001"]


def write_shards(run_dir, make_rows, iteration: int = 3) -> dict[str, list]:
    rows = make_rows(groups=2, group_size=2, seed=iteration)
    parts = {SHARDS[0]: rows[:2], SHARDS[1]: rows[2:]}
    writer = ShardWriter(run_dir)
    for name, part in parts.items():
        writer.write(iteration, name, part)
    return parts


def test_an_iteration_is_ready_once_complete_and_filled(run_dir, make_rows):
    parts = write_shards(run_dir, make_rows)
    assert not iteration_ready(run_dir, 3)  # shards committed, the iteration not yet
    wait_for_shards(run_dir, 3, SHARDS, timeout_s=1)
    commit_iteration(run_dir, 3, SHARDS)
    assert iteration_ready(run_dir, 3) and not iteration_ready(run_dir, 3, ["rewards"])
    writer = ShardWriter(run_dir)
    writer.write_columns(3, SHARDS[0], "rewards", {"reward": [1.0] * len(parts[SHARDS[0]])})
    assert not iteration_ready(run_dir, 3, ["rewards"])  # one shard of two filled
    writer.write_columns(3, SHARDS[1], "rewards", {"reward": [0.0] * len(parts[SHARDS[1]])})
    assert iteration_ready(run_dir, 3, ["rewards"]) and not iteration_ready(run_dir, 3, ["rewards", "values"])
    wait_for_iteration(run_dir, 3, ["rewards"], timeout_s=1)


def test_a_waiting_rank_sees_what_another_commits(run_dir, make_rows):
    write_shards(run_dir, make_rows)
    committer = threading.Timer(0.2, commit_iteration, args=(run_dir, 3, SHARDS))
    committer.start()
    started = time.monotonic()
    wait_for_iteration(run_dir, 3, timeout_s=30)
    committer.join()
    assert 0.15 < time.monotonic() - started < 10


@pytest.mark.parametrize(("wait", "message"), [
    (lambda run_dir: wait_for_iteration(run_dir, 5, timeout_s=0.05), "waited 0 s for iteration 5 to complete"),
    (lambda run_dir: wait_for_iteration(run_dir, 3, ["values"], timeout_s=0.05),
     r"waited 0 s for stages \['values'\] of iteration 3"),
    (lambda run_dir: wait_for_shards(run_dir, 3, [*SHARDS, "generator_0002"], timeout_s=0.05),
     "waited 0 s for the generator shards of iteration 3"),
])
def test_a_timeout_names_what_was_awaited(run_dir, make_rows, wait, message):
    write_shards(run_dir, make_rows)
    commit_iteration(run_dir, 3, SHARDS)
    with pytest.raises(TimeoutError, match=message):
        wait(run_dir)


def test_wait_until_polls_until_the_condition_holds():
    calls = []
    wait_until(lambda: calls.append(1) or len(calls) >= 3, "three calls", timeout_s=5)
    assert len(calls) == 3
