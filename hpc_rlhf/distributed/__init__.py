"""The distributed runtime without Ray: world bootstrap, role groups, control plane, failure guard and weight plane.

Typical use on every rank:

    info = detect_world()                               # SLURM, torchrun, mpiexec or a single local process
    world = init_distributed(info)                      # gloo on CPU, NCCL (+ gloo control group) on GPU
    control = build_control_plane(world)                # MPIControlPlane under an MPI launcher, else torch
    plan = plan_layout(cfg.layout, info.world_size, info.local_world_size)   # pure; raises LayoutError
    groups = build_role_groups(plan, info.rank)         # collective: every rank, same order
    run_guarded(main, control, world, groups)           # an exception on one rank stops every rank with its reason
"""

from hpc_rlhf.distributed.control import (
    ControlPlane,
    MPIControlPlane,
    TorchControlPlane,
    build_control_plane,
    choose_control_plane,
    mpi_launch_size,
)
from hpc_rlhf.distributed.groups import RoleGroups, build_role_groups
from hpc_rlhf.distributed.guard import FailureBoard, FailureReport, FailureWatchdog, run_guarded, stop_job
from hpc_rlhf.distributed.layout import ROLE_ORDER, LayoutError, LayoutPlan, RankRoles, plan_layout
from hpc_rlhf.distributed.weights import (
    TensorSpec,
    WeightLoader,
    WeightManifest,
    WeightSyncError,
    apply_named_tensor,
    broadcast_weights,
    full_named_parameters,
    load_named_tensors,
    plan_buckets,
    receive_weight_stream,
    receive_weights,
    sync_weights,
)
from hpc_rlhf.distributed.world import (
    DistributedWorld,
    WorldError,
    WorldInfo,
    detect_world,
    end_finished_process,
    free_port,
    init_distributed,
    slurm_port,
    spawn_local,
)

__all__ = [
    "ROLE_ORDER",
    "ControlPlane",
    "DistributedWorld",
    "FailureBoard",
    "FailureReport",
    "FailureWatchdog",
    "LayoutError",
    "LayoutPlan",
    "MPIControlPlane",
    "RankRoles",
    "RoleGroups",
    "TensorSpec",
    "TorchControlPlane",
    "WeightLoader",
    "WeightManifest",
    "WeightSyncError",
    "WorldError",
    "WorldInfo",
    "apply_named_tensor",
    "broadcast_weights",
    "build_control_plane",
    "build_role_groups",
    "choose_control_plane",
    "detect_world",
    "end_finished_process",
    "free_port",
    "full_named_parameters",
    "init_distributed",
    "load_named_tensors",
    "mpi_launch_size",
    "plan_buckets",
    "plan_layout",
    "receive_weight_stream",
    "receive_weights",
    "run_guarded",
    "slurm_port",
    "spawn_local",
    "stop_job",
    "sync_weights",
]
