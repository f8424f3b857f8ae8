"""The local SLURM test cluster as a session fixture, plus helpers to submit batch scripts and watch jobs.

`slurm_cluster` runs `tools/slurm_cluster.sh start` once per session, and `stop` at the end if it started the cluster.
It skips, with a warning that names the reason, only where this machine cannot host the cluster (not root, programs
missing and no apt-get); when the environment variable CI is set it fails instead, so CI never passes by skipping.
"""

from __future__ import annotations

import os
import re
import shutil
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


def parse_scontrol_record(line: str) -> dict[str, str]:
    """`scontrol show job -o` prints one `Key=Value Key=Value ...` line per job; values may contain spaces."""
    return {match.group(1): match.group(2) for match in _FIELD.finditer(line.strip())}


@dataclass
class SlurmTestCluster:
    """A running local cluster: SLURM_CONF, the scratch folder, and job helpers that time out with a diagnosis."""

    conf: Path
    scratch: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for SLURM commands and jobs: SLURM_CONF, and the repository importable by job tasks."""
        python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        return {**os.environ, "SLURM_CONF": str(self.conf), "PYTHONPATH": python_path, **extra}

    def run(self, *command: str, check: bool = True, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a SLURM command against this cluster."""
        result = subprocess.run(list(command), check=False, capture_output=True, text=True, env=self.env(),
                                timeout=timeout_s)
        if check and result.returncode != 0:
            raise AssertionError(f"`{' '.join(command)}` failed (exit {result.returncode}):\n{result.stdout}\n"
                                 f"{result.stderr}\n{self.log_tails()}")
        return result

    def submit(self, script: Path, *sbatch_args: str) -> str:
        """`sbatch --parsable [ARGS] SCRIPT`; returns the job id."""
        result = self.run("sbatch", "--parsable", *sbatch_args, str(script))
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The job's record from `scontrol show job -o` (empty once SLURM has forgotten the job)."""
        result = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if result.returncode != 0 or not result.stdout.strip():
            return {}
        return parse_scontrol_record(result.stdout.splitlines()[0])

    def wait_for_state(self, job_id: str, states: Iterable[str], timeout_s: float,
                       min_restarts: int = 0) -> dict[str, str]:
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
        raise AssertionError(f"job {job_id} did not reach {sorted(wanted)} (restarts >= {min_restarts}) within "
                             f"{timeout_s}s; last record: {record}\n{self.log_tails()}")

    def wait_for_path(self, path: Path, timeout_s: float, job_id: str = "") -> None:
        """Poll until `path` exists (a task wrote it); fail with the job's record and the logs."""
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            if time.monotonic() > deadline:
                record = self.job(job_id) if job_id else {}
                raise AssertionError(f"{path} did not appear within {timeout_s}s; job: {record}\n{self.log_tails()}")
            time.sleep(0.1)

    def signal_batch(self, job_id: str, signal_name: str) -> None:
        """Send a signal to the job's batch shell only, as `--signal=B:SIG@N` does before the time limit."""
        self.run("scancel", f"--signal={signal_name}", "--batch", job_id)

    def cancel(self, job_id: str) -> None:
        self.run("scancel", job_id, check=False)

    @staticmethod
    def read_output(path: Path) -> str:
        """A job's output file, or '' when SLURM has not created it yet."""
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def write_batch_script(path: Path, sbatch_options: Iterable[str], body: Iterable[str]) -> Path:
        """Write a bash batch script: `#SBATCH` lines for the options, then the body."""
        lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in sbatch_options), "set -u", *body]
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o755)
        return path

    def log_tails(self, lines: int = 15) -> str:
        """The end of each daemon log, for failure messages."""
        parts = []
        for path in sorted((self.scratch / "log").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- {path}\n" + "\n".join(text))
        return "\n".join(parts)


def _cannot_host_cluster() -> str:
    """Why this machine cannot run the local cluster at all, or '' when it can."""
    if sys.platform != "linux":
        return f"the local SLURM cluster needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd starts job processes as their owner, mknod makes fake GPUs)"
    missing = [program for program in SLURM_PROGRAMS if shutil.which(program) is None]
    if missing and shutil.which("apt-get") is None:
        return f"SLURM programs {missing} are missing and there is no apt-get to install them"
    return ""


def _cluster_running(env: dict[str, str]) -> bool:
    status = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], check=False, capture_output=True, env=env)
    return status.returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmTestCluster]:
    """A running local SLURM cluster (3 nodes x 8 fake GPUs); started if needed, and then stopped at the end."""
    reason = _cannot_host_cluster()
    if reason:
        message = f"SLURM TESTS NOT RUN: {reason}. Run them as root on Linux (CI does)."
        if os.environ.get("CI"):
            pytest.fail(f"{message} CI is set, so this is an error, not a skip.")
        warnings.warn(message, pytest.PytestWarning, stacklevel=1)
        pytest.skip(message)
    env = dict(os.environ)
    scratch = Path(env.get("HPC_RLHF_SLURM_DIR", "/tmp/hpc_rlhf_slurm"))
    already_running = _cluster_running(env)
    if not already_running:
        result = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], check=False, capture_output=True, text=True,
                                env=env, timeout=600)
        if result.returncode != 0:
            pytest.fail(f"tools/slurm_cluster.sh start failed (exit {result.returncode}):\n{result.stdout}\n"
                        f"{result.stderr}")
    cluster = SlurmTestCluster(conf=scratch / "etc" / "slurm.conf", scratch=scratch)
    try:
        yield cluster
    finally:
        if not already_running:
            subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], check=False, capture_output=True, env=env,
                           timeout=120)
