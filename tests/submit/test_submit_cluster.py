"""Real jobs on the local SLURM cluster: the tiny CPU job submitted through `python -m hpc_rlhf.submit` and through
`sbatch sbatch/tiny_cpu_3node.sh`, stops (USR1 to the batch shell, USR2 from submitit) that checkpoint, requeue and
resume bit for bit, a hard kill followed by a resubmission, and the 70B batch script accepted by a 6-node cluster."""

from __future__ import annotations

import json
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slurm

ITERATIONS = 30  # tiny_jobs.long_run's train.max_iterations
RESUMED = re.compile(r"resumed from \S*/checkpoints/iter_(\d+)")


def submit_args(tiny_jobs, run_dir: Path, job_name: str, *extra: str) -> list[str]:
    """`python -m hpc_rlhf.submit` for the tiny job on 3 nodes: the allocation through the flags, the rest overrides."""
    return [sys.executable, "-m", "hpc_rlhf.submit", "--config", "configs/tiny_cpu.yaml",
            "--nodes", "3", "--gpus-per-node", "1", "--cpus-per-task", "1", "--time", "10", "--job-name", job_name,
            *tiny_jobs.fast, *tiny_jobs.roles, "--slurm.exclusive=false", "--slurm.signal_delay_s=60",
            f"--train.run_dir={run_dir}", *extra]


def submit(cluster, args: list[str]) -> tuple[str, str]:
    """Run the submit entry; returns the job id and what it printed."""
    result = cluster.run(*args)
    match = re.match(r"submitted job (\d+):", result.stdout)
    assert match, f"no job id in the output of python -m hpc_rlhf.submit:\n{result.stdout}\n{result.stderr}"
    return match.group(1), result.stdout


def commit_record(run_dir: Path, iteration: int) -> dict:
    return json.loads((run_dir / "rollouts" / f"iter_{iteration:06d}" / "generator_0000.commit.json").read_text())


def assert_same_actor_as_reference(tiny_jobs, run_dir: Path, reference_dir: Path, tiny_model: str) -> None:
    """Final actor weights equal the uninterrupted run's bit for bit, and training did move them."""
    got = tiny_jobs.actor_weights(run_dir / "hf" / "actor")
    want = tiny_jobs.actor_weights(reference_dir / "hf" / "actor")
    assert got.keys() == want.keys()
    differing = [name for name in want if not torch.equal(got[name], want[name])]
    assert not differing, f"actor weights differ from the uninterrupted run in {differing}"
    initial = tiny_jobs.actor_weights(Path(tiny_model))
    assert any(not torch.equal(want[name], initial[name]) for name in want), "training did not change the actor"
    for iteration in range(ITERATIONS):  # and every iteration sampled the very same rollouts
        assert commit_record(run_dir, iteration)["sha256"] == commit_record(reference_dir, iteration)["sha256"], \
            f"iteration {iteration}'s rollouts differ from the uninterrupted run's"


@pytest.mark.timeout(180)
def test_submit_runs_one_job_of_three_ranks_and_prints_how_to_follow_it(slurm_cluster, tiny_jobs, tmp_path):
    run_dir = tmp_path / "run"
    args = submit_args(tiny_jobs, run_dir, "submit_tiny", "--ckpt.save_hf_model=true")
    job_id, printed = submit(slurm_cluster, args)
    folder = run_dir / "submitit"
    for hint in (f"squeue -j {job_id}", f"tail -f {folder / f'{job_id}_0_log.out'}", f"scancel --signal=USR2 {job_id}"):
        assert hint in printed, printed
    record = slurm_cluster.wait_for_state(job_id, {"COMPLETED"}, timeout_s=150, log=folder / f"{job_id}_0_log.out")
    assert record["NumNodes"] == "3" and record["NumTasks"] == "3" and record["Restarts"] == "0"
    assert record["Requeue"] == "1"  # submitted with --requeue

    # the script SLURM ran is the one --dry-run prints
    dry_run = slurm_cluster.run(*args, "--dry-run").stdout
    assert (folder / f"{job_id}_submission.sh").read_text() == dry_run
    assert "#SBATCH --signal=USR2@60" in dry_run and "#SBATCH --requeue" in dry_run
    # every task ran the per-rank entry to the end and returned its metrics to submitit
    for task in range(3):
        outcome, value = pickle.loads((folder / f"{job_id}_{task}_result.pkl").read_bytes())
        assert outcome == "success", value
    assert "iter 2/3" in (folder / f"{job_id}_0_log.out").read_text()
    assert [row["step"] for row in tiny_jobs.metric_rows(run_dir)] == [0, 1, 2]
    assert (run_dir / "hf" / "actor" / "config.json").is_file()
    assert tiny_jobs.actor_weights(run_dir / "hf" / "actor")
    assert (run_dir / "config.yaml").is_file()  # the resolved config, written before submitting


