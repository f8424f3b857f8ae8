"""Fixtures for the submission tests: the local SLURM cluster, a second 6-node one, tiny CPU jobs and their reference.

`slurm_cluster` runs `tools/slurm_cluster.sh start` once per session (stopping it at the end only if it started it).
It skips, with a warning that names the reason, only where this machine cannot host a cluster (not root, SLURM missing
and no apt-get); with the environment variable CI set it fails instead, so CI never passes by skipping.

The tiny job is configs/tiny_cpu.yaml in the 3-node layout of sbatch/tiny_cpu_3node.sh (generator 1, actor 2, one rank
per node), shrunk by FAST so that an iteration takes a fraction of a second. `reference_run` trains the same job
uninterrupted with `python -m hpc_rlhf.train` on this machine, started in the background while a test's cluster job runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO_ROOT / "tools" / "slurm_cluster.sh"
SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
FINISHED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                             "BOOT_FAIL", "DEADLINE"})
_FIELD = re.compile(r"(\S+?)=(.*?)(?=\s\S+?=|$)")

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


def parse_scontrol_record(line: str) -> dict[str, str]:
    """`scontrol show job -o` prints one `Key=Value Key=Value ...` line per job; values may contain spaces."""
    return {match.group(1): match.group(2) for match in _FIELD.finditer(line.strip())}


@dataclass
class SlurmTestCluster:
    """A running local cluster: SLURM_CONF, the scratch folder, and job helpers that time out with a diagnosis."""

    conf: Path
    scratch: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for SLURM commands and jobs: SLURM_CONF, the repository importable, one thread per rank."""
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        return {**os.environ, "SLURM_CONF": str(self.conf), "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1", **extra}

    def run(self, *command: str, check: bool = True, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command (sbatch, scontrol, python -m hpc_rlhf.submit ...) against this cluster from the repo root."""
        result = subprocess.run(list(command), check=False, capture_output=True, text=True, env=self.env(),
                                timeout=timeout_s, cwd=REPO_ROOT)
        if check and result.returncode != 0:
            raise AssertionError(f"`{' '.join(command)}` failed (exit {result.returncode}):\n{result.stdout}\n"
                                 f"{result.stderr}\n{self.log_tails()}")
        return result

    def sbatch(self, *args: str) -> str:
        """`sbatch --parsable ARGS`; returns the job id."""
        return self.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The job's record from `scontrol show job -o` (empty once SLURM has forgotten the job)."""
        result = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if result.returncode != 0 or not result.stdout.strip():
            return {}
        return parse_scontrol_record(result.stdout.splitlines()[0])

    def wait_for_state(self, job_id: str, states: Iterable[str], timeout_s: float, min_restarts: int = 0,
                       log: Path | None = None) -> dict[str, str]:
        """Poll until the job is in one of `states` (with at least `min_restarts` restarts); fail with a diagnosis."""
        wanted = set(states)
        deadline = time.monotonic() + timeout_s
        record: dict[str, str] = {}
        while time.monotonic() < deadline:
            record = self.job(job_id)
            state = record.get("JobState", "")
            if state in wanted and int(record.get("Restarts", "0")) >= min_restarts:
                return record
            if state in FINISHED_STATES - wanted:
                break
            time.sleep(0.25)
        output = log.read_text(errors="replace")[-6000:] if log is not None and log.exists() else ""
        raise AssertionError(f"job {job_id} did not reach {sorted(wanted)} (restarts >= {min_restarts}) within "
                             f"{timeout_s}s; last record: {record}\n--- job output:\n{output}\n{self.log_tails()}")

    def wait_for_path(self, path: Path, timeout_s: float, job_id: str) -> None:
        """Poll until `path` exists (a rank wrote it); fail with the job's record and the logs."""
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            record = self.job(job_id)
            if time.monotonic() > deadline or record.get("JobState") in FINISHED_STATES:
                raise AssertionError(f"{path} did not appear (waited up to {timeout_s}s); job: {record}\n"
                                     f"{self.log_tails()}")
            time.sleep(0.05)

    def log_tails(self, lines: int = 15) -> str:
        """The end of each daemon log, for failure messages."""
        parts = []
        for path in sorted((self.scratch / "log").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- {path}\n" + "\n".join(text))
        return "\n".join(parts)


def cannot_host_cluster() -> str:
    """Why this machine cannot run a local cluster at all, or '' when it can."""
    if sys.platform != "linux":
        return f"the local SLURM cluster needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd starts job processes as their owner, mknod makes fake GPUs)"
    missing = [program for program in SLURM_PROGRAMS if shutil.which(program) is None]
    if missing and shutil.which("apt-get") is None:
        return f"SLURM programs {missing} are missing and there is no apt-get to install them"
    return ""


def skip_or_fail_without_cluster() -> None:
    """Skip loudly where the machine cannot host a cluster; fail instead when CI is set."""
    reason = cannot_host_cluster()
    if not reason:
        return
    message = f"SLURM TESTS NOT RUN: {reason}. Run them as root on Linux (CI does)."
    if os.environ.get("CI"):
        pytest.fail(f"{message} CI is set, so this is an error, not a skip.")
    warnings.warn(message, pytest.PytestWarning, stacklevel=2)
    pytest.skip(message)


def _cluster_script(command: str, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), command], check=False, capture_output=True, text=True,
                          env=env, timeout=timeout_s)


@contextlib.contextmanager
def local_cluster(env_overrides: dict[str, str]) -> Iterator[SlurmTestCluster]:
    """A cluster started with tools/slurm_cluster.sh under `env_overrides` (scratch, nodes, port); stopped afterwards
    unless it was already running."""
    env = {**os.environ, **env_overrides}
    scratch = Path(env.get("HPC_RLHF_SLURM_DIR", "/tmp/hpc_rlhf_slurm"))
    already_running = _cluster_script("status", env, 60).returncode == 0
    if not already_running:
        result = _cluster_script("start", env, 600)
        if result.returncode != 0:
            pytest.fail(f"tools/slurm_cluster.sh start failed (exit {result.returncode}):\n{result.stdout}\n"
                        f"{result.stderr}")
    try:
        yield SlurmTestCluster(conf=scratch / "etc" / "slurm.conf", scratch=scratch)
    finally:
        if not already_running:
            _cluster_script("stop", env, 120)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmTestCluster]:
    """The local SLURM cluster of the test suite (3 nodes x 8 fake GPUs)."""
    skip_or_fail_without_cluster()
    with local_cluster({}) as cluster:
        yield cluster


SIX_NODE_CLUSTER = {"HPC_RLHF_SLURM_DIR": "/tmp/hpc_rlhf_slurm_6node", "HPC_RLHF_SLURM_NODES": "6",
                    "HPC_RLHF_SLURM_PORT": "17110"}


@pytest.fixture
def six_node_cluster(slurm_cluster) -> Iterator[SlurmTestCluster]:
    """A second cluster of 6 nodes x 8 fake GPUs (own scratch folder, ports and munged) for the 70B layout; stopped
    at the end of the test. Asks for `slurm_cluster` first so that the skip-or-fail decision is made in one place."""
    with local_cluster(SIX_NODE_CLUSTER) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Build the tiny starting model once, here, so that the ranks of the jobs find it instead of each building it."""
    from hpc_rlhf.tiny_model import resolve_model_path

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
