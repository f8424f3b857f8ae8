"""What a config asks of SLURM: the sbatch options of its `slurm` section, each with the reason it is there.

Both ways of submitting a job read this: the readable batch scripts (`hpc_rlhf.slurm.batch_script`, written by
tools/make_sbatch.py) turn the options into commented `#SBATCH` lines, and `python -m hpc_rlhf.submit` hands the same
allocation to submitit. One rank per GPU: `--ntasks-per-node` equals `slurm.gpus_per_node`; a CPU run
(`train.device: cpu`) asks for no GPUs and runs `gpus_per_node` processes per node.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from hpc_rlhf.config.schema import Config, SlurmConfig

LOG_PATTERN = "logs/%x_%j.out"  # %x = job name, %j = job id; relative to the directory sbatch was run in
_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<rest>\d+(?::\d+){0,2})$")


class SlurmTimeError(ValueError):
    """A `slurm.time` value that SLURM would not accept."""


def parse_time_limit(text: str) -> int:
    """Seconds in a SLURM time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S (as `sbatch --time` reads them)."""
    match = _TIME.match(text.strip())
    if not match:
        raise SlurmTimeError(f"slurm.time={text!r} is not a SLURM time limit (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")
    parts = [int(part) for part in match.group("rest").split(":")]
    if match.group("days") is not None:
        days = int(match.group("days"))
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        days, hours, minutes, seconds = 0, 0, parts[0], 0
    elif len(parts) == 2:
        days, hours, minutes, seconds = 0, 0, parts[0], parts[1]
    else:
        days, (hours, minutes, seconds) = 0, parts
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise SlurmTimeError(f"slurm.time={text!r} is zero; give the limit of one run of the job")
    return total


def time_limit_minutes(text: str) -> int:
    """The limit in whole minutes, rounded up (submitit takes minutes)."""
    return math.ceil(parse_time_limit(text) / 60)


def node_count(slurm: SlurmConfig) -> str:
    """sbatch's --nodes value: `slurm.nodes`, or MIN-MAX when `slurm.min_nodes` lets the job start on fewer."""
    if slurm.min_nodes and slurm.min_nodes < slurm.nodes:
        return f"{slurm.min_nodes}-{slurm.nodes}"
    return str(slurm.nodes)


def allocation_problems(slurm: SlurmConfig) -> list[str]:
    """What in the slurm section SLURM would reject or that defeats the requeue, one message per problem."""
    problems = []
    if slurm.nodes < 1:
        problems.append(f"slurm.nodes={slurm.nodes}: a job needs at least one node")
    if slurm.gpus_per_node < 1:
        problems.append(f"slurm.gpus_per_node={slurm.gpus_per_node}: a node runs at least one rank")
    if slurm.cpus_per_task < 1:
        problems.append(f"slurm.cpus_per_task={slurm.cpus_per_task}: a rank needs at least one core")
    if slurm.max_requeue < 0:
        problems.append(f"slurm.max_requeue={slurm.max_requeue}: must be >= 0")
    try:
        limit_s = parse_time_limit(slurm.time)
    except SlurmTimeError as err:
        problems.append(str(err))
    else:
        if not 0 < slurm.signal_delay_s < limit_s:
            problems.append(f"slurm.signal_delay_s={slurm.signal_delay_s} must lie between 0 and the time limit "
                            f"slurm.time={slurm.time} ({limit_s} s): the stop signal has to arrive while the job runs")
    return problems


def uses_gpus(cfg: Config) -> bool:
    """Whether the job asks SLURM for GPUs (not for `train.device: cpu`)."""
    return cfg.train.device != "cpu"


@dataclass(frozen=True)
class SbatchOption:
    """One sbatch option (`value` None for a flag such as --requeue) and a one-line reason, for the script's comment."""

    name: str
    value: str | None
    why: str

    def flag(self) -> str:
        return f"--{self.name}" if self.value is None else f"--{self.name}={self.value}"


