"""The control plane: MPI-style collectives on small Python objects, with two interchangeable backends.

`ControlPlane` is the one interface the trainers use to agree on things (iteration numbers, shard lists, stop flags):
barrier, broadcast/gather/allgather of picklable objects, and abort-with-reason. `TorchControlPlane` runs on a gloo
group spanning the world (CPU sockets, also in NCCL jobs) and, when built with `from_world`, watches the job's store so
that a failing rank ends the others (see guard.py). `MPIControlPlane` runs on an mpi4py communicator (jobs started by
mpiexec/mpirun); its abort is MPI_Abort, which ends every rank of the job.
Ranks given to these methods are ranks within the plane's group (equal to global ranks for world-spanning planes).

`build_control_plane` picks one at start-up (`choose_control_plane`, a pure function of the environment): the MPI plane
when an MPI launcher (mpiexec/mpirun, `srun --mpi=pmix` or `--mpi=pmi2`) started exactly the job's ranks and mpi4py is
installed, else the torch one. HPC_RLHF_CONTROL_PLANE=torch|mpi|auto (default auto) overrides the choice.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any, Literal, NoReturn, Protocol, runtime_checkable

import torch.distributed as dist

from hpc_rlhf.distributed.guard import FailureBoard, FailureWatchdog, announce, stop_job
from hpc_rlhf.distributed.world import DistributedWorld, WorldError

ControlPlaneKind = Literal["torch", "mpi"]
CONTROL_PLANE_ENV = "HPC_RLHF_CONTROL_PLANE"


@runtime_checkable
class ControlPlane(Protocol):
    """Collectives on small Python objects; every member must call each collective in the same order."""

    @property
    def rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def barrier(self) -> None: ...

    def broadcast_object(self, obj: Any, src: int = 0) -> Any: ...

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None: ...

    def allgather_object(self, obj: Any) -> list[Any]: ...

    def abort(self, reason: str) -> NoReturn: ...

    def close(self) -> None: ...


def _check_root(name: str, root: int, world_size: int) -> None:
    if not 0 <= root < world_size:
        raise ValueError(f"{name}={root} is outside the control plane's {world_size} ranks")


class TorchControlPlane:
    """Control plane over a torch.distributed gloo group; `abort` publishes the reason to the failure board."""

    def __init__(self, group: dist.ProcessGroup | None = None, *, board: FailureBoard | None = None,
                 watchdog: FailureWatchdog | None = None, grace_s: float = 10.0) -> None:
        self.group = dist.group.WORLD if group is None else group
        if dist.get_rank(self.group) < 0:
            raise ValueError(f"global rank {dist.get_rank()} is not a member of the control group")
        self.board, self.watchdog, self.grace_s = board, watchdog, grace_s

    @classmethod
    def from_world(cls, world: DistributedWorld, *, watch: bool = True, poll_interval_s: float = 0.2,
                   grace_s: float = 10.0) -> TorchControlPlane:
        """The world's control plane, with failure propagation through the world's store when `watch` is set."""
        board = FailureBoard(world.store)
        watchdog = None
        if watch:
            watchdog = FailureWatchdog(world.info.master_addr, world.info.master_port, world.info.rank,
                                       world.info.world_size, poll_interval_s=poll_interval_s,
                                       grace_s=grace_s).start()
        return cls(world.control_group, board=board, watchdog=watchdog, grace_s=grace_s)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank)

    def barrier(self) -> None:
        dist.barrier(group=self.group)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        _check_root("src", src, self.world_size)
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        return box[0]

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        _check_root("dst", dst, self.world_size)
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=self._global(dst), group=self.group)
        return out

    def allgather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def abort(self, reason: str) -> NoReturn:
        """End the whole job: record `reason` (first failure wins) so every rank's watchdog stops its process."""
        stop_job(self.board, dist.get_rank(), dist.get_world_size(), reason, grace_s=self.grace_s)

    def close(self) -> None:
        """Normal shutdown of the failure watchdog; call once all collectives are done."""
        if self.watchdog is not None:
            self.watchdog.close()


