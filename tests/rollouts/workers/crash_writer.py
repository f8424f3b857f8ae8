"""A shard writer that the crash tests kill with SIGKILL.

python crash_writer.py RUN_DIR stall   write two batches of a shard, touch RUN_DIR/ready, then hang
python crash_writer.py RUN_DIR loop    commit shards forever, touching RUN_DIR/ready after the first
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

from hpc_rlhf.rollouts import ShardWriter, generator_shard_name


def rows(first_group: int, groups: int, response_tokens: int) -> dict[str, list]:
    """Deterministic rows: `groups` groups of 4 samples, each with `response_tokens` tokens."""
    count = groups * 4
    return {
        "prompt_ids": [[1, 2, 3]] * count,
        "response_ids": [list(range(response_tokens))] * count,
        "behaviour_log_probs": [[-0.5] * response_tokens] * count,
        "action_mask": [[1] * response_tokens] * count,
        "prompt_id": [first_group + i // 4 for i in range(count)],
        "group_id": [first_group + i // 4 for i in range(count)],
        "sample_index": [i % 4 for i in range(count)],
        "weight_version": [0] * count,
    }


def stall(run_dir: Path) -> None:
    def batches():
        yield rows(0, 8, 256)
        yield rows(8, 8, 256)
        (run_dir / "ready").touch()
        time.sleep(120)
        yield rows(16, 8, 256)

    ShardWriter(run_dir).write_batches(0, generator_shard_name(0), batches())


def loop(run_dir: Path) -> None:
    writer = ShardWriter(run_dir)
    for index in itertools.count():
        iteration, shard = divmod(index, 4)
        writer.write(iteration, generator_shard_name(shard), rows(shard * 100, 16, 512))
        (run_dir / "ready").touch()


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.mkdir(parents=True, exist_ok=True)
    {"stall": stall, "loop": loop}[sys.argv[2]](target)
