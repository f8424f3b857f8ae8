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
from hpc_rlhf.training.lora import is_lora_model


def save_models(parts: Components, run_dir: Path) -> None:
    """The trained actor (with its tokenizer; its EMA too with actor.enable_ema) and critic as Hugging Face models
    under RUN_DIR/hf/; all ranks call. A LoRA actor is saved as its adapter (hf/actor, as the supervised trainers
    save theirs) and merged into the base (hf/actor_merged, the weights the generators ran)."""
    actor, hf = parts.actor, run_dir / "hf"
    if actor is not None:
        lora = is_lora_model(actor.hf_model())
        written = [hf / "actor"]
        if lora:
            actor.save_lora_adapter(hf / "actor")
            actor.save_hf(hf / "actor_merged")
            written.append(hf / "actor_merged")
        else:
            actor.save_hf(hf / "actor")
        if actor.ema is not None:  # actor.enable_ema: the EMA of the weights, beside the trained actor
            if lora:
                actor.save_lora_adapter(hf / "actor_ema", ema=True)
            else:
                actor.save_ema_hf(hf / "actor_ema")
            written.append(hf / "actor_ema")
        if actor.dp_rank == 0:
            for out in written:
                parts.tokenizer.save_pretrained(out)
    if parts.critic is not None:
        parts.critic.save_hf(hf / "critic")


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
