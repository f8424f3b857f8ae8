"""A function submitted through submitit: the first run waits for a stop request and requeues; the restart returns.

Pickled by value (the test registers this module with cloudpickle), so the job does not need to import it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def stop_and_requeue_once(run_dir: str, max_requeue: int) -> str:
    """Each task: record the start; on the first run wait for the stop, then rank 0 requeues and every task exits."""
    from hpc_rlhf.slurm import SlurmEnv, StopRequest, requeue_self

    env = SlurmEnv.from_environ()
    stop = StopRequest.for_slurm_job(run_dir, flag_poll_interval_s=0.1).install()
    (Path(run_dir) / f"started_{env.restart_count}_{env.procid}").write_text("")
    if env.restart_count > 0:
        return f"rank {env.procid} finished after {env.restart_count} restart(s)"
    deadline = time.monotonic() + 60
    while not stop.should_stop():
        if time.monotonic() > deadline:
            raise TimeoutError("no stop request within 60 s")
        time.sleep(0.05)
    reason = stop.request()
    (Path(run_dir) / f"stop_{env.procid}").write_text(reason.source if reason else "")
    time.sleep(0.5)  # stands in for the checkpoint; the other ranks have seen their signal by now
    requeue_self(env.procid, max_requeue, restart_delay_s=3)
    sys.exit(0)  # leave without a result: submitit then waits for the requeued run


class SlowStarter:
    """A task that takes a while to start (as the real entry does while it imports torch) before installing its
    StopRequest, with `checkpoint` as hpc_rlhf.submit's entry has it: a USR2 in that window reaches submitit's handler,
    which calls `checkpoint` on rank 0."""

    def __init__(self, run_dir: str, max_requeue: int, *, prompt: bool) -> None:
        self.run_dir, self.max_requeue, self.prompt = run_dir, max_requeue, prompt

    def __call__(self) -> str:
        import os

        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        procid = os.environ["SLURM_PROCID"]
        (Path(self.run_dir) / f"starting_{restart}_{procid}").write_text(str(time.time()))
        if restart == 0:
            time.sleep(60)  # the start-up window; the stop arrives in it
        return f"rank {procid} ran after {restart} restart(s)"

    def checkpoint(self):
        if self.prompt:
            from hpc_rlhf.slurm.requeue import requeue_promptly_and_exit

            requeue_promptly_and_exit(self.max_requeue)
        import submitit

        return submitit.helpers.DelayedSubmission(self)  # submitit's own requeue
