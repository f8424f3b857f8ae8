"""`python -m hpc_rlhf.train --config configs/tiny_cpu.yaml`: run a job on this machine, no SLURM needed.

Validates the config, then starts the world the layout asks for: one process per rank on this machine (gloo on CPU,
NCCL on GPUs), each running the same per-rank entry as a SLURM job (`hpc_rlhf.launch`).
"""

from __future__ import annotations

import sys
from typing import Sequence

from hpc_rlhf.cli import build_parser, parse_config_args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser("python -m hpc_rlhf.train", __doc__.strip().splitlines()[0])
    _, loaded = parse_config_args(parser, argv)
    from hpc_rlhf.launch import run_local

    return run_local(loaded)


if __name__ == "__main__":
    sys.exit(main())
