"""The PPO-family recipe: build this rank's trainer, resume and run the tick schedule, save the models, leave.

Every rank of the job calls `run_ppo`; the trainer (`PPOTrainer`) builds what the rank's roles need, in order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from hpc_rlhf.config.schema import Config
from hpc_rlhf.distributed import ControlPlane, DistributedWorld, RoleGroups
from hpc_rlhf.slurm.requeue import StopRequest, leave_for_requeue
from hpc_rlhf.trainers.ppo.components import Components
from hpc_rlhf.trainers.ppo.loop import PPOTrainer


def save_models(parts: Components, run_dir: Path) -> None:
    """The trained actor (with its tokenizer; its EMA too with actor.enable_ema) and critic as Hugging Face models
    under RUN_DIR/hf/; all ranks call."""
    if parts.actor is not None:
        parts.actor.save_hf(run_dir / "hf" / "actor")
        if parts.actor.dp_rank == 0:
            parts.tokenizer.save_pretrained(run_dir / "hf" / "actor")
        if parts.actor.ema is not None:  # actor.enable_ema: the EMA of the weights, beside the trained actor
            parts.actor.save_ema_hf(run_dir / "hf" / "actor_ema")
            if parts.actor.dp_rank == 0:
                parts.tokenizer.save_pretrained(run_dir / "hf" / "actor_ema")
    if parts.critic is not None:
        parts.critic.save_hf(run_dir / "hf" / "critic")


def run_ppo(cfg: Config, world: DistributedWorld, groups: RoleGroups, control: ControlPlane, *,
            stop: Optional[StopRequest] = None) -> dict[str, float]:
    """Train with cfg on this rank; every rank of the job calls this. After a stop checkpoint the job leaves (and
    is requeued when the stop asked for it)."""
    trainer = PPOTrainer(cfg, world, groups, control, stop=stop)
    try:
        last = trainer.run()
        if not last.get("stopped") and cfg.ckpt.save_hf_model:
            save_models(trainer.parts, Path(cfg.train.run_dir))
    finally:
        trainer.logger.close(plot=cfg.logger.plot)
    control.barrier()
    if last.get("stopped"):
        leave_for_requeue(world.info.rank, trainer.stop_reason, cfg.slurm.max_requeue)
    return last
