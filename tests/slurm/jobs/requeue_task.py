"""Run by every task of a requeue test job: a stand-in for the trainer's checkpoint-restart behaviour.

Each rank counts iterations; at every iteration end (the safe point) it polls its StopRequest. On a stop, every rank
writes its reason to RUN_DIR (standing in for the control plane's gather), and global rank 0 combines the reasons,
saves the iteration as the checkpoint, and requeues the job. The first run works until it is told to stop; a resumed
run continues from the checkpoint and finishes after --iterations in total.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from hpc_rlhf.slurm import (
    SlurmEnv,
    StopReason,
    StopRequest,
    combine_stop_reasons,
    requeue_self,
)


def log(message: str) -> None:
    print(f"[{time.time():.3f}] {message}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--iteration-s", type=float, default=0.2)
    parser.add_argument("--max-requeue", type=int, default=3)
    parser.add_argument("--restart-delay-s", type=int, default=3)
    args = parser.parse_args()

    env = SlurmEnv.from_environ()
    stop = StopRequest.for_slurm_job(args.run_dir, flag_poll_interval_s=0.1).install()
    if env.procid == 0:
        stop.clear_stale_flag()
    checkpoint = args.run_dir / "checkpoint.json"
    iteration = json.loads(checkpoint.read_text())["iteration"] if checkpoint.exists() else 0
    log(f"rank={env.procid} restart={env.restart_count} start iteration={iteration}")
    (args.run_dir / f"started_{env.restart_count}_{env.procid}").write_text(str(iteration))

    first_run = env.restart_count == 0
    reason = None
    while first_run or iteration < args.iterations:
        time.sleep(args.iteration_s)
        iteration += 1
        reason = stop.request()  # the safe point
        if reason is not None:
            break
    if reason is None:
        log(f"rank={env.procid} restart={env.restart_count} finished iteration={iteration}")
        return 0

    log(f"rank={env.procid} restart={env.restart_count} stop requested by {reason.source} at iteration={iteration}")
    record = {"source": reason.source, "requeue": reason.requeue, "iteration": iteration}
    write_atomic(args.run_dir / f"stop_{env.restart_count}_{env.procid}.json", json.dumps(record))
    if env.procid != 0:
        return 0
    reasons = gather_reasons(args.run_dir, env.restart_count, env.ntasks)
    decision = combine_stop_reasons(reasons)
    write_atomic(checkpoint, json.dumps({"iteration": iteration}))
    log(f"rank=0 restart={env.restart_count} checkpoint saved at iteration={iteration}; decision={decision}")
    if decision is None or not decision.requeue:
        return 0
    outcome = requeue_self(0, args.max_requeue, restart_delay_s=args.restart_delay_s)
    log(f"rank=0 restart={env.restart_count} requeued: {outcome}")
    return 0


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def gather_reasons(run_dir: Path, restart: int, ntasks: int, timeout_s: float = 60.0) -> list[StopReason]:
    """Wait for every rank's stop record of this run and read them back."""
    deadline = time.monotonic() + timeout_s
    paths = [run_dir / f"stop_{restart}_{rank}.json" for rank in range(ntasks)]
    while not all(path.exists() for path in paths):
        if time.monotonic() > deadline:
            missing = [path.name for path in paths if not path.exists()]
            raise TimeoutError(f"ranks did not report their stop within {timeout_s}s: {missing}")
        time.sleep(0.05)
    records = [json.loads(path.read_text()) for path in paths]
    return [StopReason(record["source"], record["requeue"]) for record in records]


if __name__ == "__main__":
    sys.exit(main())
