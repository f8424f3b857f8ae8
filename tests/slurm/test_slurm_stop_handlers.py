"""Stop signals in the first instant of a run, with real processes and no cluster: the batch script's trap in a real
bash before the run directory is known, the stop flag removed once the job has finished, the per-rank entry catching
USR1 while it still imports torch, and a rank that catches USR2 leaving the run's stop flag for the batch shell."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_rlhf.slurm.requeue import (
    STOP_FLAG_ENV,
    srun_wait_lines,
    stop_flag_path,
    stop_flag_ready_lines,
    stop_trap_lines,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SLURM_ENV = {"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "0"}


def wait_for(path: Path, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def batch_script(tmp_path: Path, run_dir_command: str, task: str) -> Path:
    """A script shaped like the shipped ones: trap first, RUN_DIR from a command, the flag, srun's stand-in."""
    script = tmp_path / "job.sh"
    script.write_text("\n".join([*stop_trap_lines(), "set -uo pipefail", f'RUN_DIR="$({run_dir_command})" || exit 1',
                                 'mkdir -p "$RUN_DIR"', *stop_flag_ready_lines(), *srun_wait_lines(task)]) + "\n")
    return script


@pytest.mark.timeout(60)
def test_usr1_before_the_run_dir_is_known_is_not_lost(tmp_path):
    """USR1 while `--print-run-dir` runs (~0.2 s in a real job): the shell lives, and the ranks find the flag."""
    run_dir, started = tmp_path / "run", tmp_path / "resolving"
    script = batch_script(tmp_path, f"touch {started}; sleep 1; echo {run_dir}",
                          'cat "$RUN_DIR/.stop_requested" > "$RUN_DIR/seen_by_task"')
    shell = subprocess.Popen(["bash", str(script)], env={**os.environ, **SLURM_ENV})
    wait_for(started)
    shell.send_signal(signal.SIGUSR1)
    assert shell.wait(20) == 0  # not killed by the signal (it was: -10)
    assert (run_dir / "seen_by_task").read_text() == "42 0\n"  # the task saw the flag of this run
    assert not stop_flag_path(run_dir).exists()  # the job finished: the flag is gone


@pytest.mark.timeout(60)
def test_a_stop_that_comes_after_the_last_iteration_leaves_no_flag(tmp_path):
    run_dir, running = tmp_path / "run", tmp_path / "task_running"
    script = batch_script(tmp_path, f"echo {run_dir}", f"bash -c 'touch {running}; sleep 1'")
    shell = subprocess.Popen(["bash", str(script)], env={**os.environ, **SLURM_ENV})
    wait_for(running)
    shell.send_signal(signal.SIGUSR1)  # the ranks have passed their last safe point: they finish normally
    wait_for(stop_flag_path(run_dir))
    assert shell.wait(20) == 0
    assert not stop_flag_path(run_dir).exists() and not list(run_dir.glob(".stop_requested*"))


@pytest.mark.timeout(60)
def test_a_rank_that_catches_usr2_writes_the_flag_of_this_run(tmp_path):
    code = ("import signal, time\n"
            "from hpc_rlhf.slurm.requeue import install_early_stop_handlers\n"
            "install_early_stop_handlers()\n"
            f"open({str(tmp_path / 'ready')!r}, 'w').close()\n"
            "time.sleep(30)\n")
    flag = tmp_path / ".stop_requested"
    env = {**os.environ, **SLURM_ENV, STOP_FLAG_ENV: str(flag), "PYTHONPATH": str(REPO_ROOT)}
    rank = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        wait_for(tmp_path / "ready")
        rank.send_signal(signal.SIGUSR2)
        wait_for(flag)
        assert flag.read_text() == "42 0\n"
        assert rank.poll() is None  # caught, not killed
    finally:
        rank.kill()
        rank.wait()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_rank_entry_catches_usr1_while_it_imports(tmp_path):
    """USR1 0.3 s after `python -m hpc_rlhf.launch` started (torch is still importing): recorded, not fatal; the
    rank stops at its first safe point with a checkpoint."""
    from hpc_rlhf.slurm.torture import TINY_ARGS

    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    rank = subprocess.Popen([sys.executable, "-m", "hpc_rlhf.launch", "--config", "configs/tiny_cpu.yaml", *TINY_ARGS,
                             "--train.max_iterations=3", f"--train.run_dir={run_dir}"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.3)
    rank.send_signal(signal.SIGUSR1)
    output, _ = rank.communicate(timeout=500)
    assert rank.returncode == 0, output[-4000:]  # it was -10: killed by the signal
    assert "stopped after a checkpoint (SIGUSR1)" in output, output[-4000:]
    assert (run_dir / "checkpoints" / "iter_000001").is_dir()


@pytest.mark.timeout(60)
def test_rank_guard_turns_a_stop_signal_into_the_flag_when_the_rank_dies_of_it(tmp_path):
    """As SLURM signals every process of a task: the guard shell and a rank that has no handler yet (`sleep` here).
    The rank dies of USR1; the guard has written this run's flag, which makes the batch shell requeue."""
    from hpc_rlhf.slurm.requeue import RANK_GUARD, rank_guard_lines

    run_dir, pid_file = tmp_path / "run", tmp_path / "rank.pid"
    run_dir.mkdir()
    script = tmp_path / "task.sh"
    script.write_text("\n".join([*stop_trap_lines(), f"RUN_DIR={run_dir}", *stop_flag_ready_lines(),
                                 *rank_guard_lines(),
                                 f"exec {RANK_GUARD} bash -c 'echo $$ > {pid_file}; exec sleep 30'"]) + "\n")
    guard = subprocess.Popen(["bash", str(script)], env={**os.environ, **SLURM_ENV})
    try:
        wait_for(pid_file)
        while not pid_file.read_text().strip():
            time.sleep(0.01)
        time.sleep(0.2)  # the guard is waiting for its rank
        for pid in (guard.pid, int(pid_file.read_text())):
            os.kill(pid, signal.SIGUSR1)
        assert guard.wait(20) == 128 + signal.SIGUSR1  # the rank's status
        assert stop_flag_path(run_dir).read_text() == "42 0\n"
    finally:
        if guard.poll() is None:
            guard.kill()
            guard.wait()
