"""Waiting for rollout data another rank produces: generator shards, a complete iteration, filled columns.

A rank that needs data polls the commit records and the manifest on the shared filesystem (cheap reads, at growing
intervals up to half a second) until the data is there; after `timeout_s` a TimeoutError names what it waited for. A
failed peer does not leave it waiting that long: the failure guard stops this rank with the peer's error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence

from hpc_rlhf.rollouts.manifest import committed_shards, load_manifest

WAIT_TIMEOUT_S = 6 * 3600.0


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Poll `condition` (cheap filesystem checks) until it holds; a clear error after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def wait_for_shards(run_dir: str | os.PathLike, iteration: int, shards: Sequence[str], *,
                    timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Wait until every shard of `shards` of `iteration` is committed (before the iteration is committed)."""
    expected = set(shards)
    wait_until(lambda: expected <= set(committed_shards(run_dir, iteration)),
               f"the generator shards of iteration {iteration}", timeout_s)


def iteration_ready(run_dir: str | os.PathLike, iteration: int, stages: Sequence[str] = ()) -> bool:
    """Whether `iteration` is complete and every one of its shards has a committed column shard of each stage."""
    manifest = load_manifest(run_dir, iteration)
    if not manifest.complete:
        return False
    have = {(record.shard, record.stage) for record in manifest.column_shards}
    return all((shard, stage) in have for shard in manifest.shard_names for stage in stages)


def wait_for_iteration(run_dir: str | os.PathLike, iteration: int, stages: Sequence[str] = (), *,
                       timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """Wait until `iteration` is complete and, for each of `stages` (rewards, reference, values), filled."""
    what = f"stages {list(stages)} of iteration {iteration}" if stages else f"iteration {iteration} to complete"
    wait_until(lambda: iteration_ready(run_dir, iteration, stages), what, timeout_s)