@pytest.mark.timeout(300)
def test_batch_script_stop_checkpoints_requeues_and_resumes_bit_for_bit(slurm_cluster, tiny_jobs, tiny_model,
                                                                        reference_run, tmp_path):
    """USR1 to the batch shell mid-run (what --signal=B:USR1@N does before the limit): every rank stops at the next
    safe point, the job checkpoints, requeues itself, and the restart finishes exactly like an uninterrupted run."""
    run_dir = tmp_path / "run"
    log = tmp_path / "job.out"
    job_id = slurm_cluster.sbatch(f"--output={log}", "sbatch/tiny_cpu_3node.sh", *tiny_jobs.fast,
                                  *tiny_jobs.long_run, f"--train.run_dir={run_dir}")
    slurm_cluster.wait_for_path(run_dir / "rollouts" / "iter_000001" / "MANIFEST.json", timeout_s=120, job_id=job_id)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    record = slurm_cluster.wait_for_state(job_id, {"COMPLETED"}, timeout_s=240, min_restarts=1, log=log)

    output = log.read_text(errors="replace")
    assert record["Restarts"] == "1", record  # SLURM_RESTART_COUNT of the second run was 1; no further restart
    assert "stopped after a checkpoint (stop flag)" in output and "DUE TO JOB REQUEUE" in output
    resumed = [int(found) for found in RESUMED.findall(output)]
    assert len(resumed) == 1 and 0 < resumed[0] < ITERATIONS, output[-4000:]  # stopped mid-run, resumed once
    assert not (run_dir / ".stop_requested").exists()  # the restart removed the flag meant for the first run

    # nothing generated or trained twice: one metrics row per iteration, every sample generated once
    rows = tiny_jobs.metric_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(ITERATIONS))
    generated = sum(row.get("count/generate_samples", 0) for row in rows)
    assert generated == ITERATIONS * tiny_jobs.samples_per_iteration
    # the interrupted iteration's shards (generated ahead, not yet trained) were reused, not sampled again
    first_run, second_run = commit_record(run_dir, 0)["pid"], commit_record(run_dir, ITERATIONS - 1)["pid"]
    assert first_run != second_run
    assert commit_record(run_dir, resumed[0])["pid"] == first_run

    assert_same_actor_as_reference(tiny_jobs, run_dir, reference_run.wait(), tiny_model)


@pytest.mark.timeout(300)
def test_submitit_usr2_stops_requeues_and_resumes_bit_for_bit(slurm_cluster, tiny_jobs, tiny_model, reference_run,
                                                              tmp_path):
    """submitit's pre-timeout signal (USR2 to every task, as `--signal=USR2@N` sends it) through the same mechanism."""
    run_dir = tmp_path / "run"
    job_id, printed = submit(slurm_cluster, submit_args(tiny_jobs, run_dir, "submit_usr2", *tiny_jobs.long_run))
    slurm_cluster.wait_for_path(run_dir / "rollouts" / "iter_000001" / "MANIFEST.json", timeout_s=120, job_id=job_id)
    stop_command = f"scancel --signal=USR2 {job_id}"
    assert stop_command in printed  # what the submit entry tells users to type
    slurm_cluster.run(*stop_command.split())
    log = run_dir / "submitit" / f"{job_id}_0_log.out"
    record = slurm_cluster.wait_for_state(job_id, {"COMPLETED"}, timeout_s=240, min_restarts=1, log=log)

    output = log.read_text(errors="replace")
    assert record["Restarts"] == "1" and "stopped after a checkpoint (SIGUSR2)" in output
    resumed = [int(found) for found in RESUMED.findall(output)]
    assert len(resumed) == 1 and 0 < resumed[0] < ITERATIONS, output[-4000:]
    rows = tiny_jobs.metric_rows(run_dir)
    assert [row["step"] for row in rows] == list(range(ITERATIONS))
    assert sum(row.get("count/generate_samples", 0) for row in rows) == ITERATIONS * tiny_jobs.samples_per_iteration
    assert_same_actor_as_reference(tiny_jobs, run_dir, reference_run.wait(), tiny_model)


