"""The PPO-family recipe: build this rank's components, resume, run the tick schedule, save models and curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpc_rlhf.config import Config
from hpc_rlhf.slurm.requeue import leave_for_requeue
from hpc_rlhf.trainers.ppo.components import build_components
from hpc_rlhf.trainers.ppo.loop import PPOTrainer
from hpc_rlhf.trainers.ppo.resume import CheckpointHooks


def run_ppo(cfg: Config, world: Any, groups: Any, control: Any, *, stop: Any = None) -> dict[str, float]:
    """Train with cfg on this rank; every rank of the job calls this together."""
    from hpc_rlhf.metrics import MetricsLogger

    parts = build_components(cfg, groups, world.device)
    run_dir = Path(cfg.train.run_dir)
    is_main = world.info.rank == 0
    checkpoint = CheckpointHooks(cfg, world, control)
    logger = MetricsLogger(run_dir, enabled=is_main, use_tensorboard=cfg.logger.use_tensorboard,
                           progress_bar=cfg.logger.progress_bar, total_steps=parts.total_iterations,
                           logging_steps=cfg.logger.logging_steps, start_step=checkpoint.start_hint())
    trainer = PPOTrainer(cfg, groups, control, parts, world.device, stop=stop, log=logger.log,
                         checkpoint=checkpoint)
    try:
        last = trainer.run()
        if not last.get("stopped") and cfg.ckpt.save_hf_model:
            if parts.actor is not None:
                parts.actor.save_hf(run_dir / "hf" / "actor")
                if parts.actor.dp_rank == 0:
                    parts.tokenizer.save_pretrained(run_dir / "hf" / "actor")
            if parts.critic is not None:
                parts.critic.save_hf(run_dir / "hf" / "critic")
    finally:
        logger.close(plot=cfg.logger.plot)
    control.barrier()
    if last.get("stopped"):
        leave_for_requeue(world.info.rank, trainer.stop_reason, cfg.slurm.max_requeue)
    return last
