"""The checkpoint service every trainer uses (hpc_rlhf/trainers/checkpointing.py), on one rank without a process
group: what it saves and gives back to the trainer object, when a checkpoint is due, and how a resume check's
refusal reaches the caller. The progress objects of the supervised trainers keep the trainer_state.json keys that
earlier runs wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from hpc_rlhf.config.schema import Config
from hpc_rlhf.trainers.checkpointing import CheckpointService, ResumeRefused
from hpc_rlhf.trainers.common import RoundProgress, StepProgress
from tests.checkpoint.one_rank import OneRank




def config(run_dir: Path, **ckpt: Any) -> Config:
    cfg = Config()
    cfg.train.run_dir = str(run_dir)
    for key, value in ckpt.items():
        setattr(cfg.ckpt, key, value)
    return cfg


def service(cfg: Config, trainer: Any, engines: Optional[dict] = None, check: Any = None) -> CheckpointService:
    return CheckpointService(cfg, rank=0, world_size=1, control=OneRank(), engines=engines or {}, trainer=trainer,
                             resume_check=check)


def test_save_then_restore_gives_the_trainer_its_state_and_the_rng_back(tmp_path):
    cfg = config(tmp_path / "run")
    progress = RoundProgress(next_step=7, round=2, round_start=5)
    path = service(cfg, progress).save(7)
    assert path.name == "iter_000007"
    state = json.loads((path / "trainer_state.json").read_text())
    assert [k for k in state if k != "checkpoint"] == ["round", "round_start", "next_step"]  # the keys runs wrote
    expected = torch.rand(3)
    resumed = RoundProgress()
    assert service(cfg, resumed).resume_state() == {"round": 2, "round_start": 5, "next_step": 7}
    torch.rand(5)
    assert service(cfg, resumed).restore() == path
    assert resumed == progress
    torch.testing.assert_close(torch.rand(3), expected)  # the generators continue where the save left them


def test_a_fresh_start_or_disabled_loading_restores_nothing(tmp_path):
    cfg = config(tmp_path / "run")
    fresh = StepProgress()
    assert service(cfg, fresh).restore() is None and service(cfg, fresh).resume_state() == {}
    service(cfg, StepProgress(next_step=3)).save(3)
    off = config(tmp_path / "run", load_checkpoint=False)
    assert service(off, fresh).restore() is None and fresh.next_step == 0
    assert service(off, fresh).resume_state() == {}


def test_supervised_progress_keeps_the_keys_of_earlier_checkpoints():
    assert StepProgress(next_step=4).state_dict() == {"next_step": 4}
    resumed = RoundProgress()
    resumed.load_state_dict({"next_step": 9})  # a round trainer's state always has the round; defaults otherwise
    assert (resumed.next_step, resumed.round, resumed.round_start) == (9, 0, 0)


@pytest.mark.parametrize(("done", "stop", "every", "due"), [
    (4, False, 2, True), (3, False, 2, False), (3, True, 2, True), (5, False, 0, False), (1, True, 0, True)])
def test_checkpoints_are_due_every_save_steps_and_on_a_stop(tmp_path, done, stop, every, due):
    assert service(config(tmp_path, save_steps=every), StepProgress()).due(done, stop=stop) is due


def test_the_resume_check_sees_the_checkpoint_and_its_refusal_is_raised(tmp_path):
    cfg = config(tmp_path / "run")
    seen = []
    assert service(cfg, StepProgress(), check=seen.append).restore() is None
    path = service(cfg, StepProgress(next_step=2)).save(2)

    def refuse(found: Optional[Path]) -> None:
        seen.append(found)
        raise ResumeRefused(f"cannot resume from {found.name}")

    progress = StepProgress()
    with pytest.raises(ResumeRefused, match="cannot resume from iter_000002"):
        service(cfg, progress, check=refuse).restore()
    assert seen == [None, path] and progress.next_step == 0
