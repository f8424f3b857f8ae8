"""Fixtures for the training tests: the tiny model, the shared data builders, and multi-process runs."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.multiproc import run_ranks
from tests.training import distributed_worker

RUN_TIMEOUT_S = 240


@pytest.fixture(scope="session")
def worker() -> ModuleType:
    """The rank module: `tiny_llama`, `make_samples`, the loss functions."""
    return distributed_worker


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, worker) -> Path:
    """A saved tiny random LlamaForCausalLM (seed 0)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    worker.tiny_llama(0).save_pretrained(path)
    return path


def run_world(world_size: int, trainer_ranks: list[int], work_dir: Path, model_dir: Path,
              scenario: str = "roles") -> list[dict[str, Any]]:
    """Run `world_size` ranks (one gloo world) and return the results of each data-parallel rank."""
    work_dir.mkdir(parents=True, exist_ok=True)
    results = run_ranks(distributed_worker.run_rank, world_size, scenario, trainer_ranks, str(work_dir),
                        str(model_dir), timeout_s=RUN_TIMEOUT_S)
    return [results[rank] for rank in trainer_ranks]


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