class MPIControlPlane:
    """Control plane over an mpi4py communicator (COMM_WORLD by default)."""

    def __init__(self, comm: Any = None) -> None:
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self.comm = comm

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def world_size(self) -> int:
        return self.comm.Get_size()

    def barrier(self) -> None:
        self.comm.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        _check_root("src", src, self.world_size)
        return self.comm.bcast(obj, root=src)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        _check_root("dst", dst, self.world_size)
        return self.comm.gather(obj, root=dst)

    def allgather_object(self, obj: Any) -> list[Any]:
        return self.comm.allgather(obj)

    def abort(self, reason: str) -> NoReturn:
        """End every rank of the job through MPI_Abort after printing `reason` (the launcher forwards stderr)."""
        announce(f"[rank {self.rank}] aborting the job: {reason}")
        self.comm.Abort(1)
        os._exit(1)  # MPI_Abort does not return; this line only documents that

    def close(self) -> None:
        """Nothing to release: MPI finalises at interpreter exit."""


# ---------------------------------------------------------------------------------------------------------- selection
def mpi_launch_size(env: Mapping[str, str]) -> int | None:
    """How many processes an MPI launcher started, read from its environment; None when none started this one.

    Open MPI's mpiexec/mpirun: OMPI_COMM_WORLD_SIZE. MPICH / Intel MPI (Hydra) and `srun --mpi=pmi2`: PMI_SIZE.
    `srun --mpi=pmix` sets PMIX_RANK but no size: its MPI world is the job step (SLURM_STEP_NUM_TASKS).
    """
    for name in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if name in env:
            return _count(env, name)
    if "PMIX_RANK" in env:
        for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
            if name in env:
                return _count(env, name)
    return None


def _count(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise WorldError(f"environment variable {name}={env[name]!r} is not an integer") from None


def choose_control_plane(env: Mapping[str, str], world_size: int, *, mpi_importable: bool) -> ControlPlaneKind:
    """'mpi' when an MPI launcher started exactly the job's `world_size` ranks and mpi4py can be imported, else 'torch'.

    HPC_RLHF_CONTROL_PLANE=torch or =mpi in `env` overrides that; =mpi raises a WorldError when the MPI plane cannot
    span the job (no mpi4py, or an MPI world of another size; without a launcher MPI is one process).
    """
    value = env.get(CONTROL_PLANE_ENV, "").strip().lower() or "auto"
    if value not in ("auto", "torch", "mpi"):
        raise WorldError(f"{CONTROL_PLANE_ENV}={env[CONTROL_PLANE_ENV]!r}: expected torch, mpi or auto")
    if value == "torch":
        return "torch"
    size = mpi_launch_size(env)
    if value == "auto":
        return "mpi" if mpi_importable and size == world_size else "torch"
    if not mpi_importable:
        raise WorldError(f"{CONTROL_PLANE_ENV}=mpi but mpi4py cannot be imported (pip install mpi4py)")
    launched = 1 if size is None else size
    if launched != world_size:
        started = "no MPI launcher started this process" if size is None else f"the MPI launcher started {size}"
        raise WorldError(f"{CONTROL_PLANE_ENV}=mpi but {started} and the job has {world_size} ranks; start it with "
                         f"mpiexec -n {world_size} or srun --mpi=pmix, or set {CONTROL_PLANE_ENV}=torch")
    return "mpi"


def build_control_plane(world: DistributedWorld, env: Mapping[str, str] | None = None) -> ControlPlane:
    """The control plane `choose_control_plane` picks for this job (`env` defaults to `os.environ`); every rank calls.

    The MPI plane must number the ranks as the world does: a launcher whose MPI ranks differ from the torch ranks is a
    WorldError on every rank.
    """
    env = os.environ if env is None else env
    info = world.info
    kind = choose_control_plane(env, info.world_size, mpi_importable=importlib.util.find_spec("mpi4py") is not None)
    if kind == "torch":
        return TorchControlPlane.from_world(world)
    control = MPIControlPlane()
    ranks = control.allgather_object(info.rank)
    if ranks != list(range(info.world_size)):
        raise WorldError(f"MPI ranks 0..{control.world_size - 1} are torch ranks {ranks}; start the job with one "
                         f"launcher or set {CONTROL_PLANE_ENV}=torch")
    return control
