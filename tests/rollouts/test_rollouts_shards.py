"""Shard writer, commit records, manifests and reader: round trips, column shards, completion rules."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pyarrow.feather as feather
import pytest

from hpc_rlhf.rollouts import (
    IncompleteIterationError,
    ManifestError,
    RolloutError,
    RolloutReader,
    RolloutValidationError,
    ShardExistsError,
    ShardWriter,
    commit_iteration,
    committed_shards,
    generator_shard_name,
    iteration_dir,
    iterations_completed,
    iterations_started,
    latest_complete_iteration,
    load_manifest,
    to_rollout_table,
)


def _sorted_rows(rows):
    return sorted(rows, key=lambda r: (r["group_id"], r["sample_index"]))


def _expected(rows):
    """What the reader returns for `rows`: the rows as the schema stores them, in (group, sample) order."""
    return to_rollout_table(_sorted_rows(rows)).to_pylist()


def test_round_trip_records_and_manifest(run_dir, make_rows):
    rows = make_rows(groups=6, group_size=3, seed=1)
    writer = ShardWriter(run_dir)
    paths = [writer.write(7, generator_shard_name(rank), rows[rank::2]) for rank in range(2)]
    directory = iteration_dir(run_dir, 7)
    assert directory == run_dir / "rollouts" / "iter_000007"
    assert sorted(os.listdir(directory)) == [
        "generator_0000.arrow",
        "generator_0000.commit.json",
        "generator_0001.arrow",
        "generator_0001.commit.json",
    ]
    for rank, path in enumerate(paths):
        record = json.loads((directory / f"generator_000{rank}.commit.json").read_text())
        data = path.read_bytes()
        assert record["bytes"] == len(data)
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["rows"] == len(rows[rank::2])
        assert record["schema_version"] == 1 and record["iteration"] == 7
        # a plain Arrow IPC file: any Arrow reader opens it without this package
        assert feather.read_table(path).to_pylist() == to_rollout_table(rows[rank::2]).to_pylist()

    manifest = commit_iteration(run_dir, 7, ["generator_0000", "generator_0001"])
    assert manifest.complete and manifest.rows == len(rows)
    on_disk = json.loads((directory / "MANIFEST.json").read_text())
    assert on_disk["complete"] is True and on_disk["rows"] == len(rows)
    assert [s["shard"] for s in on_disk["shards"]] == ["generator_0000", "generator_0001"]
    assert RolloutReader(run_dir).read(7).to_pylist() == _expected(rows)


def test_write_batches_streams_into_one_shard(run_dir, make_rows):
    rows = make_rows(groups=5, group_size=2, seed=2)
    writer = ShardWriter(run_dir, compression="zstd")
    path = writer.write_batches(0, "generator_0000", [rows[:3], {k: [r[k] for r in rows[3:]] for k in rows[3]}, []])
    assert pa.ipc.open_file(path).num_record_batches == 2
    commit_iteration(run_dir, 0, ["generator_0000"])
    assert RolloutReader(run_dir).read(0).to_pylist() == _expected(rows)


def test_empty_shard_commits_and_reads(run_dir):
    ShardWriter(run_dir).write(3, "generator_0000", [])
    commit_iteration(run_dir, 3, ["generator_0000"])
    table = RolloutReader(run_dir).read(3)
    assert (
        table.num_rows == 0
        and table.schema.names == RolloutReader(run_dir).read_shard(3, "generator_0000").schema.names
    )


def test_commit_rules(run_dir, make_rows):
    writer = ShardWriter(run_dir)
    writer.write(1, "generator_0000", make_rows(2, 2, first_group=0))
    writer.write(1, "generator_0002", make_rows(2, 2, first_group=10))
    with pytest.raises(
        IncompleteIterationError, match=r"2 of 3 expected shards committed; missing \['generator_0001'\]"
    ):
        commit_iteration(run_dir, 1, ["generator_0000", "generator_0001", "generator_0002"])
    with pytest.raises(RolloutError, match=r"committed shards \['generator_0002'\] are not in expected_shards"):
        commit_iteration(run_dir, 1, ["generator_0000"])
    with pytest.raises(IncompleteIterationError, match="iteration 1 is not complete"):
        RolloutReader(run_dir).read(1)
    partial = RolloutReader(run_dir).read(1, require_complete=False)
    assert sorted(set(partial.column("group_id").to_pylist())) == [0, 1, 10, 11]
    assert iterations_completed(run_dir) == [] and latest_complete_iteration(run_dir) is None

    writer.write(1, "generator_0001", make_rows(1, 2, first_group=5))
    first = commit_iteration(run_dir, 1, ["generator_0000", "generator_0001", "generator_0002"])
    again = commit_iteration(run_dir, 1, ["generator_0002", "generator_0001", "generator_0000"])
    assert first == again
    with pytest.raises(ManifestError, match="was completed with shards"):
        commit_iteration(run_dir, 1, ["generator_0000", "generator_0001"])
    with pytest.raises(RolloutError, match="is complete"):
        writer.write(1, "generator_0003", make_rows(1, 1, first_group=20))
    writer.write(4, "generator_0000", make_rows(1, 1))
    assert iterations_started(run_dir) == [1, 4]
    assert iterations_completed(run_dir) == [1] and latest_complete_iteration(run_dir) == 1


def test_committed_shards_and_overwrite(run_dir, make_rows):
    writer = ShardWriter(run_dir)
    assert committed_shards(run_dir, 0) == []
    writer.write(0, "generator_0001", make_rows(1, 2, seed=1))
    assert committed_shards(run_dir, 0) == ["generator_0001"]
    with pytest.raises(ShardExistsError, match="already committed"):
        writer.write(0, "generator_0001", make_rows(1, 2, seed=2))
    replacement = make_rows(1, 3, seed=3)
    writer.write(0, "generator_0001", replacement, overwrite=True)
    commit_iteration(run_dir, 0, ["generator_0001"])
    assert RolloutReader(run_dir).read(0).to_pylist() == _expected(replacement)


def test_bad_names_and_iterations_are_refused(run_dir, make_rows):
    writer = ShardWriter(run_dir)
    for name in ["gen.0", "a/b", "", "../x"]:
        with pytest.raises(ValueError, match="shard name must match"):
            writer.write(0, name, make_rows(1, 1))
    with pytest.raises(ValueError, match="iteration must be a non-negative int"):
        writer.write(-1, "generator_0000", make_rows(1, 1))
    with pytest.raises(ValueError, match="compression must be one of"):
        ShardWriter(run_dir, compression="gzip")


def test_column_shards_fill_rewards_and_scores(run_dir, make_rows):
    rows = make_rows(groups=4, group_size=2, seed=4)
    shards = {"generator_0000": rows[:5], "generator_0001": rows[5:]}
    writer = ShardWriter(run_dir)
    for name, part in shards.items():
        writer.write(2, name, part)
    commit_iteration(run_dir, 2, list(shards))
    reader = RolloutReader(run_dir)
    with pytest.raises(
        IncompleteIterationError,
        match=r"column 'reward' is not filled for 8 of 8 samples \(first: generator_0000.arrow row 0\)",
    ):
        reader.read(2, require_filled=["reward"])

    rewards = {name: [float(10 * r["group_id"] + r["sample_index"]) for r in part] for name, part in shards.items()}
    writer.write_columns(2, "generator_0000", "rewards", {"reward": rewards["generator_0000"], "score": [1] * 5})
    with pytest.raises(
        IncompleteIterationError, match=r"not filled for 3 of 8 samples \(first: generator_0001.arrow row 0\)"
    ):
        reader.read(2, require_filled=["reward"])
    writer.write_columns(2, "generator_0001", "rewards", pa.table({"reward": pa.array(rewards["generator_0001"])}))
    writer.write_columns(
        2,
        "generator_0001",
        "reference",
        {"reference_log_probs": [r["behaviour_log_probs"] for r in shards["generator_0001"]]},
    )

    table = reader.read(2, require_filled=["reward"])
    assert table.column("reward").to_pylist() == [float(10 * g + s) for g in range(4) for s in range(2)]
    assert table.column("score").to_pylist() == [1.0] * 5 + [None] * 3
    by_key = {(r["group_id"], r["sample_index"]): r for r in table.to_pylist()}
    for row in shards["generator_0001"]:
        got = by_key[(row["group_id"], row["sample_index"])]
        assert got["reference_log_probs"] == pytest.approx(row["behaviour_log_probs"])
        assert got["response_ids"] == row["response_ids"]
    assert sorted(p.name for p in iteration_dir(run_dir, 2).glob("*.rewards.*")) == [
        "generator_0000.rewards.arrow",
        "generator_0000.rewards.commit.json",
        "generator_0001.rewards.arrow",
        "generator_0001.rewards.commit.json",
    ]
    assert len(load_manifest(run_dir, 2).column_shards) == 3


def test_column_shard_errors(run_dir, make_rows):
    rows = make_rows(groups=2, group_size=2, seed=5)
    writer = ShardWriter(run_dir)
    with pytest.raises(RolloutError, match="is not committed"):
        writer.write_columns(0, "generator_0000", "rewards", {"reward": [0.0] * 4})
    writer.write(0, "generator_0000", rows)
    with pytest.raises(RolloutValidationError, match="has 3 rows, the shard it fills has 4"):
        writer.write_columns(0, "generator_0000", "rewards", {"reward": [0.0] * 3})
    with pytest.raises(RolloutValidationError, match="may only fill"):
        writer.write_columns(0, "generator_0000", "rewards", {"response_ids": [[1]] * 4})
    long_values = [[0.0] * (len(r["response_ids"]) + 1) for r in rows]
    with pytest.raises(RolloutValidationError, match=r"column 'values', row 0: length differs"):
        writer.write_columns(0, "generator_0000", "critic", {"values": long_values})
    with pytest.raises(ValueError, match="stage name must match"):
        writer.write_columns(0, "generator_0000", "re.wards", {"reward": [0.0] * 4})

    writer.write_columns(0, "generator_0000", "rewards", {"reward": [1.0] * 4})
    with pytest.raises(ShardExistsError, match="stage 'rewards' is already committed"):
        writer.write_columns(0, "generator_0000", "rewards", {"reward": [2.0] * 4})
    writer.write_columns(0, "generator_0000", "rewards", {"reward": [2.0] * 4}, overwrite=True)
    writer.write_columns(0, "generator_0000", "second", {"reward": [3.0] * 4})
    reader = RolloutReader(run_dir)
    with pytest.raises(
        RolloutError,
        match=r"generator_0000.second.arrow: column 'reward' is also filled by generator_0000.rewards.arrow",
    ):
        reader.read(0, require_complete=False)
    os.unlink(iteration_dir(run_dir, 0) / "generator_0000.second.commit.json")
    assert reader.read(0, require_complete=False).column("reward").to_pylist() == [2.0] * 4

    # the shard is rewritten after its rewards were computed: the stale column shard is refused
    writer.write(0, "generator_0000", make_rows(groups=2, group_size=2, seed=6), overwrite=True)
    with pytest.raises(
        ManifestError, match=r"generator_0000.rewards.arrow: fills an earlier version of generator_0000.arrow"
    ):
        reader.read(0, require_complete=False)


def test_duplicate_samples_and_mixed_groups_are_refused(run_dir, make_rows):
    writer = ShardWriter(run_dir)
    rows = make_rows(groups=2, group_size=2)
    writer.write(0, "generator_0000", rows)
    writer.write(0, "generator_0001", rows[1:2])
    with pytest.raises(
        RolloutError,
        match=r"\(group_id=0, sample_index=1\) appears more than once "
        r"\(in generator_0000.arrow and generator_0001.arrow\)",
    ):
        RolloutReader(run_dir).read(0, require_complete=False)

    mixed = make_rows(groups=1, group_size=2)
    mixed[1]["prompt_id"] = 99
    writer.write(1, "generator_0000", mixed)
    with pytest.raises(RolloutError, match="group_id 0 holds prompt_id 0 and 99"):
        RolloutReader(run_dir).read(1, require_complete=False)


def test_rank_partition_keeps_groups_whole(run_dir, make_rows):
    # group sizes 2, 3, 1, 2, 2 -> 10 samples; two ranks take groups [0, 1] and [2, 3, 4]
    sizes = [2, 3, 1, 2, 2]
    rows = [r for g, n in enumerate(sizes) for r in make_rows(groups=1, group_size=n, first_group=g, seed=g)]
    writer = ShardWriter(run_dir)
    writer.write(0, "generator_0000", rows[::2])
    writer.write(0, "generator_0001", rows[1::2])
    commit_iteration(run_dir, 0, ["generator_0000", "generator_0001"])
    reader = RolloutReader(run_dir)

    def keys(rank, world_size, keep_groups=True):
        table = reader.read(
            0, rank=rank, world_size=world_size, keep_groups=keep_groups, columns=["group_id", "sample_index"]
        )
        return list(zip(table.column("group_id").to_pylist(), table.column("sample_index").to_pylist()))

    assert keys(0, 2) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert keys(1, 2) == [(2, 0), (3, 0), (3, 1), (4, 0), (4, 1)]
    assert [len(keys(r, 3)) for r in range(3)] == [2, 4, 4]  # groups [0], [1, 2], [3, 4]
    assert keys(0, 3, keep_groups=False) == [(0, 0), (0, 1), (1, 0)]  # rows 0..2 of 10
    assert [len(keys(r, 3, keep_groups=False)) for r in range(3)] == [3, 3, 4]
    assert [len(keys(r, 7)) for r in range(7)] == [0, 2, 3, 0, 1, 2, 2]  # more ranks than groups
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        reader.read(0, rank=2, world_size=2)
