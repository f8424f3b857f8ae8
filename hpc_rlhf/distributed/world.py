"""World bootstrap: find out who we are from the launcher's environment, then start torch.distributed.

Launchers, checked in this order (the innermost launcher wins):
- torchrun (also torchrun started by srun): RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / GROUP_RANK.
- SLURM `srun`: SLURM_PROCID / SLURM_STEP_NUM_TASKS (or SLURM_NTASKS) / SLURM_LOCALID / SLURM_NODEID; the master is the
  first host of the step's node list (`scontrol show hostnames`) and the port is derived from the job id, so every rank
  agrees without talking.
- an MPI launcher (mpiexec / mpirun): OMPI_COMM_WORLD_* or PMI_*; rank 0's host and a free port are shared through mpi4py.
- none: a single local process (rank 0 of 1). `spawn_local` starts several local processes itself.
MASTER_ADDR / MASTER_PORT already in the environment always win.

`init_distributed` starts one TCPStore (hosted by rank 0) and the default process group on it: gloo on CPU, NCCL on GPU
with `device_id` set, plus a world-spanning gloo group for the control plane. The store is kept because the failure
guard (`guard.py`) publishes a failing rank's reason there.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import torch
import torch.distributed as dist

from hpc_rlhf.slurm.env import SlurmEnvError, parse_tasks_per_node

Launcher = Literal["torchrun", "slurm", "mpi", "local"]
SLURM_PORT_BASE = 10_000
SLURM_PORT_SPAN = 20_000  # ports 10000-29999: below Linux's ephemeral range (32768+)


class WorldError(RuntimeError):
    """The launcher environment is incomplete or inconsistent; the message names the variable."""


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits in the job; identical in shape on every rank."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    master_addr: str
    master_port: int
    launcher: Launcher

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise WorldError(f"rank {self.rank} is outside world_size {self.world_size} (launcher {self.launcher})")
        if not 0 <= self.local_rank < self.local_world_size:
            raise WorldError(f"local_rank {self.local_rank} is outside local_world_size {self.local_world_size} "
                             f"(launcher {self.launcher})")
        if not 0 < self.master_port < 65536:
            raise WorldError(f"master_port {self.master_port} is not a TCP port (launcher {self.launcher})")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class DistributedWorld:
    """The initialised world: its info, backend and device, the shared store, and the gloo control-plane group."""

    info: WorldInfo
    backend: str
    device: torch.device
    store: dist.Store
    control_group: dist.ProcessGroup

    def close(self) -> None:
        """Tear down every process group of this process."""
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------- helpers
def _int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name)
    if value is None:
        raise WorldError(f"environment variable {name} is not set")
    try:
        return int(value)
    except ValueError:
        raise WorldError(f"environment variable {name}={value!r} is not an integer") from None


def slurm_port(job_id: str | int) -> int:
    """The rendezvous port of a SLURM job, a pure function of its id so every rank computes the same one."""
    digits = re.sub(r"\D", "", str(job_id))  # heterogeneous or array ids such as 1234+1 or 1234_7
    if not digits:
        raise WorldError(f"SLURM_JOB_ID={job_id!r} holds no digits to derive a port from")
    return SLURM_PORT_BASE + int(digits) % SLURM_PORT_SPAN


def first_host_of_nodelist(nodelist: str) -> str:
    """First host of a compressed SLURM node list, e.g. 'gpu[07-09,12],cpu1' -> 'gpu07' (zero padding kept)."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first entry
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    if not entry or entry.count("[") != entry.count("]"):
        raise WorldError(f"cannot read a host from SLURM node list {nodelist!r}")
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], entry)


def first_slurm_host(nodelist: str, run: Callable[..., Any] = subprocess.run) -> str:
    """First host of the node list, expanded by `scontrol show hostnames` (falls back to our parser without it)."""
    if shutil.which("scontrol") is None:
        return first_host_of_nodelist(nodelist)
    result = run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    hosts = result.stdout.split()
    if result.returncode != 0 or not hosts:
        raise WorldError(f"`scontrol show hostnames {nodelist}` failed (exit {result.returncode}): "
                         f"{result.stderr.strip()}")
    return hosts[0]


def tasks_on_node(tasks_per_node: str, node_rank: int) -> int:
    """Tasks on node `node_rank` from SLURM's compressed form, e.g. '2(x3),1' -> node 3 has 1 task."""

    try:
        counts = parse_tasks_per_node(tasks_per_node)
    except SlurmEnvError as error:
        raise WorldError(f"cannot parse SLURM tasks-per-node value {tasks_per_node!r}: {error}") from None
    if not 0 <= node_rank < len(counts):
        raise WorldError(f"node {node_rank} is not among the {len(counts)} nodes of tasks-per-node {tasks_per_node!r}")
    return counts[node_rank]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for local runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------- detection
def _from_torchrun(env: Mapping[str, str]) -> WorldInfo:
    rank, world_size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_world_size = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world_size
    node_rank = _int(env, "GROUP_RANK") if "GROUP_RANK" in env else rank // local_world_size
    return WorldInfo(rank=rank, world_size=world_size, local_rank=_int(env, "LOCAL_RANK"),
                     local_world_size=local_world_size, node_rank=node_rank,
                     master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=_int(env, "MASTER_PORT"),
                     launcher="torchrun")


