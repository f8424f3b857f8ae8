"""Failure propagation: one rank raises, every rank stops within seconds carrying that rank's error."""

from __future__ import annotations

import datetime

import pytest
import torch.distributed as dist

from hpc_rlhf.distributed.guard import FailureBoard, FailureReport, run_guarded, stop_job
from hpc_rlhf.distributed.world import free_port

MESSAGE = "ValueError: reward shard 17 is corrupt (raised on rank {rank})"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fail_rank", [2, 0])  # rank 0 also hosts the store
def test_a_raising_rank_stops_all_ranks_with_its_error(launch_ranks, tmp_path, fail_rank):
    runs = launch_ranks("guard", 4, timeout_s=90, env={"FAIL_RANK": str(fail_rank)})
    message = MESSAGE.format(rank=fail_rank)
    failed_at = max(run.seconds for run in runs)
    for run in runs:
        assert run.returncode == 1, f"rank {run.rank}: {run.returncode}\n{run.stderr[-3000:]}"
        assert message in run.stderr, f"rank {run.rank} stderr:\n{run.stderr[-3000:]}"
        assert not (tmp_path / f"rank{run.rank}.json").exists()  # nobody got past the barrier
    assert f"[rank {fail_rank}] aborting the job: {message}" in runs[fail_rank].stderr
    for run in runs:
        if run.rank != fail_rank:
            assert f"[rank {run.rank}] stopping: rank {fail_rank} failed: {message}" in run.stderr
    # all ranks end within seconds of each other (the failing rank raises ~1 s after start-up)
    assert failed_at - min(run.seconds for run in runs) < 10


@pytest.mark.timeout(120)
def test_mpi_abort_stops_every_rank(launch_mpi, tmp_path):
    result, seconds = launch_mpi("mpi_guard", 4, timeout_s=100, env={"FAIL_RANK": "2"})
    assert result.returncode != 0
    assert seconds < 60  # MPI_Abort ended the ranks waiting in the barrier (they would otherwise hang to the timeout)
    assert f"[rank 2] aborting the job: {MESSAGE.format(rank=2)}" in result.stderr
    assert not list(tmp_path.glob("rank*.json"))


def test_failure_board_keeps_the_first_reason():
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=True,
                          timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
    board = FailureBoard(store)
    assert board.poll() is None
    first = FailureReport(rank=3, reason="OSError: disk full")
    assert board.publish(first) == first
    assert board.publish(FailureReport(rank=1, reason="RuntimeError: connection closed")) == first
    assert board.poll() == first
    assert board.count_stopped(1) == 1 and board.count_stopped() == 1


class RecordingControl:
    """A control plane whose abort records the reason instead of ending the process."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def abort(self, reason: str):
        self.reasons.append(reason)
        raise SystemExit(1)


def test_run_guarded_passes_results_and_aborts_on_errors():
    control = RecordingControl()
    assert run_guarded(lambda x, y: x + y, control, 2, y=3) == 5
    with pytest.raises(SystemExit):
        run_guarded(lambda: (_ for _ in ()).throw(KeyError("prompt 12")), control)
    with pytest.raises(SystemExit):
        run_guarded(lambda: (_ for _ in ()).throw(SystemExit(0)), control)  # a clean exit is not a failure
    assert control.reasons == ["KeyError: 'prompt 12'"]


def test_stop_job_publishes_then_exits():
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, world_size=None, is_master=True,
                          timeout=datetime.timedelta(seconds=10), wait_for_workers=False)
    board = FailureBoard(store)
    codes: list[int] = []
    with pytest.raises(SystemExit):
        stop_job(board, rank=2, world_size=4, reason="ValueError: bad", exit_fn=codes.append)
    assert codes == [1]
    assert board.poll() == FailureReport(rank=2, reason="ValueError: bad")
    assert board.count_stopped() == 1
