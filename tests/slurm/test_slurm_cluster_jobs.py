"""Jobs on the real local SLURM cluster: rank placement, node lists, and stop -> checkpoint -> requeue -> resume."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpc_rlhf.slurm import (
    RequeueError,
    expand_nodelist,
    requeue_self,
    scontrol_hostnames,
    srun_wait_lines,
    stop_flag_ready_lines,
    stop_trap_lines,
)

pytestmark = pytest.mark.slurm

JOBS_DIR = Path(__file__).resolve().parent / "jobs"
PYTHON = shlex.quote(sys.executable)
LOG_LINE = re.compile(r"\[(?P<time>\d+\.\d+)\] rank=(?P<rank>\d+) restart=(?P<restart>\d+) (?P<what>.*)")


@pytest.mark.timeout(90)
def test_three_nodes_two_tasks_each_give_six_ranks_with_the_right_place(slurm_cluster, tmp_path):
    script = slurm_cluster.write_batch_script(
        tmp_path / "ranks.sh",
        ["--nodes=3", "--ntasks-per-node=2", "--gres=gpu:2", f"--output={tmp_path}/ranks_%j.out"],
        [f"{PYTHON} {JOBS_DIR}/report_env.py {tmp_path} batch",
         f"srun {PYTHON} {JOBS_DIR}/report_env.py {tmp_path}"])
    job_id = slurm_cluster.submit(script)
    slurm_cluster.wait_for_state(job_id, {"COMPLETED"}, timeout_s=60)

    records = {rank: json.loads((tmp_path / f"env_{rank}.json").read_text()) for rank in range(6)}
    for rank, record in records.items():
        raw, parsed = record["raw"], record["parsed"]
        assert raw["SLURM_PROCID"] == str(rank) and parsed["procid"] == rank
        # SLURM's default block distribution: ranks 0,1 on the first node, 2,3 on the second, 4,5 on the third
        assert parsed["nodeid"] == rank // 2 == int(raw["SLURM_NODEID"])
        assert parsed["localid"] == rank % 2 == int(raw["SLURM_LOCALID"])
        assert record["node_name"] == f"n{rank // 2 + 1}" == raw["SLURMD_NODENAME"]
        assert parsed["nodes"] == ["n1", "n2", "n3"]
        assert parsed["tasks_per_node"] == [2, 2, 2] and raw["SLURM_STEP_TASKS_PER_NODE"] == "2(x3)"
        assert parsed["ntasks"] == 6 and record["local_world_size"] == 2
        assert parsed["job_id"] == job_id and parsed["restart_count"] == 0 and parsed["in_step"] is True
        assert raw["CUDA_VISIBLE_DEVICES"] == "0,1"  # the fake GPUs are scheduled like real ones

    batch = json.loads((tmp_path / "batch.json").read_text())["parsed"]
    assert batch["in_step"] is False and batch["procid"] == 0 and batch["nodes"] == ["n1", "n2", "n3"]
    assert batch["tasks_per_node"] == [2, 2, 2] and batch["ntasks"] == 6


_PREFIX = st.sampled_from(["n", "gpu-", "node", "a1b", "dgx-h100-"])
_RANGE = st.tuples(st.integers(0, 120), st.integers(0, 12), st.integers(1, 3)).map(
    lambda t: f"{t[0]:0{t[2]}d}" + (f"-{t[0] + t[1]:0{t[2]}d}" if t[1] else ""))
_BRACKETED = st.tuples(_PREFIX, st.lists(_RANGE, min_size=1, max_size=3)).map(lambda t: f"{t[0]}[{','.join(t[1])}]")
_ITEM = st.one_of(_PREFIX.map(lambda p: p + "1"), _BRACKETED)


@pytest.mark.timeout(60)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(items=st.lists(_ITEM, min_size=1, max_size=4))
def test_pure_nodelist_expansion_matches_scontrol(slurm_cluster, items):
    nodelist = ",".join(items)
    with mock.patch.dict(os.environ, {"SLURM_CONF": str(slurm_cluster.conf)}):
        assert expand_nodelist(nodelist) == scontrol_hostnames(nodelist)


def requeue_job_script(cluster, tmp_path: Path, run_dir: Path, sbatch_options: list[str], task_args: str) -> Path:
    """A batch script shaped like the shipped ones: requeue options, the USR1 trap, srun in the background."""
    srun = f"srun {PYTHON} {JOBS_DIR}/requeue_task.py --run-dir \"$RUN_DIR\" {task_args}"
    return cluster.write_batch_script(
        tmp_path / "requeue_job.sh",
        ["--requeue", "--open-mode=append", f"--output={tmp_path}/job_%j.out", *sbatch_options],
        [*stop_trap_lines(), f"RUN_DIR={shlex.quote(str(run_dir))}", *stop_flag_ready_lines(),
         *srun_wait_lines(srun)])


def parse_log(output: str) -> list[dict]:
    """The task log lines of a job's output file, with their time stamps."""
    return [match.groupdict() for match in map(LOG_LINE.match, output.splitlines()) if match]


