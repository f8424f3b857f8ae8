"""The per-rank entry: every process of a job runs `rank_main`, whether started by srun, torchrun, mpiexec or locally.

    srun python -m hpc_rlhf.launch --config configs/ppo_70b.yaml [--section.key=value ...]   # one process per GPU

The wiring is explicit and in order: world -> layout plan -> role groups -> control plane -> components -> trainer.
"""

from __future__ import annotations

import faulthandler
import os
import sys

from hpc_rlhf.slurm.requeue import install_early_stop_handlers  # standard library only

if __name__ == "__main__" or os.environ.get("SLURM_STEP_ID"):  # a rank's process: catch stop signals from now on
    install_early_stop_handlers()  # until a handler exists, USR1/USR2 kill the process; the imports below take seconds

from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

import torch  # noqa: E402

from hpc_rlhf.builtin_models.resolve import resolve_model_path  # noqa: E402
from hpc_rlhf.cli import build_parser, parse_config_args, quiet_libraries, run_entry  # noqa: E402
from hpc_rlhf.config.preflight import check_machine  # noqa: E402
from hpc_rlhf.config.loading import LoadedConfig, config_to_dict  # noqa: E402
from hpc_rlhf.config.schema import Config  # noqa: E402
from hpc_rlhf.distributed import (  # noqa: E402
    ControlPlane,
    DistributedWorld,
    LayoutError,
    WorldInfo,
    build_control_plane,
    build_role_groups,
    detect_world,
    end_finished_process,
    init_distributed,
    plan_layout,
    run_guarded,
    spawn_local,
)
from hpc_rlhf.errors import UsageError  # noqa: E402
from hpc_rlhf.run.directory import RunDirConflict, check_run_dir, record_run_config  # noqa: E402
from hpc_rlhf.slurm.requeue import StopRequest  # noqa: E402
from hpc_rlhf.trainers.engines import use_cuda  # noqa: E402


def rank_main(info: WorldInfo, cfg: Config) -> dict[str, float]:
    """Run this rank's part of the job described by `cfg`; returns the last metrics (rank 0 logs them).

    Stop requests (the batch script's stop flag, USR1/USR2 from SLURM or submitit, SIGTERM) are only recorded by the
    handlers; the loop polls them at tick boundaries, checkpoints, and rank 0 requeues the job when asked to.
    """
    faulthandler.enable()  # a native crash (SIGSEGV, SIGABRT) prints every thread's Python stack first
    stop = StopRequest.for_slurm_job(cfg.train.run_dir).install()
    if info.rank == 0:
        stop.clear_stale_flag()

    # Libraries (DeepSpeed, vLLM) read the torchrun-style variables whatever launcher started us.
    os.environ.update({"RANK": str(info.rank), "WORLD_SIZE": str(info.world_size), "LOCAL_RANK": str(info.local_rank),
                       "LOCAL_WORLD_SIZE": str(info.local_world_size), "MASTER_ADDR": info.master_addr,
                       "MASTER_PORT": str(info.master_port)})
    world = init_distributed(info, backend="nccl" if use_cuda(cfg) else "gloo")
    control = build_control_plane(world)  # MPI under mpiexec / srun --mpi=pmix, else torch (HPC_RLHF_CONTROL_PLANE)
    try:
        return run_guarded(_run_trainer, control, cfg, world, control, stop)
    finally:
        stop.uninstall()
        control.close()
        world.close()


def _run_trainer(cfg: Config, world: DistributedWorld, control: ControlPlane, stop: StopRequest) -> dict[str, float]:
    info = world.info
    if info.rank == 0:  # build built-in models once, before any other rank looks for them
        build_builtin_models(cfg)
    control.barrier()
    plan = plan_layout(cfg.layout, info.world_size, info.local_world_size)
    if info.rank == 0 and plan.scaled_from is not None:  # layout.scale: proportional: say what this start got
        print(plan.describe(), flush=True)
    groups = build_role_groups(plan, info.rank, ring_attn_size=cfg.ds.ring_attn_size)
    torch.manual_seed(cfg.train.seed)
    from hpc_rlhf.trainers.registry import trainer_entry  # imports DeepSpeed: only after quiet_libraries ran

    metrics = trainer_entry(cfg.train.trainer)(cfg, world, groups, control, stop=stop)
    # every rank is done with its collectives before any tears its process groups down and exits
    control.barrier()
    return metrics


