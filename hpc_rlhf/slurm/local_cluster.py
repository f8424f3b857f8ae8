"""Driving the single-machine SLURM cluster of tools/slurm_cluster.sh: start/stop it, submit jobs, wait for states.

The test suite runs real jobs on it (slurmctld + several slurmd on one machine, fake GPUs); the same helpers serve
anyone trying the batch scripts locally from a source checkout. Waits time out with a diagnosis: the job's record and
the end of every daemon log.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO_ROOT / "tools" / "slurm_cluster.sh"
SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
FINISHED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                             "BOOT_FAIL", "DEADLINE"})
DEFAULT_SCRATCH = "/tmp/hpc_rlhf_slurm"
_FIELD = re.compile(r"(\S+?)=(.*?)(?=\s\S+?=|$)")


def parse_scontrol_record(line: str) -> dict[str, str]:
    """`scontrol show job -o` prints one `Key=Value Key=Value ...` line per job; values may contain spaces."""
    return {match.group(1): match.group(2) for match in _FIELD.finditer(line.strip())}


@dataclass
class LocalCluster:
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

    def submit(self, script: Path, *sbatch_args: str) -> str:
        """`sbatch --parsable [ARGS] SCRIPT`; returns the job id."""
        return self.sbatch(*sbatch_args, str(script))

    def job(self, job_id: str) -> dict[str, str]:
        """The job's record from `scontrol show job -o` (empty once SLURM has forgotten the job)."""
        result = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if result.returncode != 0 or not result.stdout.strip():
            return {}
        return parse_scontrol_record(result.stdout.splitlines()[0])

    def wait_for_state(self, job_id: str, states: Iterable[str], timeout_s: float, min_restarts: int = 0,
                       log: Path | None = None) -> dict[str, str]:
        """Poll until the job is in one of `states` (with at least `min_restarts` restarts); fail with a diagnosis
        that includes the end of `log`, the job's output file, when given."""
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

    def wait_for_path(self, path: Path, timeout_s: float, job_id: str = "") -> None:
        """Poll until `path` exists (a task wrote it); fail with the job's record and the logs, early when the job
        has already finished."""
        deadline = time.monotonic() + timeout_s
        while not path.exists():
            record = self.job(job_id) if job_id else {}
            if time.monotonic() > deadline or record.get("JobState") in FINISHED_STATES:
                raise AssertionError(f"{path} did not appear (waited up to {timeout_s}s); job: {record}\n"
                                     f"{self.log_tails()}")
            time.sleep(0.05)

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


def cluster_script(command: str, env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    """`tools/slurm_cluster.sh COMMAND` (start, stop, status) under `env`."""
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), command], check=False, capture_output=True, text=True,
                          env=env, timeout=timeout_s)


@contextlib.contextmanager
def local_cluster(env_overrides: dict[str, str] | None = None) -> Iterator[LocalCluster]:
    """A cluster started with tools/slurm_cluster.sh under `env_overrides` (HPC_RLHF_SLURM_DIR, _NODES, _PORT);
    stopped afterwards unless it was already running. Raises RuntimeError when it cannot be started."""
    env = {**os.environ, **(env_overrides or {})}
    scratch = Path(env.get("HPC_RLHF_SLURM_DIR", DEFAULT_SCRATCH))
    already_running = cluster_script("status", env, 60).returncode == 0
    if not already_running:
        result = cluster_script("start", env, 600)
        if result.returncode != 0:
            raise RuntimeError(f"tools/slurm_cluster.sh start failed (exit {result.returncode}):\n{result.stdout}\n"
                               f"{result.stderr}")
    try:
        yield LocalCluster(conf=scratch / "etc" / "slurm.conf", scratch=scratch)
    finally:
        if not already_running:
            cluster_script("stop", env, 120)
