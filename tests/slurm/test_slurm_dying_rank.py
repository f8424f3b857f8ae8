"""A rank that dies without a word (SIGKILL): the job ends within seconds and every survivor names the dead rank,
not a peer that merely lost its connection to it (real processes over gloo, as srun's tasks run them)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_rlhf.distributed.world import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("jobs") / "dying_rank.py"


def start_ranks(world_size: int, env_extra: dict[str, str], logs: Path) -> list[subprocess.Popen]:
    port = str(free_port())
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    procs = []
    for rank in range(world_size):
        env = {**base, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO_ROOT), **env_extra}
        procs.append(subprocess.Popen([sys.executable, str(WORKER)], env=env, cwd=REPO_ROOT,
                                      stdout=subprocess.DEVNULL, stderr=open(logs / f"err{rank}.log", "w"),
                                      start_new_session=True))
    return procs


@pytest.mark.timeout(150)
def test_survivors_name_the_rank_that_was_killed(tmp_path):
    procs = start_ranks(3, {"DIE_RANK": "2"}, tmp_path)
    try:
        ended = {}
        deadline = time.monotonic() + 120
        while len(ended) < 3 and time.monotonic() < deadline:
            for rank, proc in enumerate(procs):
                if rank not in ended and proc.poll() is not None:
                    ended[rank] = time.monotonic()
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(ended) == 3, "a survivor hung after its peer died"
    assert procs[2].returncode == -9
    assert max(ended.values()) - ended[2] < 20  # the job ended within seconds of the death
    for rank in (0, 1):
        stderr = (tmp_path / f"err{rank}.log").read_text(errors="replace")
        assert procs[rank].returncode == 1, stderr[-3000:]
        assert "rank 2 failed: died without reporting an error" in stderr, stderr[-3000:]
        assert f"[rank {rank}] aborting the job" not in stderr, stderr[-3000:]  # no survivor blames itself
