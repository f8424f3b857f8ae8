"""`python -m hpc_rlhf.train --config configs/tiny_cpu.yaml`: run a job on this machine, no SLURM needed.

Validates the config, checks this machine (device, model and data paths) and the run directory, then starts the world
the layout asks for: one process per rank on this machine (gloo on CPU, NCCL on GPUs), each running the same per-rank
entry as a SLURM job (`hpc_rlhf.launch`). Errors are one line; --debug (or HPC_RLHF_DEBUG=1) shows tracebacks.
"""

from __future__ import annotations

import sys
from typing import Sequence

from hpc_rlhf.cli import build_parser, parse_config_args, run_entry


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("python -m hpc_rlhf.train", __doc__.strip().splitlines()[0])

    def start() -> int:
        args, loaded = parse_config_args(parser, argv)
        from hpc_rlhf.launch import run_local

        return run_local(loaded, overwrite_run_dir=args.overwrite_run_dir)

    return run_entry(parser.prog, start)


if __name__ == "__main__":
    sys.exit(main())
