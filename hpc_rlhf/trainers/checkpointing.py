"""The checkpoint service every trainer uses: what a checkpoint holds, when one is due, and how a run resumes.

A checkpoint (the layout of `hpc_rlhf.run.checkpoint`, under RUN_DIR/checkpoints) holds the training engines (weights,
optimizer and scheduler states), every rank's RNG state and the trainer's own state: what the trainer object's
`state_dict()` returns (JSON-serialisable), given back to its `load_state_dict()` on resume. Global rank 0 picks the
checkpoint and runs the trainer's resume check (the PPO family checks its rollouts on disk) before any rank loads,
so every rank loads the same checkpoint, or every rank refuses with the same error.

A job may resume on another number of ranks (`layout.scale: proportional`, e.g. a requeue on fewer nodes): with
`ds.universal_ckpt` global rank 0 first converts the checkpoint's ZeRO-partitioned engines to DeepSpeed's universal
form (`hpc_rlhf.run.universal`), which every rank then loads into its own partitioning; without it such a resume is
refused with the key to set. A rank that exists in both jobs restores its RNG state; a rank the saving job did not
have keeps the state it was seeded with at start (train.seed), and states of ranks gone are not used.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

from hpc_rlhf.run.checkpoint import (
    config_fingerprint,
    latest_checkpoint,
    load_checkpoint,
    read_metadata,
    read_trainer_state,
    save_checkpoint,
)
from hpc_rlhf.run.universal import convert_checkpoint, saved_partitions
from hpc_rlhf.run.durable import atomic_write_bytes, fsync_dir
from hpc_rlhf.config.schema import Config
from hpc_rlhf.config.loading import config_to_dict
from hpc_rlhf.distributed import ControlPlane
from hpc_rlhf.training.models import TrainedModel

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"  # RUN_DIR/hf/best: the model of the best evaluation so far (ckpt.best_metric_key)
BEST_CANDIDATE_DIR = "best.candidate"  # RUN_DIR/hf/best.candidate: a model written before its evaluation is known
BEST_FILE = "best.json"  # RUN_DIR/best.json: {"metric", "mode", "step", "value"} of RUN_DIR/hf/best
BEST_STATE_KEY = "best_metric"  # the tracker's entry in the checkpoints' trainer state


class Stateful(Protocol):
    """A trainer's own state in checkpoints: a JSON-serialisable dict out, the same dict back in."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class ResumeRefused(RuntimeError):
    """A resume check found that the run must not resume as it stands; the message says what to do."""


# Runs on global rank 0 before any rank loads, with the checkpoint a resume would load (None: a fresh start). It may
# repair what it can and print what it did; it raises ResumeRefused (or a subclass) when the run must not go on.
ResumeCheck = Callable[[Optional[Path]], None]


def improves(value: float, best: Optional[float], mode: str) -> bool:
    """Whether an evaluation's `value` beats the `best` so far (None: no evaluation yet) when `mode` is max (larger is
    better) or min; ties and NaN do not improve."""
    if mode not in ("max", "min"):
        raise ValueError(f"best_mode must be max or min, got {mode!r}")
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if mode == "max" else value < best


