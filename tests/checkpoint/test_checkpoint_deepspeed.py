"""Bit-exact resume of real DeepSpeed engines (ZeRO-2 and ZeRO-3, 2 gloo ranks on the CPU).

One job trains a tiny Llama 3 steps, checkpoints, and trains 3 more; a second job of fresh processes seeds every
generator differently, loads the checkpoint and trains the same 3 steps. Batches are drawn from python, numpy and torch
generators, so parameters, optimizer and scheduler states, losses and later random draws agree only if the engine
states and every rank's generator states came back exactly. A third run loads without the generator states and must
not agree, which shows the comparison can fail.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.multiproc import run_ranks

WORLD_SIZE = 2
STAGES = (2, 3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run both jobs once for the module; returns the folder holding their per-rank records."""
    from tests.checkpoint.workers.deepspeed_resume import run_tasks  # imports DeepSpeed: only when these tests run

    out = tmp_path_factory.mktemp("deepspeed_resume")
    for tasks in ([f"first:{s}" for s in STAGES], [f"resume:{s}" for s in STAGES] + ["resume_no_rng:2"]):
        run_ranks(run_tasks, WORLD_SIZE, str(out), tasks, timeout_s=75, init_process_group=False)
    return out


def _record(out: Path, mode: str, stage: int, rank: int) -> dict:
    return torch.load(out / f"{mode}_stage{stage}_rank{rank}.pt", map_location="cpu", weights_only=False)


@pytest.mark.timeout(170)
@pytest.mark.parametrize("stage", STAGES)
def test_resumed_deepspeed_run_matches_uninterrupted_run(runs: Path, stage: int, same) -> None:
    for rank in range(WORLD_SIZE):
        first, resumed = _record(runs, "first", stage, rank), _record(runs, "resume", stage, rank)
        assert len(first["params"]) == 21  # embeddings, 2 x (4 attention + 3 MLP + 2 norms), final norm, lm head
        for name, weights in first["params"].items():
            assert not torch.equal(weights, first["params_at_save"][name]) or "norm" in name, \
                f"{name} did not change after the save: the comparison would be vacuous"
            assert torch.equal(weights, resumed["params"][name]), f"rank {rank}: parameter {name} differs"
        same(first["optimizer"], resumed["optimizer"], f"rank {rank} optimizer")
        same(first["scheduler"], resumed["scheduler"], f"rank {rank} scheduler")
        assert first["scheduler"] == {"last_batch_iteration": 5}
        assert first["global_steps"] == resumed["global_steps"] == 6
        assert first["losses"] == resumed["losses"]
        same(first["draws"], resumed["draws"], f"rank {rank} random draws")


@pytest.mark.timeout(170)
def test_ranks_keep_their_own_generator_states(runs: Path) -> None:
    draws = [_record(runs, "resume", 2, rank)["draws"] for rank in range(WORLD_SIZE)]
    assert draws[0]["python"] != draws[1]["python"]
    assert not torch.equal(draws[0]["torch"], draws[1]["torch"])


@pytest.mark.timeout(170)
def test_resume_without_generator_states_diverges(runs: Path) -> None:
    first, control = _record(runs, "first", 2, 0), _record(runs, "resume_no_rng", 2, 0)
    assert first["losses"] != control["losses"]
    assert any(not torch.equal(first["params"][n], control["params"][n]) for n in first["params"])


@pytest.mark.timeout(170)
@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_checkpoint_layout(runs: Path, stage: int) -> None:
    ckpt = runs / f"stage{stage}" / "checkpoints" / "iter_000003"
    assert (ckpt / "COMPLETE").is_file()
    assert (ckpt.parent / "latest").read_text().strip() == "iter_000003"
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["rank_00000.pt", "rank_00001.pt"]
    shards = sorted(p.name for p in (ckpt / "actor" / "iter_000003").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not [p for p in ckpt.parent.iterdir() if ".tmp-" in p.name or p.name == "in_progress"]