@pytest.mark.timeout(300)
def test_hard_kill_then_resubmit_resumes_from_the_last_periodic_checkpoint(slurm_cluster, tiny_jobs, tiny_model,
                                                                           reference_run, tmp_path):
    """Every rank SIGKILLed (a crash, a lost node: no stop checkpoint); submitting the same command again resumes
    from the last periodic checkpoint and still ends with the uninterrupted run's weights."""
    run_dir = tmp_path / "run"
    save_steps = 4
    args = submit_args(tiny_jobs, run_dir, "submit_kill", *tiny_jobs.long_run, f"--ckpt.save_steps={save_steps}")
    first, _ = submit(slurm_cluster, args)
    slurm_cluster.wait_for_path(run_dir / "checkpoints" / "latest", timeout_s=120, job_id=first)
    killed = tiny_jobs.kill_tasks(first)
    assert len(killed) == 3, f"expected the 3 rank processes of job {first}, killed {killed}"
    record = slurm_cluster.wait_for_state(first, {"FAILED", "CANCELLED"}, timeout_s=60)
    assert record["Restarts"] == "0"  # SLURM does not requeue a job whose tasks died; the user resubmits
    saved = sorted(int(p.name.removeprefix("iter_")) for p in (run_dir / "checkpoints").glob("iter_*"))
    assert saved and all(iteration % save_steps == 0 for iteration in saved), saved  # periodic ones only
    assert max(saved) < ITERATIONS

    second, printed = submit(slurm_cluster, args)
    assert f"resumes   from {run_dir / 'checkpoints' / f'iter_{max(saved):06d}'}" in printed, printed
    log = run_dir / "submitit" / f"{second}_0_log.out"
    slurm_cluster.wait_for_state(second, {"COMPLETED"}, timeout_s=200, log=log)
    assert [int(found) for found in RESUMED.findall(log.read_text())] == [max(saved)]
    assert_same_actor_as_reference(tiny_jobs, run_dir, reference_run.wait(), tiny_model)


@pytest.mark.timeout(120)
def test_ppo_70b_script_and_submission_are_accepted_by_six_nodes(slurm_cluster, six_node_cluster, tmp_path):
    accepted = six_node_cluster.run("sbatch", "--test-only", "sbatch/ppo_70b.sh")
    assert "to start at" in accepted.stderr and "on nodes n[1-6]" in accepted.stderr, accepted.stderr
    rejected = slurm_cluster.run("sbatch", "--test-only", "sbatch/ppo_70b.sh", check=False)  # only 3 nodes there
    assert rejected.returncode != 0 and "node configuration is not available" in rejected.stderr

    dry_run = six_node_cluster.run(sys.executable, "-m", "hpc_rlhf.submit", "--config", "configs/ppo_70b.yaml",
                                   "--nodes", "6", "--dry-run", f"--train.run_dir={tmp_path / 'run'}")
    script = dry_run.stdout
    for line in ("#SBATCH --nodes=6", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR2@600", "#SBATCH --requeue", "#SBATCH --time=2880", "#SBATCH --exclusive"):
        assert line in script.splitlines(), f"{line!r} missing from:\n{script}"
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    (tmp_path / "submitit.sh").write_text(script)
    accepted = six_node_cluster.run("sbatch", "--test-only", str(tmp_path / "submitit.sh"))
    assert "on nodes n[1-6]" in accepted.stderr, accepted.stderr


@pytest.mark.timeout(60)
def test_sbatch_refusal_is_reported_with_its_reason(slurm_cluster, tiny_jobs, tmp_path):
    args = submit_args(tiny_jobs, tmp_path / "run", "refused", "--partition", "no_such_partition")
    result = slurm_cluster.run(*args, check=False)
    assert result.returncode == 1
    assert "sbatch did not accept the job" in result.stderr and "Invalid partition name" in result.stderr