def check_one_requeue(cluster, job_id: str, tmp_path: Path, run_dir: Path, ranks: int, iterations: int) -> None:
    """The job was stopped once by the flag, saved, requeued, restarted promptly, resumed and finished."""
    record = cluster.job(job_id)
    assert record["Restarts"] == "1", record
    output = cluster.read_output(tmp_path / f"job_{job_id}.out")
    lines = parse_log(output)
    runs = {(int(line["restart"]), int(line["rank"]), line["what"].split()[0]) for line in lines}
    for rank in range(ranks):  # both runs wrote into the one output file (--open-mode=append)
        assert (0, rank, "start") in runs and (1, rank, "start") in runs, output
        assert (1, rank, "finished") in runs, output
    # every rank of the first run saw the stop through the flag the batch script's trap wrote
    for rank in range(ranks):
        stop = json.loads((run_dir / f"stop_0_{rank}.json").read_text())
        assert stop["source"] == "stop flag" and stop["requeue"] is True
    # ... and rank 0 of the resumed run deleted that flag, which addressed the earlier run
    assert not (run_dir / ".stop_requested").exists()
    # the second run resumed from the checkpoint instead of starting over
    saved = json.loads((run_dir / "checkpoint.json").read_text())["iteration"]
    assert saved >= 1
    for rank in range(ranks):
        assert int((run_dir / f"started_1_{rank}").read_text()) == saved
    assert f"finished iteration={max(iterations, saved)}" in output
    # requeue_self moved the begin time: the restart came well before SLURM's 120 s requeue hold
    requeued_at = max(float(line["time"]) for line in lines if line["restart"] == "0")
    restarted_at = min(float(line["time"]) for line in lines if line["restart"] == "1")
    assert "prompt_restart=True" in output, output
    assert restarted_at - requeued_at < 60, (requeued_at, restarted_at)


@pytest.mark.timeout(120)
def test_stop_signal_to_batch_shell_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = requeue_job_script(slurm_cluster, tmp_path, run_dir, ["--nodes=2", "--ntasks-per-node=2"],
                                "--iterations 30 --iteration-s 0.1 --restart-delay-s 3")
    job_id = slurm_cluster.submit(script)
    for rank in range(4):  # every rank is iterating, so the trap is installed and the flag will be polled
        slurm_cluster.wait_for_path(run_dir / f"started_0_{rank}", timeout_s=60, job_id=job_id)
    slurm_cluster.signal_batch(job_id, "USR1")  # what --signal=B:USR1@N does, without waiting for the time limit
    slurm_cluster.wait_for_state(job_id, {"COMPLETED"}, timeout_s=90, min_restarts=1)
    check_one_requeue(slurm_cluster, job_id, tmp_path, run_dir, ranks=4, iterations=30)


@pytest.mark.timeout(150)
def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """The real path: SLURM itself sends USR1 to the batch shell ahead of a one-minute limit."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = requeue_job_script(slurm_cluster, tmp_path, run_dir,
                                ["--nodes=1", "--ntasks=2", "--time=1", "--signal=B:USR1@55"],
                                "--iterations 20 --iteration-s 0.1 --restart-delay-s 3")
    job_id = slurm_cluster.submit(script)
    slurm_cluster.wait_for_state(job_id, {"COMPLETED"}, timeout_s=140, min_restarts=1)
    check_one_requeue(slurm_cluster, job_id, tmp_path, run_dir, ranks=2, iterations=20)


@pytest.mark.timeout(90)
def test_requeue_is_refused_past_max_requeue(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = requeue_job_script(slurm_cluster, tmp_path, run_dir, ["--nodes=1", "--ntasks=1"],
                                "--iterations 5 --iteration-s 0.1 --max-requeue 0")
    job_id = slurm_cluster.submit(script)
    slurm_cluster.wait_for_path(run_dir / "started_0_0", timeout_s=60, job_id=job_id)
    slurm_cluster.signal_batch(job_id, "USR1")
    record = slurm_cluster.wait_for_state(job_id, {"FAILED"}, timeout_s=60)
    assert record["Restarts"] == "0"
    output = slurm_cluster.read_output(tmp_path / f"job_{job_id}.out")
    assert "RequeueRefused" in output and "slurm.max_requeue is 0" in output, output
    assert json.loads((run_dir / "checkpoint.json").read_text())["iteration"] >= 1  # saved before refusing


@pytest.mark.timeout(60)
def test_requeue_of_an_unknown_job_reports_scontrol_and_restores_sigterm(slurm_cluster):
    previous = signal.getsignal(signal.SIGTERM)
    with (mock.patch.dict(os.environ, {"SLURM_CONF": str(slurm_cluster.conf)}),
          pytest.raises(RequeueError, match=r"scontrol requeue 999999` failed .*Invalid job id")):
        requeue_self(0, max_requeue=3, environ={"SLURM_JOB_ID": "999999", "SLURM_RESTART_COUNT": "0"})
    assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.timeout(120)
def test_submitit_usr2_reaches_the_stop_request_and_the_job_requeues_once(slurm_cluster, tmp_path):
    """submitit's own pre-timeout signal (USR2 to every task) drives the same StopRequest and requeue_self."""
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
        job = executor.submit(task_module.stop_and_requeue_once, str(run_dir), 3)
        for rank in range(2):
            slurm_cluster.wait_for_path(run_dir / f"started_0_{rank}", timeout_s=60, job_id=job.job_id)
        slurm_cluster.run("scancel", "--signal=USR2", job.job_id)  # what --signal=USR2@N does before the limit
        record = slurm_cluster.wait_for_state(job.job_id, {"COMPLETED"}, timeout_s=60, min_restarts=1)
        deadline = time.monotonic() + 30
        while not job.done() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job.results() == [f"rank {rank} finished after 1 restart(s)" for rank in range(2)]
    assert record["Restarts"] == "1"  # only requeue_self requeued: submitit's own handler was replaced
    assert [(run_dir / f"stop_{rank}").read_text() for rank in range(2)] == ["SIGUSR2", "SIGUSR2"]


def _import_job_module(name: str):
    """Import tests/slurm/jobs/NAME.py under a unique module name (the jobs folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"hpc_rlhf_slurm_test_{name}", JOBS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
