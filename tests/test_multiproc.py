"""tests/multiproc.py: results in rank order, a failing rank's traceback, a dead rank, the timeout."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.multiproc import RankFailed, run_ranks


def rank_sum(scale: int) -> tuple[int, float, str]:
    value = torch.tensor([float(dist.get_rank() * scale)])
    dist.all_reduce(value)
    return dist.get_rank(), value.item(), os.environ["OMP_NUM_THREADS"]


def rank_one_raises() -> None:
    if dist.get_rank() == 1:
        raise ValueError("rank 1 fails on purpose")
    dist.barrier()  # rank 0 waits here for ever; the failure of rank 1 ends it


def rank_one_dies() -> None:
    if int(os.environ["RANK"]) == 1:
        os._exit(7)


def sleeps() -> None:
    time.sleep(60)


@pytest.mark.timeout(120)
def test_results_come_back_in_rank_order():
    assert run_ranks(rank_sum, 3, 10, timeout_s=60) == [(0, 30.0, "1"), (1, 30.0, "1"), (2, 30.0, "1")]


@pytest.mark.timeout(120)
def test_the_failing_rank_and_its_traceback_are_raised():
    with pytest.raises(RankFailed, match="rank 1 failed") as failure:
        run_ranks(rank_one_raises, 2, timeout_s=60)
    assert "ValueError: rank 1 fails on purpose" in failure.value.detail and "rank_one_raises" in failure.value.detail


@pytest.mark.timeout(120)
def test_a_rank_that_dies_without_a_result_is_named():
    with pytest.raises(RankFailed, match="rank 1 failed:\nprocess exited with code 7"):
        run_ranks(rank_one_dies, 2, timeout_s=60, init_process_group=False)


@pytest.mark.timeout(120)
def test_ranks_still_running_at_the_deadline_are_killed():
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[0, 1\] of 2 still running"):
        run_ranks(sleeps, 2, timeout_s=3, init_process_group=False)
    assert time.monotonic() - started < 30
