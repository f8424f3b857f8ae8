"""Stops that arrive in the first instant of a run, on the real local cluster: before the batch shell's trap would
have existed, and while the ranks are still importing. Each must end in a requeue and a complete run, not a failure."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from hpc_rlhf.slurm.requeue import requeue_limit_lines, srun_wait_lines, stop_trap_lines
from hpc_rlhf.slurm.torture import (
    SAMPLES_PER_ITERATION,
    job_args,
    metric_steps,
    send_stop,
    submit_tiny,
    wait_for_batch_shell,
    wait_for_tasks,
    wait_running,
)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ITERATIONS = 3


@pytest.fixture(scope="module")
def tiny_model() -> str:
    """Build the tiny starting model once, here, so that the ranks find it instead of each building it."""
    from hpc_rlhf.builtin_models.resolve import resolve_model_path

    return resolve_model_path("builtin:tiny-llama-arith")


def generated_samples(run_dir: Path) -> int:
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return int(sum(row.get("count/generate_samples", 0) for row in rows))


def finish_after_one_requeue(cluster, job_id: str, run_dir: Path, log: Path, sent: str = "") -> str:
    record = cluster.wait_for_state(job_id, {"COMPLETED"}, timeout_s=500, log=log)
    output = log.read_text(errors="replace")
    assert record["Restarts"] == "1", f"{sent}\n{output[-4000:]}"
    assert metric_steps(run_dir) == list(range(ITERATIONS)), output[-4000:]
    assert not (run_dir / ".stop_requested").exists()
    return output


@pytest.mark.timeout(600)
@pytest.mark.parametrize("async_queue", [0, 1])
def test_usr1_to_the_batch_shell_at_once_requeues(slurm_cluster, tiny_model, tmp_path, async_queue):
    """`scancel --signal=USR1 --batch` the moment the batch shell exists: the trap is its first command. The ranks
    find the flag at their first safe point; an asynchronous run's first tick trains nothing, so it stops after the
    next one, with a checkpoint, rather than with nothing saved."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job_id = submit_tiny(slurm_cluster, run_dir, log, job_args(run_dir, ITERATIONS, async_queue, save_steps=0))
    wait_for_batch_shell(job_id)
    send_stop(slurm_cluster, job_id, "usr1_batch")
    output = finish_after_one_requeue(slurm_cluster, job_id, run_dir, log)
    assert "stopped after a checkpoint (stop flag)" in output
    assert "checkpoints/iter_000001" in output.split("resumed from", 1)[-1].split("\n", 1)[0], output[-4000:]
    assert generated_samples(run_dir) == ITERATIONS * SAMPLES_PER_ITERATION  # every sample counted once


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stop", ["usr1_tasks", "usr2_tasks"])
def test_stop_signal_to_starting_ranks_requeues(slurm_cluster, tiny_model, tmp_path, stop):
    """`scancel --signal=USR1 JOB` (or USR2) as soon as the ranks' processes exist, while they still import."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job_id = submit_tiny(slurm_cluster, run_dir, log, job_args(run_dir, ITERATIONS, async_queue=0, save_steps=0))
    wait_running(slurm_cluster, job_id)
    wait_for_tasks(job_id, 3)
    time.sleep(0.5)  # the ranks are importing (SLURM may not deliver a signal to a step it is still launching)
    sent = send_stop(slurm_cluster, job_id, stop)
    output = finish_after_one_requeue(slurm_cluster, job_id, run_dir, log, sent)
    assert (f"stopped after a checkpoint (SIG{stop[:4].upper()})" in output
            or "probably a rank that was still starting: requeueing" in output)


@pytest.mark.timeout(300)
def test_rank_killed_by_usr1_before_its_handlers_requeues_from_the_batch_shell(slurm_cluster, tmp_path):
    """The last resort of the shipped wait lines: a task that USR1 kills (exit 138) makes the shell requeue."""
    task = tmp_path / "task.py"
    task.write_text(
        "import os, signal, sys\n"
        "restart = int(os.environ.get('SLURM_RESTART_COUNT', '0'))\n"
        f"open({str(tmp_path)!r} + f'/ran_{{restart}}_{{os.environ[\"SLURM_PROCID\"]}}', 'w').close()\n"
        "if restart == 0:\n"
        "    os.kill(os.getpid(), signal.SIGUSR1)  # the default action: the process dies of it\n"
        "sys.exit(0)\n")
    script = slurm_cluster.write_batch_script(
        tmp_path / "job.sh", ["--requeue", "--nodes=2", "--ntasks-per-node=1", "--open-mode=append",
                              f"--output={tmp_path}/job_%j.out"],
        [*stop_trap_lines(), *requeue_limit_lines(2), f"RUN_DIR={tmp_path}",
         *srun_wait_lines(f"srun {sys.executable} {task}")])
    job_id = slurm_cluster.submit(script)
    log = tmp_path / f"job_{job_id}.out"
    record = slurm_cluster.wait_for_state(job_id, {"COMPLETED"}, timeout_s=200, min_restarts=1, log=log)
    assert record["Restarts"] == "1"
    assert "after a stop request, probably a rank that was still starting: requeueing" in log.read_text()
    assert sorted(p.name for p in tmp_path.glob("ran_*")) == ["ran_0_0", "ran_0_1", "ran_1_0", "ran_1_1"]


@pytest.mark.timeout(400)
def test_submitit_usr2_during_start_up_restarts_within_seconds(slurm_cluster, tmp_path):
    """A USR2 that submitit's own handler catches (before the entry's StopRequest exists) requeues through
    `requeue_promptly_and_exit`: the job runs again within seconds, not after SLURM's 120 s requeue hold."""
    import cloudpickle
    import submitit

    task_module = _import_job_module("submitit_task")
    cloudpickle.register_pickle_by_value(task_module)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with mock.patch.dict(os.environ, slurm_cluster.env()):
        executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
        executor.update_parameters(nodes=2, tasks_per_node=1, timeout_min=10,
                                   slurm_additional_parameters={"requeue": True})
        job = executor.submit(task_module.SlowStarter(str(run_dir), 3, prompt=True))
        for rank in range(2):
            slurm_cluster.wait_for_path(run_dir / f"starting_0_{rank}", timeout_s=120, job_id=job.job_id)
        slurm_cluster.run("scancel", "--signal=USR2", job.job_id)
        stopped = time.monotonic()
        slurm_cluster.wait_for_path(run_dir / "starting_1_0", timeout_s=100, job_id=job.job_id)
        restart_s = time.monotonic() - stopped
        record = slurm_cluster.wait_for_state(job.job_id, {"COMPLETED"}, timeout_s=120, min_restarts=1)
    assert record["Restarts"] == "1"
    assert restart_s < 60, f"the requeued job took {restart_s:.0f} s to run again"


def _import_job_module(name: str):
    """Import tests/slurm/jobs/NAME.py under a unique module name (the jobs folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"hpc_rlhf_slurm_early_{name}",
                                                  Path(__file__).with_name("jobs") / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
