"""What a resumed run finds in RUN_DIR/rollouts, with real training runs (`python -m hpc_rlhf.train`, 2 ranks):
a truncated shard it needs is set aside and generated again bit for bit; rollouts of an asynchronous run that cannot
be generated again with the weights they were made with are refused with the way out; damaged files of iterations
already trained are reported in one line; temp files of interrupted writes are removed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
ITERATIONS = 4
TINY = [
    "--actor.pretrain=builtin:tiny-llama-arith", "--vllm.backend=hf", "--train.device=cpu",
    "--rollout.batch_size=2", "--rollout.n_samples_per_prompt=2", "--rollout.generate_max_len=4",
    "--rollout.micro_batch_size=8", "--train.train_batch_size=4", "--train.micro_train_batch_size=2",
    f"--train.max_iterations={ITERATIONS}", "--eval.data=", "--ds.zero_stage=0", "--actor.learning_rate=1e-4",
    "--logger.use_tensorboard=false", "--logger.plot=false", "--logger.progress_bar=false",
    "--ckpt.save_hf_model=true", "--actor.lr_warmup_ratio=0", "--actor.attn_implementation=eager",
    "--rollout.async_queue=1", "--ckpt.save_steps=2",
    # asynchronous generation needs its own rank: generator 1 + actor 1
    "--layout.colocate=false", "--layout.generator.gpus=1", "--layout.actor.gpus=1", "--slurm.gpus_per_node=2",
]
pytestmark = pytest.mark.slow


def train(run_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "hpc_rlhf.train", "--config", "configs/tiny_cpu.yaml", *TINY,
                           f"--train.run_dir={run_dir}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)


def shard(run_dir: Path, iteration: int) -> Path:
    return run_dir / "rollouts" / f"iter_{iteration:06d}" / "generator_0000.arrow"


def sha256_in_record(run_dir: Path, iteration: int) -> str:
    return json.loads(shard(run_dir, iteration).with_name("generator_0000.commit.json").read_text())["sha256"]


def actor(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    tensors: dict = {}
    for path in sorted((run_dir / "hf" / "actor").glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The uninterrupted run: 4 asynchronous iterations, checkpoints after iterations 2 and 4."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = train(run_dir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (run_dir / "checkpoints" / "iter_000002").is_dir()
    return run_dir


def resumable_copy(finished: Path, target: Path, checkpoint: str) -> Path:
    """A copy of the finished run whose next resume starts from `checkpoint` (as if it had stopped there)."""
    shutil.copytree(finished, target)
    (target / "checkpoints" / "latest").write_text(checkpoint + "\n")
    return target


@pytest.mark.timeout(900)
def test_damaged_rollouts_are_regenerated_exactly_or_reported(finished_run, tmp_path):
    run_dir = resumable_copy(finished_run, tmp_path / "run", "iter_000002")
    needed = shard(run_dir, 3)  # generated ahead with weight version 2, which the checkpoint holds: regenerable
    size = needed.stat().st_size
    with needed.open("r+b") as handle:
        handle.truncate(size // 2)
    trained = shard(run_dir, 0)  # same size, one byte changed
    data = bytearray(trained.read_bytes())
    data[len(data) // 2] ^= 0xFF
    trained.write_bytes(bytes(data))
    leftover = needed.with_name(".generator_0000.arrow.tmp.n1.123.abcdef")
    leftover.write_bytes(b"")

    result = train(run_dir)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert (f"rollouts/iter_000003/generator_0000.arrow has {size // 2} bytes, its commit record says {size}: moved "
            "to rollouts/damaged/iter_000003/; iteration 3 is generated again with weight version 2") in output
    assert ("rollouts: 1 file(s) of iterations already trained do not match their commit records "
            "(rollouts/iter_000000/generator_0000.arrow sha256 differs from its commit record)") in output
    assert "rollouts: removed 1 file(s) of interrupted writes (iter_000003/.generator_0000.arrow.tmp." in output
    assert not leftover.exists()
    assert sha256_in_record(run_dir, 3) == sha256_in_record(finished_run, 3)  # the very same samples again
    got, want = actor(run_dir), actor(finished_run)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.timeout(600)
def test_missing_rollouts_of_an_async_run_are_refused_not_regenerated_with_newer_weights(finished_run, tmp_path):
    run_dir = resumable_copy(finished_run, tmp_path / "run", "iter_000002")
    shutil.rmtree(shard(run_dir, 2).parent)  # the obvious repair of a damaged iteration: delete it

    result = train(run_dir)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert ("rollouts of iteration 2 are damaged or missing (iter_000002/generator_0000 is not committed); they were "
            "generated with weight version 1 (rollout.async_queue=1), this run resumes with version 2") in output
    assert "no kept checkpoint is old enough to generate it again" in output
    assert not shard(run_dir, 2).exists()  # nothing was generated with the wrong weights