def build_builtin_models(cfg: Config) -> None:
    """Resolve every `builtin:` model spec of the config (building it into the cache on first use)."""
    teacher = getattr(getattr(cfg, "kd", None), "teacher_pretrain", None)
    for spec in (cfg.actor.pretrain, cfg.critic.pretrain, cfg.ref.pretrain, cfg.reward.pretrain, teacher):
        if spec:
            resolve_model_path(spec)


def check_before_start(loaded: LoadedConfig, *, ranks_here: int = 1) -> None:
    """The checks that need this machine (device, model and data paths), before the run directory is touched or any
    model loads; a problem is a UsageError (one line each at the entry point)."""
    problems = check_machine(loaded.config, loaded.sources, ranks_here=ranks_here)
    if problems:
        raise UsageError("\n".join(problems))


def check_layout_fits(cfg: Config, info: WorldInfo) -> None:
    """The layout must fit the ranks this job got (SLURM_NTASKS, re-planned with layout.scale: proportional); refused
    before the ranks connect, with the arithmetic."""
    try:
        plan_layout(cfg.layout, info.world_size, info.local_world_size)
    except LayoutError as err:
        raise UsageError(f"this job has {info.world_size} rank(s), {info.local_world_size} per node: {err}") from None


def prepare_run_dir(loaded: LoadedConfig, *, overwrite: bool = False, write: bool = True) -> Path:
    """Create the run directory and record the resolved config there (for provenance and resume checks).

    A directory holding another run (a config that differs in keys a resume must keep) is refused with a UsageError
    before anything is written, unless `overwrite` first moves that run to RUN_DIR/previous/N/ (hpc_rlhf.run.directory).
    A requeue or resume of the same run passes. `write=False` only checks (the other ranks of a SLURM job).
    """
    config = config_to_dict(loaded.config)
    try:
        if not write:
            check_run_dir(loaded.config.train.run_dir, config, overwrite=overwrite)
            return Path(loaded.config.train.run_dir)
        run_dir, outcome = record_run_config(loaded.config.train.run_dir, config, overwrite=overwrite)
    except RunDirConflict as err:
        raise UsageError(str(err)) from None
    if outcome.startswith("moved:"):
        print(f"{run_dir}: the earlier run's files are now in {outcome.removeprefix('moved:')}", file=sys.stderr)
    return run_dir


def run_local(loaded: LoadedConfig, *, overwrite_run_dir: bool = False) -> int:
    """`python -m hpc_rlhf.train`: one process per rank of the layout on this machine."""
    cfg = loaded.config
    # A proportional layout is planned for the job's ranks: locally, the config's slurm.nodes x gpus_per_node.
    world_size = cfg.slurm.nodes * cfg.slurm.gpus_per_node if cfg.layout.scale == "proportional" \
        else cfg.layout.world_size()
    quiet_libraries(cpu_only=not use_cuda(cfg))
    prepare_run_dir(loaded, overwrite=overwrite_run_dir, write=False)  # every check before anything is written
    check_before_start(loaded, ranks_here=world_size)
    prepare_run_dir(loaded, overwrite=overwrite_run_dir)
    if world_size == 1:
        rank_main(detect_world({}), cfg)
    else:
        spawn_local(_local_rank_entry, world_size, args=(cfg,))
    print(f"done: results in {cfg.train.run_dir}", file=sys.stderr)
    return 0


def _local_rank_entry(info: WorldInfo, cfg: Config) -> dict[str, float]:
    return rank_main(info, cfg)


def main(argv: Sequence[str] | None = None) -> int:
    """Every rank checks this machine and the run directory (rank 0 records the config), then runs its part; an
    error before the ranks connect is one line per rank (--debug for tracebacks)."""
    parser = build_parser("python -m hpc_rlhf.launch", __doc__.strip().splitlines()[0])

    def start() -> int:
        args, loaded = parse_config_args(parser, argv)

        info = detect_world()
        quiet_libraries(cpu_only=not use_cuda(loaded.config))
        prepare_run_dir(loaded, overwrite=args.overwrite_run_dir, write=False)  # every check before any write
        check_before_start(loaded)  # GPUs per task depend on SLURM's binding: only check that there are some
        check_layout_fits(loaded.config, info)
        prepare_run_dir(loaded, overwrite=args.overwrite_run_dir, write=info.rank == 0)
        rank_main(info, loaded.config)
        return 0

    return run_entry(parser.prog, start)


if __name__ == "__main__":
    end_finished_process(main())  # not sys.exit: see end_finished_process
