"""Fixtures shared by the test folders: the local SLURM cluster (tools/slurm_cluster.sh) for the real-SLURM tests.

`slurm_cluster` starts the cluster once per session (stopping it at the end only if it started it). It skips, with a
warning that names the reason, only where this machine cannot host a cluster (not root, SLURM missing and no apt-get);
with the environment variable CI set it fails instead, so CI never passes by skipping.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest

from hpc_rlhf.slurm.local_cluster import LocalCluster, cannot_host_cluster, local_cluster


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


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalCluster]:
    """The local SLURM cluster of the test suite (3 nodes x 8 fake GPUs)."""
    skip_or_fail_without_cluster()
    try:
        with local_cluster() as cluster:
            yield cluster
    except RuntimeError as error:  # it could not be started: a failure, with the script's output
        pytest.fail(str(error))
