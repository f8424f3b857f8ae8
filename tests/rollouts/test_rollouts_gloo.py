"""Four gloo ranks write shards of one iteration concurrently, fill each other's rewards and read partitions."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

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


@pytest.mark.timeout(150)
def test_four_gloo_ranks_share_iterations_through_shards(python, workers_dir, tmp_path, subprocess_env, free_port):
    run_dir, out_json = tmp_path / "run", tmp_path / "gathered.json"
    processes = []
    for rank in range(WORLD_SIZE):
        env = dict(
            subprocess_env,
            RANK=str(rank),
            WORLD_SIZE=str(WORLD_SIZE),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port),
        )
        command = [python, str(workers_dir / "gloo_rollouts.py"), str(run_dir), str(out_json), str(ITERATIONS)]
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    deadline = time.monotonic() + 120
    outputs = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(output)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [p.returncode for p in processes] == [0] * WORLD_SIZE, "\n".join(outputs)

    gathered = json.loads(out_json.read_text())
    assert sorted(gathered) == [str(i) for i in range(ITERATIONS)]
    for iteration in range(ITERATIONS):
        per_rank = gathered[str(iteration)]
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
