"""Four gloo ranks write shards of one iteration concurrently, fill each other's rewards and read partitions."""

from __future__ import annotations

import random

import pytest
import torch.distributed as dist

from hpc_rlhf.rollouts import RolloutReader, ShardWriter, commit_iteration, generator_shard_name
from tests.multiproc import run_ranks

WORLD_SIZE = 4
ITERATIONS = 3


def _expected_samples(iteration: int) -> list[list]:
    """[group, sample, reward, weight_version] of every sample, derived from the worker's generation rule."""
    samples = []
    for group in range(3 * WORLD_SIZE):
        for sample in range(group % 3 + 2):
            length = (group + sample + iteration) % 5 + 1
            samples.append([group, sample, float(length) + 0.5 * group, iteration])
    return samples


def generated_rows(rank: int, world_size: int, iteration: int) -> list[dict]:
    """Rank r generates groups r, r + w, r + 2w (group g has g % 3 + 2 samples), in a shuffled order."""
    rows = []
    for group in range(rank, 3 * world_size, world_size):
        for sample in range(group % 3 + 2):
            length = (group + sample + iteration) % 5 + 1
            rows.append(
                {
                    "prompt_ids": [group, 7],
                    "response_ids": list(range(length)),
                    "behaviour_log_probs": [-0.25] * length,
                    "action_mask": [1] * length,
                    "prompt_id": 1000 + group,
                    "group_id": group,
                    "sample_index": sample,
                    "weight_version": iteration,
                }
            )
    random.Random(rank * 100 + iteration).shuffle(rows)
    return rows


def share_iterations(run_dir: str, iterations: int) -> dict[int, list]:
    """One rank: per iteration, write its shard; rank 0 completes the iteration; fill the rewards of the next
    rank's shard; read its partition. Returns what every rank read, per iteration."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    writer, reader = ShardWriter(run_dir), RolloutReader(run_dir)
    shards = [generator_shard_name(r) for r in range(world_size)]
    gathered = {}
    for iteration in range(iterations):
        writer.write(iteration, shards[rank], generated_rows(rank, world_size, iteration))
        dist.barrier()
        if rank == 0:
            commit_iteration(run_dir, iteration, shards)
        dist.barrier()
        target = shards[(rank + 1) % world_size]
        table = reader.read_shard(iteration, target)
        rewards = [
            float(len(ids)) + 0.5 * group
            for ids, group in zip(table.column("response_ids").to_pylist(), table.column("group_id").to_pylist())
        ]
        writer.write_columns(iteration, target, "rewards", {"reward": rewards})
        dist.barrier()
        part = reader.read(iteration, rank=rank, world_size=world_size, require_filled=["reward"])
        mine = [
            [g, s, r, v]
            for g, s, r, v in zip(
                *(part.column(c).to_pylist() for c in ("group_id", "sample_index", "reward", "weight_version"))
            )
        ]
        everyone = [None] * world_size
        dist.all_gather_object(everyone, mine)
        gathered[iteration] = everyone
    return gathered


@pytest.mark.timeout(150)
def test_four_gloo_ranks_share_iterations_through_shards(tmp_path):
    run_dir = tmp_path / "run"
    gathered = run_ranks(share_iterations, WORLD_SIZE, str(run_dir), ITERATIONS, timeout_s=120)[0]

    assert sorted(gathered) == list(range(ITERATIONS))
    for iteration in range(ITERATIONS):
        per_rank = gathered[iteration]
        # every sample exactly once, in (group, sample) order across ranks, with the reward another rank filled
        assert [s for part in per_rank for s in part] == _expected_samples(iteration)
        owners = {}
        for rank, part in enumerate(per_rank):
            for group, *_ in part:
                assert owners.setdefault(group, rank) == rank, f"group {group} split across ranks"
        assert [len({g for g, *_ in part}) for part in per_rank] == [3] * WORLD_SIZE  # 12 groups / 4 ranks

    directory = run_dir / "rollouts" / "iter_000000"
    names = sorted(p.name for p in directory.iterdir())
    assert "MANIFEST.json" in names and not [n for n in names if n.startswith(".")]
    assert len([n for n in names if n.endswith(".rewards.commit.json")]) == WORLD_SIZE
