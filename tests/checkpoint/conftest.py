"""Fixtures of the checkpoint tests: a launcher for the worker scripts in workers/, and exact state comparison."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

WORKERS = Path(__file__).with_name("workers")
REPO_ROOT = Path(__file__).resolve().parents[2]


def worker_env() -> dict[str, str]:
    """The test's environment without launcher variables, with the repository importable and one thread."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI", "TORCHELASTIC_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


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
