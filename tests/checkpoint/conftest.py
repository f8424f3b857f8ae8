"""Fixtures of the checkpoint tests: one-process rank arguments, and launchers for worker scripts in workers/."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from hpc_rlhf.distributed.world import free_port

WORKERS = Path(__file__).with_name("workers")
REPO_ROOT = Path(__file__).resolve().parents[2]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's environment without launcher variables, with the repository importable and one thread per rank."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI", "TORCHELASTIC_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


@dataclass
class RankResult:
    rank: int
    returncode: int | None  # None: still running at the deadline, then killed
    log: str


@pytest.fixture(scope="session")
def launch_ranks(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., list[RankResult]]:
    """Run `workers/<script>` as `world_size` gloo ranks (torchrun-style variables); kill all at the deadline."""

    def launch(script: str, args: list[str], world_size: int, *, timeout_s: float) -> list[RankResult]:
        port = str(free_port())
        log_dir = tmp_path_factory.mktemp("logs")
        logs = [log_dir / f"{Path(script).stem}_rank{rank}_{time.monotonic_ns()}.log" for rank in range(world_size)]
        with contextlib.ExitStack() as stack:
            procs = []
            for rank in range(world_size):
                env = worker_env({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                                  "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": port})
                log = stack.enter_context(open(logs[rank], "w"))
                procs.append(subprocess.Popen([sys.executable, str(WORKERS / script), *args], env=env, stdout=log,
                                              stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True))
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                time.sleep(0.05)
            codes = []
            for proc in procs:
                codes.append(proc.poll())
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        return [RankResult(rank, codes[rank], logs[rank].read_text()) for rank in range(world_size)]

    return launch


@pytest.fixture(scope="session")
def start_worker() -> Callable[..., subprocess.Popen]:
    """Start `workers/<script> *args` as one process (stdout piped, stderr merged, text mode)."""

    def start(script: str, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(WORKERS / script), *args], env=worker_env(), cwd=REPO_ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    return start


def assert_same(expected: Any, actual: Any, where: str = "state") -> None:
    """Exact equality of nested states: tensors bit for bit (dtype and shape too), containers item by item."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: tensor vs {type(actual).__name__}"
        assert expected.dtype == actual.dtype and expected.shape == actual.shape, f"{where}: dtype/shape differ"
        assert torch.equal(expected, actual), f"{where}: values differ"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and expected.keys() == actual.keys(), f"{where}: keys differ"
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(expected) is type(actual) and len(expected) == len(actual), f"{where}: sequences differ"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{where}[{i}]")
    elif hasattr(expected, "__dict__") and not isinstance(expected, type):
        assert type(expected) is type(actual), f"{where}: {type(expected)} vs {type(actual)}"
        assert_same(vars(expected), vars(actual), f"{where}.__dict__")
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


@pytest.fixture(scope="session")
def same() -> Callable[[Any, Any], None]:
    """`assert_same` as a fixture (test modules cannot import each other or this file)."""
    return assert_same
