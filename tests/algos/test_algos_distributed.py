"""Whitening and running reward moments over a batch split across two real gloo ranks equal the one-process result."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hpc_rlhf.algos.advantages import compute_advantages
from hpc_rlhf.algos.reward_shaping import RunningMoments
from tests.multiproc import run_ranks


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


def advantages_and_moments_of_my_rows(batch: dict[str, torch.Tensor]) -> dict:
    """One rank's share of the batch: rank 0 takes rows 0-1, rank 1 rows 2-7 (groups of 2 stay whole)."""
    rows = slice(0, 2) if dist.get_rank() == 0 else slice(2, 8)
    result = compute_advantages(
        "reinforce_baseline", batch["rewards"][rows], batch["mask"][rows], kl=batch["kl"][rows], kl_coef=0.1,
        n_samples_per_prompt=2, all_reduce=all_reduce,
    )
    moments = RunningMoments()
    moments.update(batch["rewards"][rows], all_reduce=all_reduce)
    return {"advantages": result.advantages, "moments": moments.state_dict()}


@pytest.mark.timeout(120)
def test_whitening_and_moments_over_two_gloo_ranks():
    generator = torch.Generator().manual_seed(0)
    mask = (torch.rand(8, 5, generator=generator) < 0.7).long()
    mask[:, 0] = 1
    batch = {
        "rewards": torch.randn(8, generator=generator, dtype=torch.float64),
        "mask": mask,
        "kl": torch.randn(8, 5, generator=generator, dtype=torch.float64),
    }
    rank0, rank1 = run_ranks(advantages_and_moments_of_my_rows, 2, batch, timeout_s=100)

    expected = compute_advantages(
        "reinforce_baseline", batch["rewards"], mask, kl=batch["kl"], kl_coef=0.1, n_samples_per_prompt=2
    ).advantages
    torch.testing.assert_close(torch.cat([rank0["advantages"], rank1["advantages"]]), expected)
    moments = RunningMoments()
    moments.update(batch["rewards"])
    for state in (rank0["moments"], rank1["moments"]):
        assert state["count"] == moments.count
        assert state["mean"] == pytest.approx(moments.mean)
        assert state["m2"] == pytest.approx(moments.m2)
