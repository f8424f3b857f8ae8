"""Fixtures shared by the test folders: the local SLURM cluster (tools/slurm_cluster.sh) for the real-SLURM tests.

`slurm_cluster` starts the cluster once per session (stopping it at the end only if it started it). It skips, with a
warning that names the reason, only where this machine cannot host a cluster (not root, SLURM missing and no apt-get);
with the environment variable CI set it fails instead, so CI never passes by skipping. It holds a lock while in use, so
that a second pytest process (or xdist worker) asking for the cluster fails at once instead of sharing it.

Under pytest-xdist (setup.cfg: two workers, --dist loadscope) a scope is a test module, run whole by one worker,
except that tests/slurm and tests/submit, the only folders whose tests may use the cluster, are one scope: one worker
starts, uses and stops the cluster (mostly waiting on the scheduler) and then helps with the other modules. Modules
of the longest folders are handed out first, so that no long one is left for the end. DeepSpeed's ops are compiled
before the workers start.

OpenMP threads (torch's, here and in every process the tests start) wait passively: on a machine that is busy with
other work (the other xdist workers, other jobs), threads spinning at a barrier take the CPU from the threads doing the
work and a 30 s run takes minutes. Only how idle threads wait changes, not the threads or the results.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (and its OpenMP runtime) is loaded

import fcntl
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpc_rlhf.slurm.local_cluster import LocalCluster, cannot_host_cluster, local_cluster

CLUSTER_FOLDERS = ("slurm", "submit")
CLUSTER_SCOPE = "+".join(CLUSTER_FOLDERS)
# The folders whose tests take longest (summed durations of a three-worker run), longest first: their modules are
# handed out first; the others follow in collection order.
LONGEST_FOLDERS = (*CLUSTER_FOLDERS, "ppo", "training", "benchmarks", "checkpoint", "supervised", "tiny",
                   "pretrained", "distributed", "golden")
CLUSTER_LOCK = Path("/tmp/hpc_rlhf_slurm_tests.lock")


def folder_of(nodeid: str) -> str:
    """The folder under tests/ of a test id (a module directly in tests/ stands for itself)."""
    parts = nodeid.split("::", 1)[0].split("/")
    return parts[1] if len(parts) > 2 else parts[-1]


def scope_of(nodeid: str) -> str:
    """The xdist scope of a test id: its module, or CLUSTER_SCOPE for every module of the cluster's folders."""
    return CLUSTER_SCOPE if folder_of(nodeid) in CLUSTER_FOLDERS else nodeid.split("::", 1)[0]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """--dist loadscope with `scope_of` as the scope."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleOrClusterScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    return ModuleOrClusterScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Refuse a cluster test outside the cluster's folders; in an xdist worker, put the longest folders first."""
    misplaced = [item.nodeid for item in items
                 if "slurm_cluster" in getattr(item, "fixturenames", ()) and scope_of(item.nodeid) != CLUSTER_SCOPE]
    if misplaced:
        raise pytest.UsageError(f"tests using slurm_cluster must live in tests/{{{','.join(CLUSTER_FOLDERS)}}}/ (one "
                                f"xdist scope): {misplaced}")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {folder: position for position, folder in enumerate(LONGEST_FOLDERS)}
        items.sort(key=lambda item: rank.get(folder_of(item.nodeid), len(rank)))


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


DEEPSPEED_OPS = ("CPUAdamBuilder", "FusedAdamBuilder")  # optimizer offload; the Adam half of Muon on the CPU


def build_deepspeed_ops() -> None:
    """Compile the DeepSpeed ops the tests load (the shared-memory comm op of every CPU job, CPU Adam, the CPU
    FusedAdam) once, before any test runs. Compiled inside a test they take minutes of its time limit on a busy
    machine, and a rank killed while compiling leaves torch's build lock behind for good. Built ops load in seconds."""
    code = ("from deepspeed.accelerator import get_accelerator\n"
            "from deepspeed.comm.torch import build_shm_op\n"
            "build_shm_op()\n"
            f"for name in {DEEPSPEED_OPS!r}:\n"
            "    get_accelerator().create_op_builder(name).load()\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise pytest.UsageError(f"building DeepSpeed's ops failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def pytest_configure(config: pytest.Config) -> None:
    """In the process that starts the xdist workers (or the only one), before any test: build DeepSpeed's ops."""
    if not hasattr(config, "workerinput"):
        build_deepspeed_ops()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalCluster]:
    """The local SLURM cluster of the test suite (3 nodes x 8 fake GPUs)."""
    skip_or_fail_without_cluster()
    with open(CLUSTER_LOCK, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pytest.fail(f"another pytest process holds {CLUSTER_LOCK}: the SLURM cluster is in use")
        try:
            with local_cluster() as cluster:
                yield cluster
        except RuntimeError as error:  # it could not be started: a failure, with the script's output
            pytest.fail(str(error))
