"""The checkpoint service every trainer uses: what a checkpoint holds, when one is due, and how a run resumes.

A checkpoint (the layout of `hpc_rlhf.run.checkpoint`, under RUN_DIR/checkpoints) holds the training engines (weights,
optimizer and scheduler states), every rank's RNG state and the trainer's own state: what the trainer object's
`state_dict()` returns (JSON-serialisable), given back to its `load_state_dict()` on resume. Global rank 0 picks the
checkpoint and runs the trainer's resume check (the PPO family checks its rollouts on disk) before any rank loads,
so every rank loads the same checkpoint, or every rank refuses with the same error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional, Protocol

from hpc_rlhf.run.checkpoint import (
    config_fingerprint,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from hpc_rlhf.config.schema import Config
from hpc_rlhf.config.loading import config_to_dict
from hpc_rlhf.distributed import ControlPlane
from hpc_rlhf.training.models import _TrainedModel as TrainedModel

CHECKPOINTS_DIR = "checkpoints"


class Stateful(Protocol):
    """A trainer's own state in checkpoints: a JSON-serialisable dict out, the same dict back in."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class ResumeRefused(RuntimeError):
    """A resume check found that the run must not resume as it stands; the message says what to do."""


# Runs on global rank 0 before any rank loads, with the checkpoint a resume would load (None: a fresh start). It may
# repair what it can and print what it did; it raises ResumeRefused (or a subclass) when the run must not go on.
ResumeCheck = Callable[[Optional[Path]], None]


class CheckpointService:
    """Saves and restores one trainer's engines, RNG states and trainer state; every rank calls `save` and `restore`
    at the same points. `engines` maps a checkpoint folder name to what this rank holds (None: not on this rank)."""

    def __init__(self, cfg: Config, *, rank: int, world_size: int, control: ControlPlane,
                 engines: Mapping[str, Optional[TrainedModel]], trainer: Stateful,
                 resume_check: Optional[ResumeCheck] = None) -> None:
        self.root = Path(cfg.train.run_dir) / CHECKPOINTS_DIR
        self.rank = rank
        self.world_size = world_size
        self.control = control
        self.engines = {name: engine for name, engine in engines.items() if engine is not None}
        self.trainer = trainer
        self.resume_check = resume_check
        self.load_enabled = cfg.ckpt.load_checkpoint
        self.save_steps = cfg.ckpt.save_steps
        self.keep_last = cfg.ckpt.max_ckpt_num
        self.fingerprint = config_fingerprint(config_to_dict(cfg))

    def resume_state(self) -> dict[str, Any]:
        """The trainer state a resume would load, read without loading anything ({} for a fresh start); e.g. the
        first step, for the progress bar."""
        if not self.load_enabled:
            return {}
        path = latest_checkpoint(self.root)
        return read_trainer_state(path) if path is not None else {}

    def due(self, done: int, *, stop: bool) -> bool:
        """Whether to checkpoint once `done` steps (or iterations) are trained: on a stop, and every
        ckpt.save_steps."""
        return stop or (self.save_steps > 0 and done % self.save_steps == 0)

    def save(self, step: int) -> Path:
        """A complete checkpoint named after `step`, the first step (or iteration) a resumed run trains."""
        return save_checkpoint(self.root, step, rank=self.rank, world_size=self.world_size,
                               barrier=self.control.barrier, engines=self.engines,
                               trainer_state=self.trainer.state_dict(), config_fingerprint=self.fingerprint,
                               keep_last=self.keep_last)

    def restore(self) -> Optional[Path]:
        """Load the newest complete checkpoint into the engines, the RNG states and the trainer; returns its path,
        or None for a fresh start (no checkpoint, or ckpt.load_checkpoint off)."""
        if not self.load_enabled:
            return None
        path = latest_checkpoint(self.root)
        refusal: Optional[ResumeRefused] = None
        if self.rank == 0 and self.resume_check is not None:
            try:
                self.resume_check(path)
            except ResumeRefused as error:
                refusal = error
        # Rank 0 decides, so all ranks load the same checkpoint even if a shared filesystem lags somewhere.
        chosen, refusal = self.control.broadcast_object((str(path) if path is not None else None, refusal), src=0)
        if refusal is not None:
            raise refusal
        if chosen is None:
            return None
        state = load_checkpoint(Path(chosen), rank=self.rank, engines=self.engines,
                                config_fingerprint=self.fingerprint)
        self.trainer.load_state_dict(state)
        return Path(chosen)
