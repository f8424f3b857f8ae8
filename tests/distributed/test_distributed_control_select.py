"""Which control plane a job gets: `choose_control_plane` on launcher environments, and `rank_main` under a real
`mpiexec -n 2` (MPI plane) and a torchrun-style start (torch plane)."""

from __future__ import annotations

import json

import pytest

from hpc_rlhf.distributed import WorldError, choose_control_plane, mpi_launch_size
from tests.distributed.rank_runs import assert_ranks_succeeded

OPEN_MPI = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1", "PMIX_RANK": "1"}
HYDRA = {"PMI_SIZE": "4", "PMI_RANK": "1", "MPI_LOCALNRANKS": "2"}  # MPICH / Intel MPI, and srun --mpi=pmi2
SRUN_PMIX = {"PMIX_RANK": "1", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "8"}
SRUN_PLAIN = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4"}
TORCHRUN = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}


@pytest.mark.parametrize("env, size", [(OPEN_MPI, 4), (HYDRA, 4), (SRUN_PMIX, 4), ({"PMIX_RANK": "0"}, None),
                                       (SRUN_PLAIN, None), (TORCHRUN, None), ({}, None)])
def test_mpi_launch_size_reads_each_launcher(env, size):
    assert mpi_launch_size(env) == size


@pytest.mark.parametrize("env", [OPEN_MPI, HYDRA, SRUN_PMIX])
def test_an_mpi_launch_of_the_whole_job_gets_the_mpi_plane(env):
    assert choose_control_plane(env, 4, mpi_importable=True) == "mpi"
    assert choose_control_plane(env, 4, mpi_importable=False) == "torch"  # no mpi4py: torch, quietly
    assert choose_control_plane(env, 8, mpi_importable=True) == "torch"  # e.g. mpiexec per node starting torchrun


@pytest.mark.parametrize("env", [SRUN_PLAIN, TORCHRUN, {}])
def test_other_launchers_get_the_torch_plane(env):
    assert choose_control_plane(env, 4, mpi_importable=True) == "torch"


def test_the_environment_override():
    assert choose_control_plane({**OPEN_MPI, "HPC_RLHF_CONTROL_PLANE": "torch"}, 4, mpi_importable=True) == "torch"
    assert choose_control_plane({**OPEN_MPI, "HPC_RLHF_CONTROL_PLANE": " MPI "}, 4, mpi_importable=True) == "mpi"
    assert choose_control_plane({**OPEN_MPI, "HPC_RLHF_CONTROL_PLANE": "auto"}, 4, mpi_importable=True) == "mpi"
    assert choose_control_plane({"HPC_RLHF_CONTROL_PLANE": "mpi"}, 1, mpi_importable=True) == "mpi"  # a singleton
    with pytest.raises(WorldError, match="HPC_RLHF_CONTROL_PLANE='gloo': expected torch, mpi or auto"):
        choose_control_plane({"HPC_RLHF_CONTROL_PLANE": "gloo"}, 4, mpi_importable=True)
    with pytest.raises(WorldError, match="mpi4py cannot be imported"):
        choose_control_plane({**OPEN_MPI, "HPC_RLHF_CONTROL_PLANE": "mpi"}, 4, mpi_importable=False)
    with pytest.raises(WorldError, match="the MPI launcher started 4 and the job has 8 ranks"):
        choose_control_plane({**OPEN_MPI, "HPC_RLHF_CONTROL_PLANE": "mpi"}, 8, mpi_importable=True)
    with pytest.raises(WorldError, match="no MPI launcher started this process and the job has 4 ranks"):
        choose_control_plane({**TORCHRUN, "HPC_RLHF_CONTROL_PLANE": "mpi"}, 4, mpi_importable=True)
    with pytest.raises(WorldError, match="OMPI_COMM_WORLD_SIZE='four' is not an integer"):
        choose_control_plane({"OMPI_COMM_WORLD_SIZE": "four"}, 4, mpi_importable=True)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("override, plane", [(None, "MPIControlPlane"), ("torch", "TorchControlPlane")])
def test_rank_main_under_mpiexec(launch_mpi, tmp_path, override, plane):
    env = {"HPC_RLHF_CONTROL_PLANE": override} if override else {}
    result, _ = launch_mpi("launch_plane", 2, timeout_s=160, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record == {"plane": plane, "launcher": "mpi", "rank": rank, "world_size": 2, "allgather": [0, 10]}


@pytest.mark.timeout(180)
def test_rank_main_under_torchrun_keeps_the_torch_plane(launch_ranks, tmp_path):
    runs = launch_ranks("launch_plane", 2, timeout_s=160)
    assert_ranks_succeeded(runs)
    for run in runs:
        assert run.record(tmp_path)["plane"] == "TorchControlPlane"
