"""One rank of a gloo job that runs the rollout data plane for a few iterations.

Every rank generates its own shard of each iteration concurrently, rank 0 completes the iteration, each
rank then fills the rewards of another rank's shard, and finally every rank reads its partition. Rank 0
writes what all ranks read to OUT_JSON. Started with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set.

    python gloo_rollouts.py RUN_DIR OUT_JSON ITERATIONS
"""

from __future__ import annotations

import json
import os
import random
import sys
from datetime import timedelta

import torch.distributed as dist

from hpc_rlhf.rollouts import RolloutReader, ShardWriter, commit_iteration, generator_shard_name


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


def main() -> None:
    run_dir, out_json, iterations = sys.argv[1], sys.argv[2], int(sys.argv[3])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
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
    if rank == 0:
        with open(out_json + ".tmp", "w") as handle:
            json.dump(gathered, handle)
        os.replace(out_json + ".tmp", out_json)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
