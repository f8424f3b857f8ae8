"""What a process learns about its SLURM job from the environment: job id, restarts, nodes, its place among the tasks.

SLURM exports job-wide variables (SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_TASKS_PER_NODE, ...) to the batch script and
step-wide ones (SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE, SLURM_PROCID, ...) to each task that `srun` starts.
Inside a step the step's values win, because a step may use only part of the allocation. Parsing is pure: node lists
are expanded by a function passed in (`scontrol show hostnames` by default, `expand_nodelist` without scontrol).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_TASKS_PER_NODE_ITEM = re.compile(r"(\d+)(?:\(x(\d+)\))?")
_HOST_ITEM = re.compile(r"([^\[\],]*)(?:\[([^\[\]]*)\])?")


class SlurmEnvError(ValueError):
    """A SLURM variable is missing or malformed; the message names the variable and its value."""


def parse_tasks_per_node(value: str, variable: str = "SLURM_TASKS_PER_NODE") -> tuple[int, ...]:
    """Tasks on each node from SLURM's compressed form: '2(x3),1' -> (2, 2, 2, 1)."""
    counts: list[int] = []
    for item in value.split(","):
        match = _TASKS_PER_NODE_ITEM.fullmatch(item.strip())
        if match is None:
            raise SlurmEnvError(f"{variable}={value!r}: cannot parse {item!r} (expected N or N(xK), comma-separated)")
        repeat = int(match.group(2) or 1)
        if repeat < 1:
            raise SlurmEnvError(f"{variable}={value!r}: repeat count in {item!r} must be at least 1")
        counts += [int(match.group(1))] * repeat
    return tuple(counts)


def expand_nodelist(nodelist: str) -> tuple[str, ...]:
    """Host names of a SLURM node list such as 'gpu[01-03,07],login1' (the forms `scontrol show hostnames` accepts).

    A range keeps the zero padding of its lower bound: 'n[08-10]' -> n08 n09 n10; 'n[9-11]' -> n9 n10 n11.
    """
    hosts: list[str] = []
    position = 0
    text = nodelist.strip()
    while position < len(text):
        match = _HOST_ITEM.match(text, position)
        assert match is not None  # the pattern can match the empty string
        prefix, ranges = match.group(1), match.group(2)
        end = match.end()
        if end < len(text) and text[end] != ",":
            raise SlurmEnvError(f"node list {nodelist!r}: unexpected {text[end]!r} at position {end}")
        if ranges is None:
            if prefix:
                hosts.append(prefix)
        else:
            hosts += [prefix + suffix for suffix in _expand_ranges(ranges, nodelist)]
        position = end + 1
    return tuple(hosts)


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """The suffixes of one bracket: '01-03,7' -> ['01', '02', '03', '7']."""
    suffixes: list[str] = []
    for part in ranges.split(","):
        low, sep, high = part.strip().partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise SlurmEnvError(f"node list {nodelist!r}: invalid range {part!r}")
        if not sep:
            suffixes.append(low)
            continue
        if int(high) < int(low):
            raise SlurmEnvError(f"node list {nodelist!r}: range {part!r} runs backwards")
        width = len(low)
        suffixes += [str(number).zfill(width) for number in range(int(low), int(high) + 1)]
    return suffixes


def scontrol_hostnames(nodelist: str) -> tuple[str, ...]:
    """Expand a node list with `scontrol show hostnames` (the authority), or `expand_nodelist` without scontrol."""
    if shutil.which("scontrol") is None:
        return expand_nodelist(nodelist)
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=False, capture_output=True, text=True,
                            timeout=60)
    hosts = tuple(result.stdout.split())
    # scontrol prints "Invalid hostlist" and still exits 0, so an error message or no hosts means failure
    if result.returncode != 0 or not hosts or "invalid" in result.stderr.lower():
        raise SlurmEnvError(f"`scontrol show hostnames {nodelist}` failed (exit {result.returncode}): "
                            f"{result.stderr.strip() or 'no hosts'}")
    return hosts


