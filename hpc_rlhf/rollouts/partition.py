"""Deterministic split of an iteration's samples across trainer ranks (pure functions on numpy arrays).

Samples are ordered by (group_id, sample_index), which does not depend on which generator wrote which
sample or in which order the shards were committed. Rank r of w then takes the r-th contiguous slice.
With `keep_groups` the slice boundaries fall between groups, so group statistics (GRPO, RLOO baselines)
can be computed on one rank; ranks then differ by at most one group, otherwise by at most one sample.
"""

from __future__ import annotations

import numpy as np


def sort_order(group_ids: np.ndarray, sample_indices: np.ndarray) -> np.ndarray:
    """Row indices that sort the samples by (group_id, sample_index)."""
    return np.lexsort((np.asarray(sample_indices), np.asarray(group_ids)))


def duplicate_positions(sorted_group_ids: np.ndarray, sorted_sample_indices: np.ndarray) -> np.ndarray:
    """Positions i (in sorted order) where sample i has the same key as sample i-1."""
    same = (sorted_group_ids[1:] == sorted_group_ids[:-1]) & (sorted_sample_indices[1:] == sorted_sample_indices[:-1])
    return np.flatnonzero(same) + 1


def group_starts(sorted_group_ids: np.ndarray) -> np.ndarray:
    """Position of the first sample of each group, plus the total count as a final entry."""
    n = len(sorted_group_ids)
    changes = np.flatnonzero(sorted_group_ids[1:] != sorted_group_ids[:-1]) + 1
    return np.concatenate(([0], changes, [n])).astype(np.int64) if n else np.zeros(1, dtype=np.int64)


def partition_bounds(
    sorted_group_ids: np.ndarray, rank: int, world_size: int, keep_groups: bool = True
) -> tuple[int, int]:
    """[start, stop) of rank `rank`'s slice of the sorted samples."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if not keep_groups:
        n = len(sorted_group_ids)
        return rank * n // world_size, (rank + 1) * n // world_size
    starts = group_starts(np.asarray(sorted_group_ids))
    groups = len(starts) - 1
    first, last = rank * groups // world_size, (rank + 1) * groups // world_size
    return int(starts[first]), int(starts[last])
