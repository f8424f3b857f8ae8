"""The PPO-family recipe: build this rank's components, resume, run the tick schedule, save models and curves."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from hpc_rlhf.config import Config
from hpc_rlhf.distributed import ControlPlane, DistributedWorld, RoleGroups
from hpc_rlhf.slurm.requeue import StopRequest, leave_for_requeue
from hpc_rlhf.trainers.ppo.components import build_components
from hpc_rlhf.trainers.ppo.loop import PPOTrainer


def run_ppo(cfg: Config, world: DistributedWorld, groups: RoleGroups, control: ControlPlane, *,
            stop: Optional[StopRequest] = None) -> dict[str, float]:
    """Train with cfg on this rank; every rank of the job calls this."""
    parts = build_components(cfg, groups, world.device)
    run_dir = Path(cfg.train.run_dir)
    trainer = PPOTrainer(cfg, world, groups, control, parts, stop=stop)
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
        trainer.logger.close(plot=cfg.logger.plot)
    control.barrier()
    if last.get("stopped"):
        leave_for_requeue(world.info.rank, trainer.stop_reason, cfg.slurm.max_requeue)
    return last
