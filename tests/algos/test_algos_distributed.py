"""Whitening and running reward moments over a batch split across two real gloo ranks equal the one-process result."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hpc_rlhf.algos.advantages import compute_advantages
from hpc_rlhf.algos.reward_shaping import RunningMoments

WORKER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    from hpc_rlhf.algos.advantages import compute_advantages
    from hpc_rlhf.algos.reward_shaping import RunningMoments

    def all_reduce(tensor):
        dist.all_reduce(tensor)
        return tensor

    dist.init_process_group("gloo")
    rank, out_dir = dist.get_rank(), sys.argv[1]
    batch = torch.load(f"{out_dir}/batch.pt")
    rows = slice(0, 2) if rank == 0 else slice(2, 8)  # unequal shares; groups of 2 stay whole
    result = compute_advantages(
        "reinforce_baseline", batch["rewards"][rows], batch["mask"][rows], kl=batch["kl"][rows], kl_coef=0.1,
        n_samples_per_prompt=2, all_reduce=all_reduce,
    )
    moments = RunningMoments()
    moments.update(batch["rewards"][rows], all_reduce=all_reduce)
    torch.save({"advantages": result.advantages, "moments": moments.state_dict()}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_whitening_and_moments_over_two_gloo_ranks(tmp_path: Path):
    generator = torch.Generator().manual_seed(0)
    mask = (torch.rand(8, 5, generator=generator) < 0.7).long()
    mask[:, 0] = 1
    batch = {
        "rewards": torch.randn(8, generator=generator, dtype=torch.float64),
        "mask": mask,
        "kl": torch.randn(8, 5, generator=generator, dtype=torch.float64),
    }
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    processes = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), str(tmp_path)],
            env=dict(env, RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=100)[0].decode() for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in processes), "\n".join(outputs)

    expected = compute_advantages(
        "reinforce_baseline", batch["rewards"], mask, kl=batch["kl"], kl_coef=0.1, n_samples_per_prompt=2
    ).advantages
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    torch.testing.assert_close(torch.cat([rank0["advantages"], rank1["advantages"]]), expected)
    moments = RunningMoments()
    moments.update(batch["rewards"])
    for state in (rank0["moments"], rank1["moments"]):
        assert state["count"] == moments.count
        assert state["mean"] == pytest.approx(moments.mean)
        assert state["m2"] == pytest.approx(moments.m2)
