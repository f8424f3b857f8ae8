"""The 8-rank PPO layout of configs/ppo_7b_8gpu.yaml, with the reference sharing the reward model's rank, as a real
job on the local SLURM cluster: sbatch/ppo_7b_8gpu.sh on 2 nodes x 4 CPU processes with the tiny model, stopped
mid-run (USR1 to the batch shell), checkpointed, requeued and resumed.

On CPU the hf backend has no tensor parallelism, so the generator is 4 engines x TP1; the rest is the config's shape:
actor 2 ranks (ZeRO-3), critic 1, reward 1 with the reference on the same rank (ranks 0-3 on node 1, 4-7 on node 2).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from hpc_rlhf.rollouts import RolloutReader
from hpc_rlhf.builtin_models.resolve import resolve_model_path

pytestmark = pytest.mark.slurm

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "sbatch" / "ppo_7b_8gpu.sh"
ITERATIONS = 16
PROMPTS_PER_ITERATION = 4  # rollout.batch_size x n_samples_per_prompt (1), one prompt per engine
RESUMED = re.compile(r"resumed from \S*/checkpoints/iter_(\d+)")
# The allocation on the test cluster: 2 nodes x 4 tasks, no exclusive GPUs needed (fake ones are there anyway).
SBATCH_OPTIONS = ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=1", "--time=10"]
# The config's model paths and GPU settings replaced by the tiny CPU equivalents; everything else stays as shipped.
CPU_OVERRIDES = [
    "--slurm.nodes=2", "--slurm.gpus_per_node=4", "--slurm.cpus_per_task=1",
    "--train.device=cpu", "--vllm.backend=hf", "--layout.generator.tp=1", "--ds.bf16=false", "--ds.adam_offload=false",
    "--actor.pretrain=builtin:tiny-llama-arith", "--critic.pretrain=builtin:tiny-llama-arith/reward",
    "--reward.pretrain=builtin:tiny-llama-arith/reward",
    "--actor.attn_implementation=eager", "--critic.attn_implementation=eager",
    "--actor.gradient_checkpointing=false", "--critic.gradient_checkpointing=false",
    "--actor.learning_rate=1e-4", "--actor.lr_warmup_ratio=0", "--critic.lr_warmup_ratio=0",
    "--data.prompt_data=data/arithmetic/train.jsonl", "--data.input_key=input", "--data.label_key=label",
    "--data.apply_chat_template=false",
    "--rollout.batch_size=4", "--rollout.micro_batch_size=8", "--rollout.prompt_max_len=32",
    "--rollout.generate_max_len=4", "--train.train_batch_size=4", "--train.micro_train_batch_size=2",
    f"--train.max_iterations={ITERATIONS}",
    "--ckpt.save_hf_model=false", "--logger.use_tensorboard=false", "--logger.plot=false",
    "--logger.progress_bar=false",
]


def commit(run_dir: Path, iteration: int, name: str) -> dict:
    """The commit record of a shard (`generator_0002`) or column shard (`generator_0002.reference`)."""
    return json.loads((run_dir / "rollouts" / f"iter_{iteration:06d}" / f"{name}.commit.json").read_text())


def writers(run_dir: Path, iteration: int, stage: str) -> set[int]:
    """The processes that committed `stage` ('' = the generated shards) for the iteration's four shards."""
    suffix = f".{stage}" if stage else ""
    return {commit(run_dir, iteration, f"generator_{shard:04d}{suffix}")["pid"] for shard in range(4)}


@pytest.mark.timeout(420)
def test_reference_sharing_the_reward_rank_runs_stops_and_resumes_on_two_nodes(slurm_cluster, tmp_path):
    for spec in ("builtin:tiny-llama-arith", "builtin:tiny-llama-arith/reward"):
        resolve_model_path(spec)  # built once here rather than by the job's rank 0
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    submitted = slurm_cluster.run("sbatch", "--parsable", f"--chdir={REPO_ROOT}", f"--output={log}", *SBATCH_OPTIONS,
                                  str(SCRIPT), *CPU_OVERRIDES, f"--train.run_dir={run_dir}")
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        slurm_cluster.wait_for_path(run_dir / "rollouts" / "iter_000001" / "MANIFEST.json", timeout_s=180,
                                    job_id=job_id)
        slurm_cluster.signal_batch(job_id, "USR1")
        record = slurm_cluster.wait_for_state(job_id, {"COMPLETED"}, timeout_s=200, min_restarts=1, log=log)
    finally:
        slurm_cluster.cancel(job_id)  # a no-op once the job has completed
    output = slurm_cluster.read_output(log)
    assert record["NumNodes"] == "2" and record["NumTasks"] == "8" and record["Restarts"] == "1", record

    # stopped mid-run at a checkpoint, requeued once, resumed from that checkpoint
    assert "stopped after a checkpoint (stop flag)" in output, output[-4000:]
    resumed = [int(found) for found in RESUMED.findall(output)]
    assert len(resumed) == 1 and 0 < resumed[0] < ITERATIONS, output[-4000:]
    start = resumed[0]
    assert (run_dir / "checkpoints" / f"iter_{start:06d}").is_dir()

    # iteration numbers continue: one metrics row per iteration, nothing trained or generated twice
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [row["step"] for row in rows] == list(range(ITERATIONS))
    assert sum(row["count/generate_samples"] for row in rows) == ITERATIONS * PROMPTS_PER_ITERATION
    for row in rows:
        for key in ("rollout/reward_mean", "rollout/kl", "train/loss", "train/grad_norm", "critic/value_loss",
                    "critic/grad_norm"):
            assert key in row and math.isfinite(row[key]), (row["step"], key, row.get(key))
    assert any(row["rollout/kl"] != 0.0 for row in rows[1:])  # the reference really is a separate, frozen model

    first_run, second_run = writers(run_dir, 0, ""), writers(run_dir, ITERATIONS - 1, "")
    assert len(first_run) == len(second_run) == 4 and not first_run & second_run  # 4 engines, new processes
    for iteration in range(ITERATIONS):
        generators = writers(run_dir, iteration, "")
        assert generators == (first_run if iteration < start else second_run), iteration  # generated exactly once
        # reward and reference columns of all four shards come from one process: the rank holding both roles
        reward_rank, reference_rank = writers(run_dir, iteration, "rewards"), writers(run_dir, iteration, "reference")
        critic_rank = writers(run_dir, iteration, "values")
        assert len(reward_rank) == 1 and reward_rank == reference_rank, (iteration, reward_rank, reference_rank)
        assert not reward_rank & (critic_rank | generators)
        table = RolloutReader(run_dir).read(iteration, require_filled=["reward", "reference_log_probs", "values"])
        assert table.num_rows == PROMPTS_PER_ITERATION
        assert all(math.isfinite(value) for value in table.column("reward").to_pylist())
        log_probs = [value for sample in table.column("reference_log_probs").to_pylist() for value in sample]
        assert log_probs and all(math.isfinite(value) and value <= 0.0 for value in log_probs)
