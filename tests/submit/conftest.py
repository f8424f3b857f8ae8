"""Fixtures for the submission tests: a second, 6-node local SLURM cluster, tiny CPU jobs and their reference (the
3-node cluster is the `slurm_cluster` fixture of tests/conftest.py).

The tiny job is configs/tiny_cpu.yaml in the 3-node layout of sbatch/tiny_cpu_3node.sh (generator 1, actor 2, one rank
per node), shrunk by FAST so that an iteration takes a fraction of a second. `reference_run` trains the same job
uninterrupted with `python -m hpc_rlhf.train` on this machine, started in the background while a test's cluster job runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hpc_rlhf.slurm.local_cluster import LocalCluster, local_cluster

REPO_ROOT = Path(__file__).resolve().parents[2]

# The small settings of tests/ppo (tiny rollouts, hf generation on the CPU, no TensorBoard or plots) ...
FAST = [
    "--actor.pretrain=builtin:tiny-llama-arith", "--vllm.backend=hf", "--train.device=cpu",
    "--rollout.batch_size=2", "--rollout.n_samples_per_prompt=2", "--rollout.generate_max_len=4",
    "--rollout.micro_batch_size=8", "--train.train_batch_size=4", "--train.micro_train_batch_size=2",
    "--train.max_iterations=3", "--eval.data=", "--ds.zero_stage=2", "--actor.learning_rate=1e-4",
    "--logger.use_tensorboard=false", "--logger.plot=false", "--logger.progress_bar=false",
    "--ckpt.save_hf_model=false", "--actor.lr_warmup_ratio=0", "--actor.attn_implementation=eager",
    "--critic.attn_implementation=eager",
]
# ... in the layout of sbatch/tiny_cpu_3node.sh, for jobs that do not go through that script: the roles, and the
# allocation (python -m hpc_rlhf.submit gets the latter as --nodes/--gpus-per-node/... flags instead).
THREE_NODE_ROLES = ["--layout.colocate=false", "--layout.generator.gpus=1", "--layout.actor.gpus=2"]
THREE_NODE_SLURM = ["--slurm.nodes=3", "--slurm.gpus_per_node=1", "--slurm.cpus_per_task=1"]
THREE_NODE_LAYOUT = [*THREE_NODE_ROLES, *THREE_NODE_SLURM]
SAMPLES_PER_ITERATION = 2 * 2  # rollout.batch_size x n_samples_per_prompt
# The job the requeue and hard-kill tests interrupt: long enough that a stop lands mid-run (an iteration takes
# ~0.1-0.5 s here), asynchronous so that an interrupted run leaves a generated but untrained iteration behind.
LONG_RUN = ["--train.max_iterations=30", "--rollout.async_queue=1", "--ckpt.save_hf_model=true"]


SIX_NODE_CLUSTER = {"HPC_RLHF_SLURM_DIR": "/tmp/hpc_rlhf_slurm_6node", "HPC_RLHF_SLURM_NODES": "6",
                    "HPC_RLHF_SLURM_PORT": "17110"}


@pytest.fixture
def six_node_cluster(slurm_cluster) -> Iterator[LocalCluster]:
    """A second cluster of 6 nodes x 8 fake GPUs (own scratch folder, ports and munged) for the 70B layout; stopped
    at the end of the test. Asks for `slurm_cluster` first so that the skip-or-fail decision is made in one place."""
    try:
        with local_cluster(SIX_NODE_CLUSTER) as cluster:
            yield cluster
    except RuntimeError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Build the tiny starting model once, here, so that the ranks of the jobs find it instead of each building it."""
    from hpc_rlhf.builtin_models.resolve import resolve_model_path

    return resolve_model_path("builtin:tiny-llama-arith")


def read_metric_rows(run_dir: Path) -> list[dict]:
    """Every line of metrics.jsonl (a resumed run appends; nothing is merged here)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def load_actor_weights(model_dir: Path) -> dict:
    """The tensors of a saved HF model folder (RUN_DIR/hf/actor)."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    assert files, f"no safetensors file in {model_dir}"
    tensors: dict = {}
    for path in files:
        tensors.update(load_file(path))
    return tensors


def kill_job_tasks(job_id: str) -> list[int]:
    """SIGKILL every task process of the job's steps (found by SLURM_JOB_ID in /proc/PID/environ), as a crash or a
    lost node would: nothing gets to run, no checkpoint is written. Returns the killed pids."""
    killed = []
    wanted = f"SLURM_JOB_ID={job_id}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            command = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone, or a kernel thread
            continue
        is_task = wanted in environ and any(item.startswith(b"SLURM_STEP_ID=") for item in environ)
        if is_task and command and command[0] == sys.executable.encode():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
    return killed


class TinyJobs:
    """What the tests get from the `tiny_jobs` fixture: the job's settings and the helpers to inspect what it wrote."""

    fast = FAST
    roles = THREE_NODE_ROLES
    slurm = THREE_NODE_SLURM
    layout = THREE_NODE_LAYOUT
    long_run = LONG_RUN
    samples_per_iteration = SAMPLES_PER_ITERATION
    metric_rows = staticmethod(read_metric_rows)
    actor_weights = staticmethod(load_actor_weights)
    kill_tasks = staticmethod(kill_job_tasks)


@pytest.fixture
def tiny_jobs(tiny_model) -> TinyJobs:
    return TinyJobs()


@dataclass
class ReferenceRun:
    """The uninterrupted job, trained with `python -m hpc_rlhf.train` in the background."""

    run_dir: Path
    process: subprocess.Popen
    log: Path

    def wait(self, timeout_s: float = 240) -> Path:
        """Wait for it to finish; returns its run dir (fails with its output when it did not succeed)."""
        code = self.process.wait(timeout=timeout_s)
        if code != 0:
            pytest.fail(f"the reference run failed ({code}):\n{self.log.read_text(errors='replace')[-6000:]}")
        return self.run_dir


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model) -> Iterator[ReferenceRun]:
    """FAST + the 3-node layout + LONG_RUN, uninterrupted, on this machine (started now, awaited by `wait`)."""
    root = tmp_path_factory.mktemp("reference")
    run_dir, log = root / "run", root / "train.log"
    command = [sys.executable, "-m", "hpc_rlhf.train", "--config", "configs/tiny_cpu.yaml", *FAST,
               *THREE_NODE_LAYOUT, *LONG_RUN, f"--train.run_dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:  # its own process group, so that its rank processes can be stopped with it
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        yield ReferenceRun(run_dir, process, log)
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
