"""A run that moves between allocations on the local SLURM cluster: sbatch/tiny_cpu_3node.sh with a colocated,
proportionally scaled layout and DeepSpeed's universal checkpoint, submitted on 3 nodes (one iteration, checkpoint,
end), again on 2 nodes, again on 3, and last with the node range `--nodes=2-3`.

Every job re-plans the layout for the ranks SLURM gave it (3, 2, 3 generator engines and actor partitions), resumes
from the checkpoint the previous one left (converted to the universal form), and trains the next iteration: the run
ends with 4 iterations, each trained once, each with all its rows, written by as many generator shards as its job had
nodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpc_rlhf.builtin_models.resolve import resolve_model_path
from hpc_rlhf.rollouts import RolloutReader, iterations_completed

pytestmark = pytest.mark.slurm

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "sbatch" / "tiny_cpu_3node.sh"
SAMPLES = 6 * 2  # rollout.batch_size x n_samples_per_prompt: split evenly over 2 and 3 engines and partitions
OVERRIDES = [
    "--layout.colocate=true", "--layout.generator.gpus=3", "--layout.actor.gpus=3", "--layout.scale=proportional",
    "--slurm.nodes=3", "--slurm.min_nodes=2", "--slurm.gpus_per_node=1", "--slurm.cpus_per_task=1",
    "--ds.zero_stage=2", "--ds.universal_ckpt=true", "--ckpt.save_steps=1", "--ckpt.save_hf_model=false",
    "--rollout.batch_size=6", "--rollout.n_samples_per_prompt=2", "--rollout.micro_batch_size=8",
    "--rollout.generate_max_len=4", "--train.train_batch_size=12", "--train.micro_train_batch_size=2",
    "--eval.data=", "--logger.use_tensorboard=false", "--logger.plot=false", "--logger.progress_bar=false",
]
# (sbatch --nodes, iterations when the job ends); the range takes 2 or 3 nodes, whichever SLURM can give at once
JOBS = [("--nodes=3", 1), ("--nodes=2", 2), ("--nodes=3", 3), ("--nodes=2-3", 4)]


@pytest.mark.timeout(900)
def test_run_moves_from_three_nodes_to_two_and_back(slurm_cluster, tmp_path):
    resolve_model_path("builtin:tiny-llama-arith")  # built once here rather than by the first job's rank 0
    run_dir = tmp_path / "run"
    got = []
    for number, (nodes, iterations) in enumerate(JOBS):
        log = tmp_path / f"job{number}.out"
        job_id = slurm_cluster.sbatch(f"--chdir={REPO_ROOT}", f"--output={log}", nodes, "--ntasks-per-node=1",
                                      "--cpus-per-task=1", "--time=10", str(SCRIPT), *OVERRIDES,
                                      f"--train.max_iterations={iterations}", f"--train.run_dir={run_dir}")
        try:
            record = slurm_cluster.wait_for_state(job_id, {"COMPLETED"}, timeout_s=280, log=log)
        finally:
            slurm_cluster.cancel(job_id)
        got.append(int(record["NumNodes"]))
        assert record["NumTasks"] == record["NumNodes"], record
        output = slurm_cluster.read_output(log)
        ranks = got[-1]
        assert f"layout for {ranks} nodes x 1 = {ranks} ranks: colocated, every rank is generator, actor" in output, \
            output[-3000:]
        if number:
            assert f"resumed from {run_dir / 'checkpoints' / f'iter_{iterations - 1:06d}'}" in output, output[-3000:]
            assert "converted to DeepSpeed's universal form" in output, output[-3000:]

    assert got[:3] == [3, 2, 3] and got[3] in (2, 3), got
    saved = [json.loads((run_dir / "checkpoints" / f"iter_{it:06d}" / "trainer_state.json").read_text())
             for it in (2, 3, 4)]  # ckpt.max_ckpt_num: the newest 3
    assert [s["checkpoint"]["world_size"] for s in saved] == got[1:] == [s["generator_engines"] for s in saved]
    assert [s["next_iteration"] for s in saved] == [2, 3, 4]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = [row for row in rows if "train/policy_loss" in row]
    assert [row["step"] for row in trained] == [0, 1, 2, 3], "each iteration trained once, in order"
    assert sum(row.get("count/generate_samples", 0) for row in rows) == 4 * SAMPLES, "each sample generated once"
    assert iterations_completed(run_dir) == [0, 1, 2, 3]
    reader = RolloutReader(run_dir)
    assert [len(reader.manifest(it).shard_names) for it in range(4)] == got
    for iteration in range(4):
        table = reader.read(iteration, require_filled=["reward"])
        assert table.num_rows == SAMPLES and set(table.column("weight_version").to_pylist()) == {iteration}

