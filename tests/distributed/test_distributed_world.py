"""World bootstrap: launcher detection from environment variables, SLURM helpers, and spawn_local end to end."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hpc_rlhf.distributed.world import (
    WorldError,
    WorldInfo,
    detect_world,
    first_host_of_nodelist,
    first_slurm_host,
    slurm_port,
    tasks_on_node,
)

SLURM_ENV = {
    "SLURM_JOB_ID": "4242", "SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
    "SLURM_TASKS_PER_NODE": "2(x3)", "SLURM_JOB_NODELIST": "gpu[07-09]",
}


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
           "MASTER_ADDR": "node-a", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
    assert detect_world(env) == WorldInfo(rank=3, world_size=8, local_rank=1, local_world_size=2, node_rank=1,
                                          master_addr="node-a", master_port=29500, launcher="torchrun")


def test_torchrun_inside_srun_wins_over_slurm():
    env = SLURM_ENV | {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    assert detect_world(env).launcher == "torchrun"


def test_slurm_variables_with_scontrol(monkeypatch):
    calls = []

    def fake_scontrol(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="gpu07\ngpu08\ngpu09\n", stderr="")

    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/scontrol")
    info = detect_world(SLURM_ENV, run=fake_scontrol)
    assert calls == [["scontrol", "show", "hostnames", "gpu[07-09]"]]
    assert info == WorldInfo(rank=5, world_size=6, local_rank=1, local_world_size=2, node_rank=2,
                             master_addr="gpu07", master_port=10000 + 4242, launcher="slurm")


def test_slurm_step_variables_and_explicit_overrides(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no scontrol: our node-list parser
    env = SLURM_ENV | {"SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "2,2,1", "SLURM_PROCID": "4",
                       "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "gpu[08-09],cpu1"}
    info = detect_world(env)
    assert (info.world_size, info.local_world_size, info.master_addr) == (5, 1, "gpu08")
    overridden = detect_world(env | {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"})
    assert (overridden.master_addr, overridden.master_port) == ("10.0.0.1", 23456)


def test_slurm_errors_name_the_variable(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(WorldError, match="SLURM_NODEID is not set"):
        detect_world({k: v for k, v in SLURM_ENV.items() if k != "SLURM_NODEID"})
    with pytest.raises(WorldError, match=r"SLURM_PROCID='x' is not an integer"):
        detect_world(SLURM_ENV | {"SLURM_PROCID": "x"})
    with pytest.raises(WorldError, match=r"rank 6 is outside world_size 6"):
        detect_world(SLURM_ENV | {"SLURM_PROCID": "6"})
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/scontrol")
    failing = lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, stdout="", stderr="Invalid node name")
    with pytest.raises(WorldError, match="scontrol show hostnames gpu\\[07-09\\]` failed .*Invalid node name"):
        first_slurm_host("gpu[07-09]", run=failing)


def test_no_launcher_is_a_single_local_process():
    info = detect_world({"MASTER_PORT": "25000"})
    assert (info.rank, info.world_size, info.launcher, info.master_port) == (0, 1, "local", 25000)


@pytest.mark.parametrize("nodelist, first", [
    ("n1", "n1"), ("n[1-3]", "n1"), ("gpu[07-09,12],cpu1", "gpu07"), ("a1,b[2-4]", "a1"),
    ("rack[3-4]-node[010-020]", "rack3-node010"), ("n[5,2]", "n5"),
])
def test_first_host_of_nodelist(nodelist, first):
    assert first_host_of_nodelist(nodelist) == first


def test_tasks_per_node_and_port():
    assert [tasks_on_node("2(x3),1", n) for n in range(4)] == [2, 2, 2, 1]
    assert tasks_on_node("8", 0) == 8
    with pytest.raises(WorldError, match="node 4 is not among the 4 nodes"):
        tasks_on_node("2(x3),1", 4)
    assert slurm_port("123456") == 10000 + 123456 % 20000
    assert slurm_port("777_3") == 10000 + 7773  # array job ids keep their digits
    assert 10000 <= slurm_port(99999999) < 30000


@pytest.mark.timeout(120)
def test_spawn_local_runs_ranks_and_reports_a_failing_rank(run_worker):
    record = run_worker("spawn", timeout_s=110)
    assert [r["rank"] for r in record["results"]] == [0, 1, 2]
    assert all(r["sum"] == 0 * 10 + 1 * 10 + 2 * 10 for r in record["results"])
    assert [r["env_rank"] for r in record["results"]] == ["0", "1", "2"]
    assert {r["launcher"] for r in record["results"]} == {"local"}
    assert "spawned rank 1 fails on purpose" in record["failure"]


class FakeComm:
    """Stands in for mpi4py's COMM_WORLD: fixed hosts per rank, and rank 0's (host, port) for the broadcast."""

    def __init__(self, rank: int, hosts: list[str], root_answer: tuple[str, int]) -> None:
        self.rank, self.hosts, self.root_answer = rank, hosts, root_answer

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return len(self.hosts)

    def allgather(self, value):
        assert value == self.hosts[self.rank]
        return list(self.hosts)

    def bcast(self, value, root):
        assert root == 0 and (value is None) == (self.rank != 0)
        return self.root_answer


def test_mpi_launcher_numbers_nodes_by_first_rank():
    import socket

    me = socket.gethostname()
    comm = FakeComm(rank=3, hosts=["other", "other", me, me, "third"], root_answer=("other", 31000))
    info = detect_world({"OMPI_COMM_WORLD_RANK": "3"}, mpi_comm=comm)
    assert info == WorldInfo(rank=3, world_size=5, local_rank=1, local_world_size=2, node_rank=1,
                             master_addr="other", master_port=31000, launcher="mpi")
    with_env = detect_world({"PMI_RANK": "3", "MASTER_ADDR": "m", "MASTER_PORT": "20001"}, mpi_comm=comm)
    assert (with_env.master_addr, with_env.master_port) == ("m", 20001)


def test_end_finished_process_runs_atexit_handlers_flushes_and_keeps_the_code(tmp_path):
    """A finished rank leaves through end_finished_process: its atexit handlers run, unflushed output arrives and the
    exit code is the one given."""
    marker = tmp_path / "atexit_ran"
    script = (
        "import atexit, sys\n"
        "from pathlib import Path\n"
        "from hpc_rlhf.distributed.world import end_finished_process\n"
        f"atexit.register(lambda: Path({str(marker)!r}).write_text('yes'))\n"
        "sys.stdout.write('unflushed stdout')\n"
        "sys.stderr.write('unflushed stderr')\n"
        "end_finished_process(3)\n"
        "print('not reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "unflushed stdout" and done.stderr.endswith("unflushed stderr")
    assert marker.read_text() == "yes"
