#!/usr/bin/env python
"""Stop the tiny 3-node job at random moments on the local SLURM cluster and check that it ends as if uninterrupted.

    python tools/torture_slurm.py --seed 7 --stops 4 --iterations 12          # starts the local cluster if needed
    python tools/torture_slurm.py --seeds 1-5 --kinds usr1_batch,kill_rank    # several seeds, some kinds of stop

Each seed draws `--stops` interruptions (USR1 to the batch shell or to the tasks, USR2 to the tasks, scancel, SIGKILL
of rank 2 or of every rank) and a moment for each (0 to --max-delay s after the run started). The job comes back by
itself after a requeueing stop; after a cancel or a kill the same command is submitted again, as a user would. The
report per seed: actor weights and every iteration's rollouts bitwise equal to an uninterrupted run's, how long each
stop took to run again, shards committed twice, files left behind, one metrics row per iteration. Exit status 1 when
any seed fails. Everything lives under --workdir (default /tmp/hpc_rlhf_torture).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from hpc_rlhf.slurm.local_cluster import local_cluster  # noqa: E402
from hpc_rlhf.slurm.torture import STOPS, run_reference, torture  # noqa: E402


def parse_seeds(text: str) -> list[int]:
    """'3' -> [3]; '1-4' -> [1, 2, 3, 4]; '1,5' -> [1, 5]."""
    seeds = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--seed", default=None, help="one seed (same as --seeds N)")
    parser.add_argument("--seeds", default="0", help="seeds: N, A-B or a comma list")
    parser.add_argument("--stops", type=int, default=3, help="interruptions per seed")
    parser.add_argument("--iterations", type=int, default=10, help="train.max_iterations of the job")
    parser.add_argument("--async-queue", type=int, default=1, help="rollout.async_queue of the job")
    parser.add_argument("--save-steps", type=int, default=2, help="ckpt.save_steps (periodic checkpoints)")
    parser.add_argument("--kinds", default=",".join(STOPS), help=f"kinds of stop to draw from ({','.join(STOPS)})")
    parser.add_argument("--max-delay", type=float, default=20.0, help="latest moment of a stop, s after the start")
    parser.add_argument("--anchor", choices=("start", "training"), default="start",
                        help="count a stop's delay from the run's start or from its first logged iteration")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per seed, s")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hpc_rlhf_torture"))
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(STOPS))
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; choose from {', '.join(STOPS)}")
    seeds = parse_seeds(args.seed if args.seed is not None else args.seeds)
    args.workdir.mkdir(parents=True, exist_ok=True)
    reference = Path(tempfile.mkdtemp(prefix="reference_", dir=args.workdir))
    print(f"uninterrupted reference run in {reference} ...", flush=True)
    run_reference(reference / "run", args.iterations, args.async_queue, args.save_steps, reference / "train.log")
    failed = 0
    with local_cluster() as cluster:
        for seed in seeds:
            workdir = Path(tempfile.mkdtemp(prefix=f"seed{seed}_", dir=args.workdir))
            report = torture(cluster, workdir, seed=seed, stops=args.stops, iterations=args.iterations,
                             async_queue=args.async_queue, save_steps=args.save_steps, kinds=kinds,
                             max_delay_s=args.max_delay, timeout_s=args.timeout, reference=reference / "run",
                             anchor=args.anchor)
            print("\n".join(report.lines()) + f"\n  (files in {workdir})", flush=True)
            failed += not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