def _from_slurm(env: Mapping[str, str], run: Callable[..., Any]) -> WorldInfo:
    world_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    node_rank = _int(env, "SLURM_NODEID")
    if "SLURM_STEP_TASKS_PER_NODE" in env or "SLURM_TASKS_PER_NODE" in env:
        local_world_size = tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env["SLURM_TASKS_PER_NODE"],
                                         node_rank)
    else:
        local_world_size = _int(env, "SLURM_NTASKS_PER_NODE")
    if "MASTER_ADDR" in env:
        master_addr = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise WorldError("environment variable SLURM_JOB_NODELIST is not set (needed for MASTER_ADDR)")
        master_addr = first_slurm_host(nodelist, run)
    if "MASTER_PORT" in env:
        master_port = _int(env, "MASTER_PORT")
    else:
        if "SLURM_JOB_ID" not in env:
            raise WorldError("environment variable SLURM_JOB_ID is not set (needed for MASTER_PORT)")
        master_port = slurm_port(env["SLURM_JOB_ID"])
    return WorldInfo(rank=_int(env, "SLURM_PROCID"), world_size=_int(env, world_key),
                     local_rank=_int(env, "SLURM_LOCALID"), local_world_size=local_world_size, node_rank=node_rank,
                     master_addr=master_addr, master_port=master_port, launcher="slurm")


def _from_mpi(env: Mapping[str, str], comm: Any) -> WorldInfo:
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    rank, world_size = comm.Get_rank(), comm.Get_size()
    host = socket.gethostname()
    hosts = comm.allgather(host)
    node_order = list(dict.fromkeys(hosts))  # nodes numbered in order of their lowest rank
    local_ranks = [r for r, h in enumerate(hosts) if h == host]
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        master_addr, master_port = env["MASTER_ADDR"], _int(env, "MASTER_PORT")
    else:
        master_addr, master_port = comm.bcast((host, free_port("0.0.0.0")) if rank == 0 else None, root=0)
        master_addr = env.get("MASTER_ADDR", master_addr)
        master_port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else master_port
    return WorldInfo(rank=rank, world_size=world_size, local_rank=local_ranks.index(rank),
                     local_world_size=len(local_ranks), node_rank=node_order.index(host),
                     master_addr=master_addr, master_port=master_port, launcher="mpi")


def detect_world(env: Mapping[str, str] | None = None, *, mpi_comm: Any = None,
                 run: Callable[..., Any] = subprocess.run) -> WorldInfo:
    """Read this process's place in the job from `env` (default `os.environ`); see the module docstring for the order.

    `mpi_comm` replaces mpi4py's COMM_WORLD under an MPI launcher; `run` replaces `subprocess.run` for `scontrol`.
    """
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return _from_torchrun(env)
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        return _from_slurm(env, run)
    if "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env or "PMIX_RANK" in env:
        return _from_mpi(env, mpi_comm)
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()
    return WorldInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                     master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port, launcher="local")


# ------------------------------------------------------------------------------------------------------ initialisation
def init_distributed(info: WorldInfo, *, backend: str | None = None, timeout_s: float = 1800.0) -> DistributedWorld:
    """Start torch.distributed for `info`: NCCL (device = local GPU) when CUDA is there, else gloo; see module doc.

    Every rank of the job must call this once. The control group is the world itself under gloo, and an extra
    world-spanning gloo group under NCCL (small Python objects must not go through GPU memory).
    """
    if dist.is_initialized():
        raise WorldError("torch.distributed is already initialised in this process")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise WorldError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(info.master_addr, info.master_port, world_size=info.world_size, is_master=info.rank == 0,
                          timeout=timeout)
    if backend == "nccl":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=dist.PrefixStore("pg", store), rank=info.rank,
                                world_size=info.world_size, timeout=timeout, device_id=device)
        control_group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", store=dist.PrefixStore("pg", store), rank=info.rank,
                                world_size=info.world_size, timeout=timeout)
        control_group = dist.group.WORLD
    return DistributedWorld(info=info, backend=backend, device=device, store=store, control_group=control_group)


# --------------------------------------------------------------------------------------------------------- local spawn
def _spawn_entry(index: int, fn: Callable[..., Any], world_size: int, port: int, results: Any,
                 args: Sequence[Any]) -> None:
    """Child side of `spawn_local`: set the torchrun-style variables libraries read, run `fn`, send its result."""
    os.environ.update({"RANK": str(index), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(index),
                       "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    info = WorldInfo(rank=index, world_size=world_size, local_rank=index, local_world_size=world_size, node_rank=0,
                     master_addr="127.0.0.1", master_port=port, launcher="local")
    results.put((index, fn(info, *args)))
    end_finished_process(0)


def end_finished_process(code: int) -> NoReturn:
    """End a rank process whose work is done, written and torn down: the atexit handlers run, the interpreter's
    finalization does not.

    During finalization the native destructors of torch.distributed's gloo groups (and of other native thread pools)
    run while the interpreter is being torn down, and a finished rank now and then aborted there ("terminate called
    without an active exception", SIGABRT), failing a job after it had written everything.
    """
    atexit._run_exitfuncs()  # what a normal exit runs first: logging, multiprocessing children, libraries' own
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def spawn_local(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (),
                master_port: int | None = None) -> list[Any]:
    """Run `fn(world_info, *args)` in `world_size` fresh local processes; return their results in rank order.

    `fn` must be importable (a module-level function) and its result picklable. If any process raises or dies, the
    others are terminated and the error is raised here (torch.multiprocessing's ProcessRaisedException/ExitedException).
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise WorldError(f"world_size must be >= 1, got {world_size}")
    port = master_port or free_port()
    results = mp.get_context("spawn").SimpleQueue()
    context = mp.start_processes(_spawn_entry, args=(fn, world_size, port, results, tuple(args)),
                                 nprocs=world_size, join=False, start_method="spawn")
    collected: dict[int, Any] = {}
    while True:
        while not results.empty():  # drain while waiting so that large results never block a child
            rank, value = results.get()
            collected[rank] = value
        if context.join(timeout=0.1):
            break
    while not results.empty():
        rank, value = results.get()
        collected[rank] = value
    return [collected[rank] for rank in range(world_size)]
