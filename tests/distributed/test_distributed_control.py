"""Control plane collectives with real processes: torch gloo (4 ranks) and mpi4py under mpiexec (4 ranks)."""

from __future__ import annotations

import json

import pytest

from tests.distributed.rank_runs import assert_ranks_succeeded


@pytest.mark.timeout(120)
def test_torch_control_plane_collectives(launch_ranks, tmp_path):
    runs = launch_ranks("control", 4, timeout_s=100)
    assert_ranks_succeeded(runs)  # clean shutdown: no watchdog fires at exit
    records = [run.record(tmp_path) for run in runs]
    for rank, record in enumerate(records):
        assert record["info"]["rank"] == rank and record["info"]["world_size"] == 4
        assert record["info"]["launcher"] == "torchrun"
        assert record["broadcast"] == {"from": 1, "payload": [1, 2, 3]}
        assert record["allgather"] == ["r0", "r1", "r2", "r3"]
        expected_gather = [["rank", r, r * r] for r in range(4)] if rank == 2 else None
        assert record["gather"] == expected_gather


@pytest.mark.timeout(120)
def test_mpi_control_plane_and_mpi_bootstrap(launch_mpi, tmp_path):
    result, _ = launch_mpi("mpi_control", 4, timeout_s=100)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    ports = {record["info"]["master_port"] for record in records}
    assert len(ports) == 1  # rank 0's port reached every rank through mpi4py
    for rank, record in enumerate(records):
        info = record["info"]
        assert (info["rank"], info["world_size"], info["launcher"]) == (rank, 4, "mpi")
        assert (info["local_rank"], info["local_world_size"], info["node_rank"]) == (rank, 4, 0)
        assert record["broadcast"] == {"from": 3}
        assert record["gather"] == ([0, 10, 20, 30] if rank == 1 else None)
        assert record["allgather"] == [100, 101, 102, 103]
        assert record["gloo_sum"] == 0 + 1 + 2 + 3  # the gloo world built from the MPI environment works