@dataclass(frozen=True)
class SlurmEnv:
    """This process's view of its SLURM job (and step, when started by `srun`)."""

    job_id: str
    job_name: str
    restart_count: int  # times this job was requeued (0 on the first run)
    nodes: tuple[str, ...]  # host names of the step's nodes (the job's in the batch script), in node-id order
    tasks_per_node: tuple[int, ...]  # tasks on each of `nodes`
    procid: int  # global rank among the step's tasks (0 in the batch script)
    ntasks: int  # tasks in the step (world size)
    nodeid: int  # index of this node in `nodes`
    localid: int  # rank among the tasks on this node
    in_step: bool  # True inside an `srun` task, False in the batch script itself
    submit_dir: str | None = None
    array_job_id: str | None = None
    array_task_id: int | None = None

    def __post_init__(self) -> None:
        if len(self.nodes) != len(self.tasks_per_node):
            raise SlurmEnvError(f"job {self.job_id}: {len(self.nodes)} nodes {self.nodes} but tasks-per-node has "
                                f"{len(self.tasks_per_node)} entries {self.tasks_per_node}")
        if sum(self.tasks_per_node) != self.ntasks:
            raise SlurmEnvError(f"job {self.job_id}: tasks per node {self.tasks_per_node} add up to "
                                f"{sum(self.tasks_per_node)}, not to the {self.ntasks} tasks of the step")
        if not 0 <= self.procid < self.ntasks:
            raise SlurmEnvError(f"job {self.job_id}: SLURM_PROCID={self.procid} is outside 0..{self.ntasks - 1}")
        if not 0 <= self.nodeid < len(self.nodes):
            raise SlurmEnvError(f"job {self.job_id}: SLURM_NODEID={self.nodeid} is outside 0..{len(self.nodes) - 1}")
        if not 0 <= self.localid < self.tasks_per_node[self.nodeid]:
            raise SlurmEnvError(f"job {self.job_id}: SLURM_LOCALID={self.localid} is outside "
                                f"0..{self.tasks_per_node[self.nodeid] - 1} on node {self.nodes[self.nodeid]}")

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def local_world_size(self) -> int:
        """Tasks on this process's node."""
        return self.tasks_per_node[self.nodeid]

    @property
    def node_name(self) -> str:
        return self.nodes[self.nodeid]

    @property
    def master_node(self) -> str:
        """The first node of the step: where global rank 0 runs under SLURM's default block distribution."""
        return self.nodes[0]

    @staticmethod
    def from_environ(environ: Mapping[str, str] | None = None,
                     expand: Callable[[str], tuple[str, ...]] = scontrol_hostnames) -> SlurmEnv:
        """Parse `environ` (default: os.environ); a missing or bad variable raises SlurmEnvError naming it."""
        env = os.environ if environ is None else environ
        if "SLURM_JOB_ID" not in env:
            raise SlurmEnvError("SLURM_JOB_ID is not set: this process is not part of a SLURM job")
        in_step = "SLURM_STEP_ID" in env
        nodelist = _first(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"), in_step)
        tasks_key = "SLURM_STEP_TASKS_PER_NODE" if in_step and "SLURM_STEP_TASKS_PER_NODE" in env else \
            "SLURM_TASKS_PER_NODE"
        nodes = expand(nodelist)
        if tasks_key in env:
            tasks_per_node = parse_tasks_per_node(env[tasks_key], tasks_key)
        else:  # a batch script without tasks requested: one task per node
            tasks_per_node = (1,) * len(nodes)
        ntasks_key = "SLURM_STEP_NUM_TASKS" if in_step and "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        ntasks = _int(env, ntasks_key) if ntasks_key in env else sum(tasks_per_node)
        array_task = env.get("SLURM_ARRAY_TASK_ID")
        return SlurmEnv(
            job_id=env["SLURM_JOB_ID"],
            job_name=env.get("SLURM_JOB_NAME", ""),
            restart_count=_int(env, "SLURM_RESTART_COUNT") if "SLURM_RESTART_COUNT" in env else 0,
            nodes=nodes,
            tasks_per_node=tasks_per_node,
            procid=_int(env, "SLURM_PROCID") if "SLURM_PROCID" in env else 0,
            ntasks=ntasks,
            nodeid=_int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0,
            localid=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            in_step=in_step,
            submit_dir=env.get("SLURM_SUBMIT_DIR"),
            array_job_id=env.get("SLURM_ARRAY_JOB_ID"),
            array_task_id=int(array_task) if array_task not in (None, "") else None,
        )


def in_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    """True when this process runs inside a SLURM allocation (batch script, srun task or salloc shell)."""
    return "SLURM_JOB_ID" in (os.environ if environ is None else environ)


def _first(env: Mapping[str, str], keys: tuple[str, ...], in_step: bool) -> str:
    """The value of the first present key; step keys are only considered inside a step."""
    for key in keys:
        if key.startswith("SLURM_STEP_") and not in_step:
            continue
        if env.get(key):
            return env[key]
    raise SlurmEnvError(f"none of {', '.join(keys)} is set: cannot tell the job's nodes")


def _int(env: Mapping[str, str], key: str) -> int:
    value = env[key]
    try:
        return int(value)
    except ValueError:
        raise SlurmEnvError(f"{key}={value!r} is not an integer") from None