@dataclass
class BestMetric:
    """The best value of one evaluation metric so far and the step it was reached at (part of every checkpoint)."""

    key: str
    mode: str = "max"
    value: Optional[float] = None
    step: Optional[int] = None

    def offer(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Record `metrics[key]` of the evaluation after `step` steps when it improves; returns whether it did."""
        if self.key not in metrics:
            raise KeyError(f"ckpt.best_metric_key {self.key!r} is not among the evaluation metrics "
                           f"{sorted(k for k in metrics if k.startswith('eval/'))}")
        value = float(metrics[self.key])
        if not improves(value, self.value, self.mode):
            return False
        self.value, self.step = value, step
        return True

    def record(self) -> dict[str, Any]:
        return {"metric": self.key, "mode": self.mode, "step": self.step, "value": self.value}

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key, "mode": self.mode, "value": self.value, "step": self.step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take the saved best unless it tracked another metric or direction (then start afresh)."""
        if state.get("key") == self.key and state.get("mode") == self.mode:
            self.value, self.step = state.get("value"), state.get("step")


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
        self.universal = cfg.ds.universal_ckpt
        self.save_steps = cfg.ckpt.save_steps
        self.keep_last = cfg.ckpt.max_ckpt_num
        self.fingerprint = config_fingerprint(config_to_dict(cfg))
        self.hf_root = Path(cfg.train.run_dir) / "hf"
        self.best = BestMetric(cfg.ckpt.best_metric_key, cfg.ckpt.best_mode) if cfg.ckpt.best_metric_key else None

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
                               trainer_state=self._trainer_state(), config_fingerprint=self.fingerprint,
                               keep_last=self.keep_last)

    def _trainer_state(self) -> dict[str, Any]:
        state = self.trainer.state_dict()
        if self.best is not None:
            state[BEST_STATE_KEY] = self.best.state_dict()
        return state

    def keep_if_best(self, step: int, metrics: Mapping[str, float], write_model: Callable[[Path], None]) -> bool:
        """After an evaluation (the same `metrics` on every rank; all ranks call): when ckpt.best_metric_key improved,
        `write_model(folder)` writes the evaluated model (ranks without it do nothing), which becomes RUN_DIR/hf/best,
        and RUN_DIR/best.json records {step, value}. Returns whether it improved (False when tracking is off)."""
        if self.best is None or not self.best.offer(step, metrics):
            return False
        if self.rank == 0:  # what an interrupted write may have left
            shutil.rmtree(self.best_candidate_dir, ignore_errors=True)
        self.control.barrier()
        write_model(self.best_candidate_dir)
        self.promote_best_candidate()
        return True

    def promote_best_candidate(self) -> None:
        """Make RUN_DIR/hf/best.candidate the best model and write best.json (global rank 0; all ranks call, after the
        candidate is written)."""
        self.control.barrier()
        if self.rank == 0:
            candidate, best = self.best_candidate_dir, self.hf_root / BEST_DIR
            old = self.hf_root / f"{BEST_DIR}.old"
            shutil.rmtree(old, ignore_errors=True)
            if best.exists():
                os.replace(best, old)
            os.replace(candidate, best)
            fsync_dir(self.hf_root)
            shutil.rmtree(old, ignore_errors=True)
            final = Path(self.hf_root.parent) / BEST_FILE
            atomic_write_bytes(final, (json.dumps(self.best.record(), indent=2) + "\n").encode(),
                               final.with_name(f"{BEST_FILE}.tmp-{os.getpid()}"))
        self.control.barrier()

    def settle_best_candidate(self, step: int, metrics: Mapping[str, float]) -> bool:
        """For a model written to `best_candidate_dir` before its evaluation ran (the PPO loop evaluates the weights
        the actor held before the iteration it then trains): promote it when the evaluation improved, else remove it;
        all ranks call with the same metrics. Returns whether it improved."""
        if self.best is None:
            return False
        if self.best.offer(step, metrics):
            self.promote_best_candidate()
            return True
        if self.rank == 0:
            shutil.rmtree(self.best_candidate_dir, ignore_errors=True)
        self.control.barrier()  # the actor writes the next candidate only after this one is gone
        return False

    @property
    def best_candidate_dir(self) -> Path:
        return self.hf_root / BEST_CANDIDATE_DIR

    def restore(self) -> Optional[Path]:
        """Load the newest complete checkpoint into the engines, the RNG states and the trainer; returns its path,
        or None for a fresh start (no checkpoint, or ckpt.load_checkpoint off)."""
        if not self.load_enabled:
            return None
        path = latest_checkpoint(self.root)
        refusal: Optional[ResumeRefused] = None
        if self.rank == 0:
            try:
                if self.resume_check is not None:
                    self.resume_check(path)
                if path is not None:
                    self._prepare_partitions(path)
            except ResumeRefused as error:
                refusal = error
        # Rank 0 decides, so all ranks load the same checkpoint even if a shared filesystem lags somewhere.
        chosen, refusal = self.control.broadcast_object((str(path) if path is not None else None, refusal), src=0)
        if refusal is not None:
            raise refusal
        if chosen is None:
            return None
        saved_world = int(read_metadata(chosen).get("world_size", self.world_size))
        state = load_checkpoint(Path(chosen), rank=self.rank, engines=self.engines,
                                config_fingerprint=self.fingerprint, restore_rng=self.rank < saved_world,
                                universal=self.universal)
        self.trainer.load_state_dict(state)
        if self.best is not None:
            self.best.load_state_dict(state.get(BEST_STATE_KEY, {}))
        return Path(chosen)

    def _prepare_partitions(self, path: Path) -> None:
        """Global rank 0, before any rank loads: with ds.universal_ckpt, convert the checkpoint's ZeRO-partitioned
        engines to DeepSpeed's universal form (once); without it, refuse a checkpoint saved by another number of
        ranks whose ZeRO states are partitioned (DeepSpeed cannot load them into other partitions)."""
        meta = read_metadata(path)
        tag, saved_world = meta.get("name", path.name), int(meta.get("world_size", self.world_size))
        if self.universal:
            for line in convert_checkpoint(path, tag, announce=lambda line: print(line, flush=True)):
                print(line, flush=True)
            return
        partitioned = saved_partitions(path, tag)
        if saved_world != self.world_size and partitioned:
            engines = ", ".join(f"{name} ({count} partitions)" for name, count in partitioned.items())
            raise ResumeRefused(f"checkpoint {path} was saved by a job of {saved_world} ranks and this job has "
                                f"{self.world_size}: the ZeRO states of {engines} are split per data-parallel rank; "
                                f"set ds.universal_ckpt=true to load them into this job's partitioning")
