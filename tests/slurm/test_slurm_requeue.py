"""The stop request (real signals to this process, the flag file, the batch-script trap in a real bash) and the
checks `requeue_self` makes before it talks to SLURM."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpc_rlhf.slurm import (
    RequeueError,
    RequeueRefused,
    StopReason,
    StopRequest,
    combine_stop_reasons,
    requeue_self,
    srun_wait_lines,
    stop_flag_ready_lines,
    stop_flag_path,
    stop_trap_lines,
    write_stop_flag,
)


def deliver(signum: int) -> None:
    """Send a signal to this process and give Python the chance to run its handler."""
    os.kill(os.getpid(), signum)
    time.sleep(0.01)


@pytest.mark.timeout(30)
def test_signals_are_recorded_and_termination_wins():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with StopRequest() as stop:
            assert stop.request() is None and not stop.should_stop()
            deliver(signal.SIGUSR2)
            assert stop.request() == StopReason("SIGUSR2", requeue=True)
            deliver(signal.SIGUSR1)  # a second "requeue" signal keeps the first
            assert stop.request() == StopReason("SIGUSR2", requeue=True)
            deliver(signal.SIGTERM)  # scancel / preemption: stop, and leave the requeue to SLURM
            assert stop.request() == StopReason("SIGTERM", requeue=False)
            deliver(signal.SIGUSR1)
            assert stop.request() == StopReason("SIGTERM", requeue=False)
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN  # the earlier handler is back
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_install_outside_the_main_thread_is_refused():
    errors: list[BaseException] = []

    def install() -> None:
        try:
            StopRequest().install()
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=install)
    thread.start()
    thread.join(10)
    assert len(errors) == 1 and "main thread" in str(errors[0])


def test_flag_for_this_run_stops_and_a_stale_flag_does_not(tmp_path):
    write_stop_flag(tmp_path, "77", 1)
    assert stop_flag_path(tmp_path).read_text() == "77 1\n"
    current = StopRequest(tmp_path, "77", 1, flag_poll_interval_s=0)
    assert current.request() == StopReason("stop flag", requeue=True)
    assert not current.clear_stale_flag() and stop_flag_path(tmp_path).exists()

    earlier_run = StopRequest(tmp_path, "77", 2, flag_poll_interval_s=0)  # the job was requeued since
    other_job = StopRequest(tmp_path, "78", 1, flag_poll_interval_s=0)
    assert earlier_run.request() is None and other_job.request() is None
    assert earlier_run.clear_stale_flag() and not stop_flag_path(tmp_path).exists()
    assert not earlier_run.clear_stale_flag()  # nothing left to delete


def test_flag_outside_a_job_or_without_run_dir_is_not_watched(tmp_path):
    write_stop_flag(tmp_path, "5", 0)
    assert StopRequest(tmp_path, job_id=None, flag_poll_interval_s=0).request() is None
    assert StopRequest(None, "5", 0, flag_poll_interval_s=0).request() is None


def test_flag_polling_is_throttled(tmp_path):
    stop = StopRequest(tmp_path, "5", 0, flag_poll_interval_s=3600)
    assert stop.request() is None  # polled now: no flag
    write_stop_flag(tmp_path, "5", 0)
    assert stop.request() is None  # next poll is an hour away: the file system is not asked again
    eager = StopRequest(tmp_path, "5", 0, flag_poll_interval_s=0)
    assert eager.should_stop()
    stop_flag_path(tmp_path).unlink()
    assert eager.should_stop()  # once seen, a stop request stays


def test_for_slurm_job_reads_job_and_restart(tmp_path):
    write_stop_flag(tmp_path, "31", 4)
    assert StopRequest.for_slurm_job(tmp_path, {"SLURM_JOB_ID": "31", "SLURM_RESTART_COUNT": "4"}, 0).should_stop()
    assert not StopRequest.for_slurm_job(tmp_path, {"SLURM_JOB_ID": "31"}, 0).should_stop()  # restart 0
    with pytest.raises(ValueError, match="SLURM_RESTART_COUNT='x'"):
        StopRequest.for_slurm_job(tmp_path, {"SLURM_JOB_ID": "31", "SLURM_RESTART_COUNT": "x"})


_REASONS = st.one_of(st.none(), st.builds(StopReason, st.sampled_from(["SIGUSR1", "SIGUSR2", "SIGTERM", "stop flag"]),
                                          st.booleans()))


@given(st.lists(_REASONS, max_size=8))
def test_combined_stop_decision(reasons):
    decision = combine_stop_reasons(reasons)
    seen = [reason for reason in reasons if reason is not None]
    assert (decision is None) == (not seen)
    if decision is not None:
        assert decision in seen
        assert decision.requeue == all(reason.requeue for reason in seen)


@pytest.mark.timeout(30)
def test_batch_script_trap_writes_the_flag_and_keeps_waiting_for_srun(tmp_path):
    """The shipped trap and wait lines in a real bash: USR1 -> flag; the script waits on and returns srun's status."""
    pid_file = tmp_path / "task.pid"
    task = f"bash -c 'echo $$ > {pid_file}; exec sleep 60'"  # stands in for srun
    script = tmp_path / "job.sh"
    script.write_text("\n".join(["set -u", *stop_trap_lines(), f"RUN_DIR={tmp_path}", *stop_flag_ready_lines(),
                                  *srun_wait_lines(task)]) + "\n")
    env = {**os.environ, "SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"}
    shell = subprocess.Popen(["bash", str(script)], env=env)
    try:
        deadline = time.monotonic() + 10
        while not pid_file.exists() or not pid_file.read_text().strip():
            assert time.monotonic() < deadline, "the stand-in task did not start"
            time.sleep(0.02)
        shell.send_signal(signal.SIGUSR1)
        flag = stop_flag_path(tmp_path)
        while not flag.exists():
            assert time.monotonic() < deadline, "the trap did not write the stop flag"
            time.sleep(0.02)
        assert flag.read_text() == "42 2\n"
        assert StopRequest(tmp_path, "42", 2, flag_poll_interval_s=0).should_stop()
        time.sleep(0.3)
        assert shell.poll() is None  # the signal did not end the script: it still waits for the task
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        assert shell.wait(10) == 128 + signal.SIGTERM  # the task's status is the script's status
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.wait()


def refuse_scontrol(args: list[str]) -> subprocess.CompletedProcess[str]:
    raise AssertionError(f"scontrol {args} must not be called")


def test_requeue_self_is_a_no_op_off_rank_zero():
    env = {"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "0"}
    assert requeue_self(3, max_requeue=5, environ=env, scontrol=refuse_scontrol) is None


@pytest.mark.parametrize("env, error, message", [
    ({}, RequeueRefused, "SLURM_JOB_ID is not set"),
    ({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "3"}, RequeueRefused,
     "job 5 has already been requeued 3 time.*slurm.max_requeue is 3"),
    ({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "-1"}, RequeueError, "SLURM_RESTART_COUNT='-1'"),
])
def test_requeue_self_refuses_before_calling_scontrol(env, error, message):
    with pytest.raises(error, match=message):
        requeue_self(0, max_requeue=3, environ=env, scontrol=refuse_scontrol)


def test_requeue_self_checks_the_restart_delay():
    with pytest.raises(ValueError, match="restart_delay_s"):
        requeue_self(0, max_requeue=3, environ={"SLURM_JOB_ID": "5"}, restart_delay_s=0, scontrol=refuse_scontrol)
