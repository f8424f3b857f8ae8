"""One rank of a 3-rank gloo job whose rank DIE_RANK is SIGKILLed while every rank loops over all-reduces.

Run as `python dying_rank.py` with torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as srun's
tasks get them from the per-rank entry. The survivors must stop within seconds and name the rank that died.
"""

from __future__ import annotations

import os
import signal
import time

import torch
import torch.distributed as dist

from hpc_rlhf.distributed import TorchControlPlane, detect_world, init_distributed, run_guarded


def main() -> None:
    die_rank = int(os.environ["DIE_RANK"])
    info = detect_world()
    world = init_distributed(info, timeout_s=120)
    control = TorchControlPlane.from_world(world, poll_interval_s=0.2)

    def work() -> None:
        control.barrier()
        started = time.monotonic()
        tensor = torch.ones(1 << 16)
        while True:
            dist.all_reduce(tensor, group=world.control_group)
            if info.rank == die_rank and time.monotonic() - started > 1.5:
                os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or `kill -9` would: no word to anyone

    run_guarded(work, control)


if __name__ == "__main__":
    main()
