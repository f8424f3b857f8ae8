"""Fixtures shared by the rollout tests: synthetic rollout rows and paths for subprocess workers."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _make_rows(
    groups: int,
    group_size: int,
    *,
    first_group: int = 0,
    seed: int = 0,
    weight_version: int = 0,
    max_response: int = 12,
) -> list[dict[str, Any]]:
    """Rows with random lengths and values; group g holds prompt g, samples 0..group_size-1."""
    rng = np.random.default_rng(seed)
    rows = []
    for group in range(first_group, first_group + groups):
        prompt = rng.integers(0, 1000, int(rng.integers(1, 6))).tolist()
        for sample in range(group_size):
            length = int(rng.integers(0, max_response + 1))
            mask = rng.integers(0, 2, length).tolist()
            boundaries = sorted(rng.integers(0, length + 1, int(rng.integers(0, 3))).tolist())
            rows.append(
                {
                    "prompt_ids": prompt,
                    "response_ids": rng.integers(0, 1000, length).tolist(),
                    "behaviour_log_probs": (-rng.exponential(1.0, length)).astype(np.float32).tolist(),
                    "action_mask": mask,
                    "label": f"answer-{group}",
                    "prompt_id": group,
                    "group_id": group,
                    "sample_index": sample,
                    "weight_version": weight_version,
                    "turn_boundaries": boundaries,
                }
            )
    return rows


@pytest.fixture
def make_rows() -> Callable[..., list[dict[str, Any]]]:
    """Factory of synthetic rollout rows (see `_make_rows`)."""
    return _make_rows


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child Python processes that import hpc_rlhf from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
def workers_dir() -> Path:
    """Folder of the scripts that tests run as separate processes."""
    return Path(__file__).resolve().parent / "workers"


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
