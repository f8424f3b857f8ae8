"""Checkpoint hooks of the PPO loop: what is saved (engines, trainer state, RNG) and how a run resumes.

A checkpoint is taken at the end of a tick, after every rank agreed on it, so it records a consistent cut: the next
iteration to train, the weight version, the KL controller and reward statistics, and each rank's RNG. Rollout shards
of iterations not yet trained stay on disk and are reused by the resumed run instead of being generated again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from hpc_rlhf.config import Config
from hpc_rlhf.config_io import config_to_dict


class CheckpointHooks:
    """Saves and restores the loop's state under RUN_DIR/checkpoints; all ranks call `save` and `restore`."""

    def __init__(self, cfg: Config, world: Any, control: Any) -> None:
        from hpc_rlhf.checkpoint import config_fingerprint

        self.cfg = cfg
        self.rank = world.info.rank
        self.world_size = world.info.world_size
        self.control = control
        self.root = Path(cfg.train.run_dir) / "checkpoints"
        self.fingerprint = config_fingerprint(config_to_dict(cfg))

    def _engines(self, trainer: Any) -> dict[str, Any]:
        parts = trainer.parts
        engines = {}
        if parts.actor is not None:
            engines["actor"] = parts.actor
        if parts.critic is not None:
            engines["critic"] = parts.critic
        return engines

    def start_hint(self) -> int:
        """The iteration a resumed run will start from (for the progress bar), 0 for a fresh run."""
        from hpc_rlhf.checkpoint import latest_checkpoint

        if not self.cfg.ckpt.load_checkpoint:
            return 0
        path = latest_checkpoint(self.root)
        if path is None:
            return 0
        import json

        return int(json.loads((path / "trainer_state.json").read_text()).get("next_iteration", 0))

    def save(self, trainer: Any) -> Path:
        from hpc_rlhf.checkpoint import save_checkpoint

        return save_checkpoint(self.root, trainer.state.next_iteration, rank=self.rank, world_size=self.world_size,
                               barrier=self.control.barrier, engines=self._engines(trainer),
                               trainer_state=trainer.trainer_state(), config_fingerprint=self.fingerprint,
                               keep_last=self.cfg.ckpt.max_ckpt_num)

    def restore(self, trainer: Any) -> Optional[dict]:
        """Load the latest complete checkpoint into the engines; returns the trainer state, or None."""
        from hpc_rlhf.checkpoint import latest_checkpoint, load_checkpoint

        if not self.cfg.ckpt.load_checkpoint:
            return None
        path = latest_checkpoint(self.root)
        # Every rank must agree on the checkpoint (rank 0 decides; a shared filesystem may lag on others).
        path = self.control.broadcast_object(str(path) if path else None, src=0)
        if path is None:
            return None
        state = load_checkpoint(Path(path), rank=self.rank, engines=self._engines(trainer),
                                config_fingerprint=self.fingerprint)
        if self.rank == 0:
            print(f"resumed from {path}", flush=True)
        return state
