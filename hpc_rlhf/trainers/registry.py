"""Which function trains each `train.trainer`: one plain table, read by the per-rank entry (`hpc_rlhf.launch`).

Every entry is called the same way on every rank of the job, `entry(cfg, world, groups, control, stop=stop)`, and
returns the last metrics; after a stop checkpoint it leaves the process (and the job is requeued when the stop asked
for it).
"""

from __future__ import annotations

from typing import Optional, Protocol

from hpc_rlhf.config.schema import Config
from hpc_rlhf.distributed import ControlPlane, DistributedWorld, RoleGroups
from hpc_rlhf.slurm.requeue import StopRequest
from hpc_rlhf.trainers import dpo, kd, kto, prm, rejection_sampling, rm, sft
from hpc_rlhf.trainers.ppo.recipe import run_ppo


class TrainerEntry(Protocol):
    """How a trainer is run on one rank."""

    def __call__(self, cfg: Config, world: DistributedWorld, groups: RoleGroups, control: ControlPlane, *,
                 stop: Optional[StopRequest] = None) -> dict[str, float]: ...


TRAINERS: dict[str, TrainerEntry] = {
    "ppo": run_ppo,  # the whole PPO family: the advantage estimator (algo.*) picks PPO, GRPO, REINFORCE++, ...
    "sft": sft.run,
    "rm": rm.run,
    "dpo": dpo.run,
    "iterative_dpo": dpo.run_iterative,
    "kto": kto.run,
    "prm": prm.run,
    "kd": kd.run,
    "rejection_sampling": rejection_sampling.run,
}


def trainer_entry(name: str) -> TrainerEntry:
    """The entry of `train.trainer` name; a clear error for a name no trainer has."""
    if name not in TRAINERS:
        raise ValueError(f"train.trainer {name!r} names no trainer; known: {', '.join(TRAINERS)}")
    return TRAINERS[name]