def layout_summary(cfg: Config) -> str:
    """The role split in words, e.g. 'generator 16, actor 16, critic 8, reward+reference 4' (or 'colocated: every rank
    is ...'); a role placed with `share_with` is joined by '+' to the role whose ranks it shares."""
    roles = {name: role for name, role in cfg.layout.roles().items() if role.gpus > 0}
    if cfg.layout.colocate:
        return "colocated: every rank is " + ", ".join(roles)
    parts = []
    for name, role in roles.items():
        if not role.share_with:
            holders = [name, *(other for other, r in roles.items() if r.share_with == name)]
            parts.append(f"{'+'.join(holders)} {role.gpus}")
    return ", ".join(parts)


def sbatch_options(cfg: Config) -> list[SbatchOption]:
    """The options of a batch script for `cfg`, in the order a reader wants them: who, where, how long, restart."""
    slurm = cfg.slurm
    ranks = slurm.nodes * slurm.gpus_per_node
    nodes = node_count(slurm)
    unit = ("GPU" if uses_gpus(cfg) else "process") + ("" if slurm.gpus_per_node == 1 else
                                                       ("s" if uses_gpus(cfg) else "es"))
    options = [
        SbatchOption("job-name", slurm.job_name, "shown by squeue; %x in the log file name"),
        SbatchOption("nodes", nodes,
                     f"{slurm.nodes} node{'' if slurm.nodes == 1 else 's'} x {slurm.gpus_per_node} {unit} = the "
                     f"{ranks} rank{'' if ranks == 1 else 's'} of the layout "
                     f"({layout_summary(cfg)})" if nodes == str(slurm.nodes) else
                     f"any of {nodes} nodes x {slurm.gpus_per_node} {unit}: the layout "
                     f"({layout_summary(cfg)}) is re-planned for the ranks the job gets (layout.scale: "
                     f"proportional)"),
        SbatchOption("ntasks-per-node", str(slurm.gpus_per_node),
                     "one task (one rank, one torch.distributed process) per GPU" if uses_gpus(cfg) else
                     "one task (one rank, one torch.distributed process) each; train.device is cpu: no GPUs"),
    ]
    if uses_gpus(cfg):
        options.append(SbatchOption("gpus-per-node", str(slurm.gpus_per_node),
                                    "as many GPUs as tasks, so that each rank drives its own"))
    options.append(SbatchOption("cpus-per-task", str(slurm.cpus_per_task),
                                "cores per rank: tokenisation, data loading, DeepSpeed's CPU optimizer"))
    if slurm.mem:
        options.append(SbatchOption("mem", slurm.mem, "memory per node (offloaded optimizer states live here)"))
    for key, why in (("partition", "the partition (sinfo -s lists them)"),
                     ("account", "the account charged (sacctmgr show assoc user=$USER)"),
                     ("qos", "quality of service: limits and preemption (sacctmgr show qos)"),
                     ("constraint", "node features, e.g. a GPU model")):
        value = getattr(slurm, key)
        if value:
            options.append(SbatchOption(key, value, why))
    if slurm.exclusive:
        options.append(SbatchOption("exclusive", None, "whole nodes: NCCL and the CPU optimizer want every core and "
                                                       "NIC"))
    options += [
        SbatchOption("time", slurm.time, "the limit of one run; the job checkpoints and requeues itself before it"),
        SbatchOption("requeue", None, "may go back to the queue under its id (scontrol requeue, preemption, "
                                      "node failure) and resume"),
        SbatchOption("signal", f"B:USR1@{slurm.signal_delay_s}",
                     f"USR1 to this batch shell (B:) {slurm.signal_delay_s} s before the limit: one safe point plus "
                     f"a checkpoint must fit"),
        SbatchOption("open-mode", "append", "every run of a requeued job appends to the log instead of "
                                            "overwriting it"),
        SbatchOption("output", LOG_PATTERN, "stdout and stderr of all ranks; the folder must exist before the "
                                            "job starts"),
    ]
    return options
