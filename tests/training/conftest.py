"""Fixtures for the training tests: the tiny model, the shared data builders, and multi-process runs."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

WORKER_PATH = Path(__file__).with_name("distributed_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 240


def _load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("training_distributed_worker", WORKER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def worker() -> ModuleType:
    """The worker script as a module: `tiny_llama`, `make_samples`, the loss functions."""
    return _load_worker()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, worker) -> Path:
    """A saved tiny random LlamaForCausalLM (seed 0)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    worker.tiny_llama(0).save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world_size: int, trainer_ranks: list[int], work_dir: Path, model_dir: Path,
              scenario: str = "roles") -> list[dict[str, Any]]:
    """Run `world_size` worker processes (one gloo world) and return the results of each data-parallel rank."""
    work_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    processes = []
    with contextlib.ExitStack() as logs:
        for rank in range(world_size):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
            log = logs.enter_context(open(work_dir / f"rank{rank}.log", "w"))
            processes.append(subprocess.Popen(
                [sys.executable, str(WORKER_PATH), "--scenario", scenario,
                 "--trainer-ranks", ",".join(map(str, trainer_ranks)), "--out", str(work_dir / "result"),
                 "--work-dir", str(work_dir), "--model-dir", str(model_dir)],
                env=env, stdout=log, stderr=subprocess.STDOUT))
        try:
            for process in processes:
                process.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for process in processes:
                process.kill()
            for process in processes:
                process.wait()
    codes = [process.returncode for process in processes]
    if any(code != 0 for code in codes):
        tails = "\n".join(f"--- rank {r} ---\n" + (work_dir / f"rank{r}.log").read_text()[-3000:]
                          for r in range(world_size))
        pytest.fail(f"worker processes exited with {codes} (timeout {RUN_TIMEOUT_S}s)\n{tails}")
    return [torch.load(f"{work_dir / 'result'}.dp{dp}", weights_only=False) for dp in range(len(trainer_ranks))]


@pytest.fixture(scope="session")
def subgroup_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, list[dict[str, Any]]]:
    """Ranks 1-2 of a 3-rank world train; rank 0 does not take part."""
    work_dir = tmp_path_factory.mktemp("subgroup")
    return work_dir, run_world(3, [1, 2], work_dir, tiny_model_dir)


@pytest.fixture(scope="session")
def world_run(tmp_path_factory, tiny_model_dir) -> tuple[Path, list[dict[str, Any]]]:
    """The same training on a plain 2-rank world."""
    work_dir = tmp_path_factory.mktemp("world")
    return work_dir, run_world(2, [0, 1], work_dir, tiny_model_dir)


@pytest.fixture
def run_offload_world():
    """Runs the offload scenario on a 1-rank world: `run_offload_world(work_dir, model_dir) -> [result]`."""
    return lambda work_dir, model_dir: run_world(1, [0], work_dir, model_dir, scenario="offload")


@pytest.fixture
def run_scenario():
    """`run_scenario(world_size, trainer_ranks, work_dir, model_dir, scenario) -> [result per data-parallel rank]`."""
    return lambda world_size, trainer_ranks, work_dir, model_dir, scenario: run_world(
        world_size, trainer_ranks, work_dir, model_dir, scenario=scenario)
