"""Helpers to run short real training jobs (`python -m hpc_rlhf.train`, real processes) and read what they wrote."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAST = [
    "--actor.pretrain=builtin:tiny-llama-arith", "--vllm.backend=hf", "--train.device=cpu",
    "--rollout.batch_size=2", "--rollout.n_samples_per_prompt=2", "--rollout.generate_max_len=4",
    "--rollout.micro_batch_size=8", "--train.train_batch_size=4", "--train.micro_train_batch_size=2",
    "--train.max_iterations=3", "--eval.data=", "--ds.zero_stage=2", "--actor.learning_rate=1e-4", "--logger.use_tensorboard=false",
    "--logger.plot=false", "--logger.progress_bar=false", "--ckpt.save_hf_model=false",
    "--actor.lr_warmup_ratio=0", "--actor.attn_implementation=eager", "--critic.attn_implementation=eager",
]


def run_train(run_dir: Path, *overrides: str, timeout: float = 300, config: str | None = None,
              expect_ok: bool = True) -> subprocess.CompletedProcess:
    """Run a job to completion in fresh processes; fail with its output when it does not succeed."""
    args = [sys.executable, "-m", "hpc_rlhf.train"]
    if config:
        args += ["--config", config]
    args += [*FAST, f"--train.run_dir={run_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if expect_ok and result.returncode != 0:
        pytest.fail(f"training failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    """Rows of metrics.jsonl (NaN written as null comes back as None)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def finite(value) -> bool:
    return value is not None and math.isfinite(value)


class Jobs:
    """What the tests get from the `jobs` fixture: run a job, read its metrics, check finiteness."""

    run = staticmethod(run_train)
    metrics = staticmethod(read_metrics)
    finite = staticmethod(finite)


@pytest.fixture
def jobs() -> Jobs:
    return Jobs()
