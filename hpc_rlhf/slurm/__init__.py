"""SLURM plumbing shared by the batch scripts, `python -m hpc_rlhf.submit` and the per-rank entry.

- env:      what a rank learns from SLURM's environment (job id, restarts, nodes, its rank among the tasks).
- requeue:  the stop request (signals and the stop flag) and `requeue_self`, the one checkpoint-restart mechanism.
- filesystem: whether a path is on a file system every node sees, and writable (checks before submitting).
"""

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
    "MountInfo",
    "RequeueError",
    "RequeueOutcome",
    "RequeueRefused",
    "SlurmEnv",
    "SlurmEnvError",
    "StopReason",
    "StopRequest",
    "combine_stop_reasons",
    "expand_nodelist",
    "in_slurm_job",
    "mount_of",
    "mount_of_path",
    "parse_tasks_per_node",
    "requeue_self",
    "scontrol_hostnames",
    "shared_path_problem",
    "srun_wait_lines",
    "stop_flag_path",
    "stop_trap_lines",
    "writable_dir_problem",
    "write_stop_flag",
]
