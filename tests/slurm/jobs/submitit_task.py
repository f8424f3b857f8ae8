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
