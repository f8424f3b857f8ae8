"""SLURM plumbing shared by the batch scripts, `python -m hpc_rlhf.submit` and the per-rank entry.

- env:      what a rank learns from SLURM's environment (job id, restarts, nodes, its rank among the tasks).
- requeue:  the stop request (signals and the stop flag) and `requeue_self`, the one checkpoint-restart mechanism.
- filesystem: whether a path is on a file system every node sees, and writable (checks before submitting).
- job_spec: the sbatch options a config's slurm section asks for, each with its reason; SLURM time limits.
- batch_script: the readable batch scripts in sbatch/ rendered from a config (tools/make_sbatch.py).

Importing the package loads nothing but this file: names are loaded from their submodule on first use (PEP 562), so
that the per-rank entry can import `hpc_rlhf.slurm.requeue` and install its stop handlers before anything heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULE_OF = {
    "BatchScriptSpec": "hpc_rlhf.slurm.batch_script",
    "MountInfo": "hpc_rlhf.slurm.filesystem",
    "RequeueError": "hpc_rlhf.slurm.requeue",
    "RequeueOutcome": "hpc_rlhf.slurm.requeue",
    "RequeueRefused": "hpc_rlhf.slurm.requeue",
    "STOP_FLAG_NAME": "hpc_rlhf.slurm.requeue",
    "SbatchOption": "hpc_rlhf.slurm.job_spec",
    "SlurmEnv": "hpc_rlhf.slurm.env",
    "SlurmEnvError": "hpc_rlhf.slurm.env",
    "SlurmTimeError": "hpc_rlhf.slurm.job_spec",
    "StopReason": "hpc_rlhf.slurm.requeue",
    "StopRequest": "hpc_rlhf.slurm.requeue",
    "allocation_problems": "hpc_rlhf.slurm.job_spec",
    "combine_stop_reasons": "hpc_rlhf.slurm.requeue",
    "config_header": "hpc_rlhf.slurm.batch_script",
    "expand_nodelist": "hpc_rlhf.slurm.env",
    "in_slurm_job": "hpc_rlhf.slurm.env",
    "mount_of": "hpc_rlhf.slurm.filesystem",
    "mount_of_path": "hpc_rlhf.slurm.filesystem",
    "parse_tasks_per_node": "hpc_rlhf.slurm.env",
    "parse_time_limit": "hpc_rlhf.slurm.job_spec",
    "render_batch_script": "hpc_rlhf.slurm.batch_script",
    "requeue_self": "hpc_rlhf.slurm.requeue",
    "sbatch_options": "hpc_rlhf.slurm.job_spec",
    "scontrol_hostnames": "hpc_rlhf.slurm.env",
    "shared_path_problem": "hpc_rlhf.slurm.filesystem",
    "srun_wait_lines": "hpc_rlhf.slurm.requeue",
    "stop_flag_path": "hpc_rlhf.slurm.requeue",
    "stop_trap_lines": "hpc_rlhf.slurm.requeue",
    "rank_guard_lines": "hpc_rlhf.slurm.requeue",
    "RANK_GUARD": "hpc_rlhf.slurm.requeue",
    "requeue_promptly_and_exit": "hpc_rlhf.slurm.requeue",
    "stop_flag_ready_lines": "hpc_rlhf.slurm.requeue",
    "requeue_limit_lines": "hpc_rlhf.slurm.requeue",
    "install_early_stop_handlers": "hpc_rlhf.slurm.requeue",
    "time_limit_minutes": "hpc_rlhf.slurm.job_spec",
    "writable_dir_problem": "hpc_rlhf.slurm.filesystem",
    "write_stop_flag": "hpc_rlhf.slurm.requeue",
}


def __getattr__(name: str) -> Any:
    module = _SUBMODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'hpc_rlhf.slurm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "STOP_FLAG_NAME",
    "BatchScriptSpec",
    "MountInfo",
    "RequeueError",
    "RequeueOutcome",
    "RequeueRefused",
    "SbatchOption",
    "SlurmEnv",
    "SlurmEnvError",
    "SlurmTimeError",
    "StopReason",
    "StopRequest",
    "allocation_problems",
    "combine_stop_reasons",
    "config_header",
    "expand_nodelist",
    "in_slurm_job",
    "mount_of",
    "mount_of_path",
    "parse_tasks_per_node",
    "parse_time_limit",
    "render_batch_script",
    "requeue_self",
    "sbatch_options",
    "scontrol_hostnames",
    "shared_path_problem",
    "srun_wait_lines",
    "stop_flag_path",
    "stop_trap_lines",
    "rank_guard_lines",
    "RANK_GUARD",
    "requeue_promptly_and_exit",
    "stop_flag_ready_lines",
    "requeue_limit_lines",
    "install_early_stop_handlers",
    "time_limit_minutes",
    "writable_dir_problem",
    "write_stop_flag",
]
