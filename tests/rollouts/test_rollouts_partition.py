"""Deterministic rank partition: properties of the pure functions and of the reader on real shards."""

from __future__ import annotations

import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hpc_rlhf.rollouts import RolloutReader, ShardWriter, commit_iteration, generator_shard_name
from hpc_rlhf.rollouts.partition import duplicate_positions, group_starts, partition_bounds, sort_order

_group_sizes = st.lists(st.integers(1, 5), max_size=30)


@settings(max_examples=200, deadline=None)
@given(_group_sizes, st.integers(1, 9), st.booleans())
def test_partition_covers_every_sample_once_in_order(sizes, world_size, keep_groups):
    group_ids = np.repeat(np.arange(len(sizes)) * 3, sizes)  # sorted, non-contiguous ids
    bounds = [partition_bounds(group_ids, rank, world_size, keep_groups) for rank in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == len(group_ids)
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(bounds, bounds[1:]))
    assert all(start <= stop for start, stop in bounds)
    if keep_groups:
        owner = {}
        for rank, (start, stop) in enumerate(bounds):
            for group in group_ids[start:stop]:
                assert owner.setdefault(int(group), rank) == rank  # a group is never split
        groups_per_rank = [len(set(group_ids[start:stop].tolist())) for start, stop in bounds]
        assert max(groups_per_rank) - min(groups_per_rank) <= 1
    else:
        lengths = [stop - start for start, stop in bounds]
        assert max(lengths) - min(lengths) <= 1


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(-5, 5), st.integers(0, 3)), max_size=40), st.randoms())
def test_sort_order_is_independent_of_input_order(keys, random):
    shuffled = list(keys)
    random.shuffle(shuffled)
    for listing in (keys, shuffled):
        groups = np.array([k[0] for k in listing], dtype=np.int64)
        samples = np.array([k[1] for k in listing], dtype=np.int32)
        order = sort_order(groups, samples)
        assert list(zip(groups[order].tolist(), samples[order].tolist())) == sorted(keys)
    groups = np.array(sorted(keys), dtype=np.int64).reshape(-1, 2)
    if len(keys):
        duplicates = duplicate_positions(groups[:, 0], groups[:, 1])
        assert len(duplicates) == len(keys) - len(set(keys))


def test_group_starts_by_hand():
    assert group_starts(np.array([4, 4, 7, 9, 9, 9])).tolist() == [0, 2, 3, 6]
    assert group_starts(np.array([], dtype=np.int64)).tolist() == [0]


@st.composite
def _shard_splits(draw):
    """A set of groups and two different ways of splitting its rows into shards."""
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=12))
    rows = [(g, s) for g, n in enumerate(sizes) for s in range(n)]
    splits = []
    for _ in range(2):
        shards = draw(st.integers(1, 4))
        owners = draw(st.lists(st.integers(0, shards - 1), min_size=len(rows), max_size=len(rows)))
        order = draw(st.permutations(range(len(rows))))
        splits.append([[rows[i] for i in order if owners[i] == shard] for shard in range(shards)])
    return rows, splits, draw(st.integers(1, 5))


# make_rows is a pure factory, so sharing it between examples is safe
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_shard_splits())
def test_reader_partition_is_the_same_however_the_shards_were_written(make_rows, case):
    rows, splits, world_size = case
    template = {(r["group_id"], r["sample_index"]): r for r in make_rows(groups=12, group_size=4, seed=9)}
    results = []
    for split in splits:
        with tempfile.TemporaryDirectory() as run_dir:
            writer = ShardWriter(run_dir)
            for shard, keys in enumerate(split):
                writer.write(0, generator_shard_name(shard), [template[k] for k in keys])
            commit_iteration(run_dir, 0, [generator_shard_name(s) for s in range(len(split))])
            reader = RolloutReader(run_dir)
            results.append([reader.read(0, rank=r, world_size=world_size).to_pylist() for r in range(world_size)])
    assert results[0] == results[1]
    flattened = [(row["group_id"], row["sample_index"]) for part in results[0] for row in part]
    assert flattened == rows
