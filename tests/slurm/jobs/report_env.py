"""Run by every task of a test job: write what SLURM told this task, raw and parsed, to RUN_DIR/<name>.json.

    report_env.py RUN_DIR [NAME]      # NAME defaults to env_<procid>
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from hpc_rlhf.slurm import SlurmEnv


def main() -> int:
    run_dir = Path(sys.argv[1])
    parsed = SlurmEnv.from_environ()
    raw = {key: value for key, value in os.environ.items() if key.startswith("SLURM") or key == "CUDA_VISIBLE_DEVICES"}
    record = {"raw": raw, "parsed": asdict(parsed), "local_world_size": parsed.local_world_size,
              "node_name": parsed.node_name}
    name = sys.argv[2] if len(sys.argv) > 2 else f"env_{parsed.procid}"
    (run_dir / f"{name}.json").write_text(json.dumps(record, indent=1))
    print(f"rank {parsed.procid} of {parsed.ntasks} on {parsed.node_name}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
