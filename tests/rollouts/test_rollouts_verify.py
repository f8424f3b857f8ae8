"""Committed files checked against their commit records: a damaged shard is named as damaged (not as "already
committed"), set aside with everything that depends on it, and reported by size or sha256."""

from __future__ import annotations

import pytest

from hpc_rlhf.rollouts import CorruptShardError, ShardWriter, commit_iteration, committed_shards
from hpc_rlhf.rollouts.verify import damaged_files, set_aside


def test_a_damaged_shard_is_named_as_damaged_and_set_aside(run_dir, make_rows):
    writer = ShardWriter(run_dir)
    shard = writer.write(3, "generator_0000", make_rows(2, 2))
    writer.write(3, "generator_0001", make_rows(2, 2, first_group=2))
    writer.write_columns(3, "generator_0000", "rewards", {"reward": [1.0] * 4})
    commit_iteration(run_dir, 3, ["generator_0000", "generator_0001"])
    size = shard.stat().st_size
    with shard.open("r+b") as handle:
        handle.truncate(size - 7)

    with pytest.raises(CorruptShardError, match=rf"generator_0000.arrow has {size - 7} bytes, its commit record says "
                                                 rf"{size}: the committed file is damaged"):
        writer.write(3, "generator_0000", make_rows(2, 2), overwrite=False)
    damaged = damaged_files(run_dir, 3)
    assert [(d.path.name, d.problem) for d in damaged] == [
        ("generator_0000.arrow", f"has {size - 7} bytes, its commit record says {size}")]

    target = set_aside(run_dir, 3, damaged)
    directory = shard.parent
    assert sorted(p.name for p in target.iterdir()) == [
        "MANIFEST.json", "generator_0000.arrow", "generator_0000.commit.json", "generator_0000.rewards.arrow",
        "generator_0000.rewards.commit.json"]
    assert sorted(p.name for p in directory.iterdir()) == ["generator_0001.arrow", "generator_0001.commit.json"]
    assert committed_shards(run_dir, 3) == ["generator_0001"]
    writer.write(3, "generator_0000", make_rows(2, 2))  # the writer commits it again
    assert damaged_files(run_dir, 3) == []


def test_a_changed_byte_is_found_by_its_checksum(run_dir, make_rows):
    shard = ShardWriter(run_dir).write(0, "generator_0000", make_rows(2, 2))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert damaged_files(run_dir, 0, checksum=False) == []  # same size
    assert [d.problem for d in damaged_files(run_dir, 0)] == ["sha256 differs from its commit record"]
    shard.unlink()
    assert [d.problem for d in damaged_files(run_dir, 0)] == ["is missing"]
