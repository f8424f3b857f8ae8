"""SLURM plumbing shared by the batch scripts, `python -m hpc_rlhf.submit` and the per-rank entry.

- env:      what a rank learns from SLURM's environment (job id, restarts, nodes, its rank among the tasks).
- requeue:  the stop request (signals and the stop flag) and `requeue_self`, the one checkpoint-restart mechanism.
- filesystem: whether a path is on a file system every node sees, and writable (checks before submitting).
- job_spec: the sbatch options a config's slurm section asks for, each with its reason; SLURM time limits.
- batch_script: the readable batch scripts in sbatch/ rendered from a config (tools/make_sbatch.py).
"""

from hpc_rlhf.slurm.batch_script import BatchScriptSpec, config_header, render_batch_script
from hpc_rlhf.slurm.env import (
    SlurmEnv,
    SlurmEnvError,
    expand_nodelist,
    in_slurm_job,
    parse_tasks_per_node,
    scontrol_hostnames,
)
from hpc_rlhf.slurm.filesystem import (
    MountInfo,
    mount_of,
    mount_of_path,
    shared_path_problem,
    writable_dir_problem,
)
from hpc_rlhf.slurm.job_spec import (
    SbatchOption,
    SlurmTimeError,
    allocation_problems,
    parse_time_limit,
    sbatch_options,
    time_limit_minutes,
)
from hpc_rlhf.slurm.requeue import (
    STOP_FLAG_NAME,
    RequeueError,
    RequeueOutcome,
    RequeueRefused,
    StopReason,
    StopRequest,
    combine_stop_reasons,
    requeue_self,
    srun_wait_lines,
    stop_flag_path,
    stop_trap_lines,
    write_stop_flag,
)

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
    "time_limit_minutes",
    "writable_dir_problem",
    "write_stop_flag",
]
