"""A GRPO run resumed on another number of ranks (`layout.scale: proportional`, `ds.universal_ckpt`): real jobs of
3, then 2, then 3 colocated ranks, one iteration each, each resuming from the checkpoint the previous one left.

Each job re-plans its layout for its ranks (3 or 2 generator engines and actor partitions), resumes at the next
iteration (none repeated, none lost: one training row per iteration, in order), reads rollouts whatever engine count
wrote them, and draws the same prompts for an iteration as the 3-rank layout does (the prompts of an iteration are
a pure function of the seed and the iteration).
"""

from __future__ import annotations

import json

import pytest

from hpc_rlhf.data.sharding import prompt_indices_for
from hpc_rlhf.rollouts import RolloutReader, iterations_completed

SCALED = ["--layout.scale=proportional", "--ds.universal_ckpt=true", "--ckpt.save_steps=1",
          "--rollout.batch_size=6", "--train.train_batch_size=12"]  # 6 prompts x 2 samples: divisible by 2 and 3
LEGS = [(3, 1), (2, 2), (3, 3)]  # (ranks, iterations trained when the job ends)
NUM_PROMPTS, SEED = 3000, 42  # data/arithmetic/train.jsonl, train.seed
pytestmark = pytest.mark.slow


@pytest.mark.timeout(400)
def test_run_resumes_on_fewer_then_more_ranks(tmp_path, jobs):
    run_dir = tmp_path / "run"
    outputs = [jobs.run(run_dir, *SCALED, f"--slurm.gpus_per_node={ranks}", f"--train.max_iterations={total}")
               for ranks, total in LEGS]

    assert "layout for 1 node x 3 = 3 ranks: colocated, every rank is generator, actor" in outputs[0].stdout
    for output, (ranks, total) in zip(outputs[1:], LEGS[1:]):
        assert f"layout for 1 node x {ranks} = {ranks} ranks" in output.stdout
        assert f"resumed from {run_dir / 'checkpoints' / f'iter_{total - 1:06d}'}" in output.stdout
        assert "converted to DeepSpeed's universal form" in output.stdout
    saved = [json.loads((run_dir / "checkpoints" / f"iter_{it:06d}" / "trainer_state.json").read_text())
             for it in (1, 2, 3)]
    assert [s["checkpoint"]["world_size"] for s in saved] == [3, 2, 3]
    assert [s["next_iteration"] for s in saved] == [1, 2, 3] and [s["weight_version"] for s in saved] == [1, 2, 3]
    assert [s["generator_engines"] for s in saved] == [3, 2, 3]

    trained = [row for row in jobs.metrics(run_dir) if "train/policy_loss" in row]
    assert [row["step"] for row in trained] == [0, 1, 2], "each iteration trained once, in order"
    assert all(jobs.finite(row["train/policy_loss"]) for row in trained)

    assert iterations_completed(run_dir) == [0, 1, 2]
    reader = RolloutReader(run_dir)
    shards = [reader.manifest(it).shard_names for it in range(3)]
    assert [len(names) for names in shards] == [3, 2, 3]
    for iteration in range(3):
        table = reader.read(iteration, require_filled=["reward"])
        assert table.num_rows == 12 and set(table.column("weight_version").to_pylist()) == {iteration}
        # the prompts of the iteration are those the 3-rank layout draws, however many engines drew them
        prompts = sorted(i for e in range(3) for i in prompt_indices_for(
            NUM_PROMPTS, seed=SEED, epoch=0, iteration=iteration, rollout_batch_size=6, rank=e, num_ranks=3))
        assert sorted(set(table.column("prompt_id").to_pylist())) == prompts
        # every rank of the next job reads its share of it: the shares cover the iteration once
        halves = [reader.read(iteration, rank=r, world_size=2).num_rows for r in range(2)]
        assert sum(halves) == 12
