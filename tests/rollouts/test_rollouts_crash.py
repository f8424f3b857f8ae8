"""Crash safety: killed writers, damaged manifests and records, corrupt and schema-mismatched shards."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from hpc_rlhf.rollouts import (
    ROLLOUT_SCHEMA,
    CorruptShardError,
    ManifestError,
    RolloutReader,
    SchemaMismatchError,
    ShardWriter,
    cleanup_uncommitted,
    commit_iteration,
    committed_shards,
    iteration_dir,
    iterations_completed,
    load_manifest,
    read_shard_file,
    to_rollout_table,
)
from hpc_rlhf.rollouts.manifest import write_record


def _start_writer(python, workers_dir, run_dir, mode, env) -> subprocess.Popen:
    return subprocess.Popen([python, str(workers_dir / "crash_writer.py"), str(run_dir), mode], env=env)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"writer exited with {process.returncode} before {path.name} appeared")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def _kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.timeout(60)
def test_writer_killed_mid_write_leaves_nothing_readable(python, workers_dir, run_dir, subprocess_env):
    process = _start_writer(python, workers_dir, run_dir, "stall", subprocess_env)
    _wait_for(run_dir / "ready", process)
    _kill(process)

    directory = iteration_dir(run_dir, 0)
    leftovers = os.listdir(directory)
    assert len(leftovers) == 1 and leftovers[0].startswith(".generator_0000.arrow.tmp.")
    temp = directory / leftovers[0]
    assert temp.stat().st_size > 0  # two batches were written before the kill
    with pytest.raises(CorruptShardError, match=f"{leftovers[0]}: not a readable Arrow IPC file"):
        read_shard_file(temp)

    assert committed_shards(run_dir, 0) == []
    assert load_manifest(run_dir, 0).shards == ()
    assert RolloutReader(run_dir).read(0, require_complete=False).num_rows == 0
    assert cleanup_uncommitted(run_dir) == [temp]
    assert os.listdir(directory) == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("delay", [0.0, 0.15, 0.4])
def test_writer_killed_at_a_random_moment_keeps_committed_shards_intact(
    python, workers_dir, run_dir, subprocess_env, delay
):
    process = _start_writer(python, workers_dir, run_dir, "loop", subprocess_env)
    _wait_for(run_dir / "ready", process)
    time.sleep(delay + random.uniform(0, 0.05))
    _kill(process)

    reader = RolloutReader(run_dir)
    iterations = reader.iterations(complete_only=False)
    assert iterations
    total = 0
    for iteration in iterations:
        manifest = reader.manifest(iteration)
        for name in committed_shards(run_dir, iteration):
            table = reader.read_shard(iteration, name, manifest=manifest)  # checksum and schema verified
            assert table.num_rows == 64 and table.column("response_ids")[0].as_py() == list(range(512))
            total += 1
        for entry in os.listdir(iteration_dir(run_dir, iteration)):
            committed = entry.removesuffix(".arrow").removesuffix(".commit.json") in manifest.shard_names
            assert committed or entry.startswith(".") or entry.endswith(".arrow"), entry
    assert total >= 1

    before = {it: committed_shards(run_dir, it) for it in iterations}
    removed = cleanup_uncommitted(run_dir)
    assert all(p.name.startswith(".") or p.name.endswith(".arrow") for p in removed)
    assert {it: committed_shards(run_dir, it) for it in iterations} == before
    for iteration in iterations:
        for entry in os.listdir(iteration_dir(run_dir, iteration)):
            assert not entry.startswith("."), entry


def test_shard_renamed_but_not_recorded_is_ignored_and_cleaned(run_dir, make_rows):
    writer = ShardWriter(run_dir)
    writer.write(0, "generator_0000", make_rows(2, 2, first_group=0))
    writer.write(0, "generator_0001", make_rows(2, 2, first_group=5))
    directory = iteration_dir(run_dir, 0)
    os.unlink(directory / "generator_0001.commit.json")  # a crash between rename and commit record
    assert committed_shards(run_dir, 0) == ["generator_0000"]
    assert set(RolloutReader(run_dir).read(0, require_complete=False).column("group_id").to_pylist()) == {0, 1}
    assert cleanup_uncommitted(run_dir, 0) == [directory / "generator_0001.arrow"]
    assert sorted(os.listdir(directory)) == ["generator_0000.arrow", "generator_0000.commit.json"]


def _complete_iteration(run_dir, make_rows) -> Path:
    ShardWriter(run_dir).write(0, "generator_0000", make_rows(3, 2))
    commit_iteration(run_dir, 0, ["generator_0000"])
    return iteration_dir(run_dir, 0)


def test_half_written_manifest_is_detected(run_dir, make_rows):
    manifest = _complete_iteration(run_dir, make_rows) / "MANIFEST.json"
    data = manifest.read_bytes()
    manifest.write_bytes(data[: len(data) // 2])
    for call in (
        lambda: load_manifest(run_dir, 0),
        lambda: iterations_completed(run_dir),
        lambda: RolloutReader(run_dir).read(0),
    ):
        with pytest.raises(ManifestError, match=r"MANIFEST.json: not valid JSON .*truncated or half-written"):
            call()


def test_edited_manifest_and_record_fail_their_checksum(run_dir, make_rows):
    directory = _complete_iteration(run_dir, make_rows)
    body = json.loads((directory / "MANIFEST.json").read_text())
    body["rows"] += 1
    (directory / "MANIFEST.json").write_text(json.dumps(body))
    with pytest.raises(ManifestError, match="MANIFEST.json: content does not match its checksum"):
        load_manifest(run_dir, 0)

    record = directory / "generator_0000.commit.json"
    record.write_bytes(record.read_bytes()[:40])
    with pytest.raises(ManifestError, match=r"generator_0000.commit.json: not valid JSON"):
        committed_shards(run_dir, 0)


def test_corrupt_shard_raises_naming_the_file(run_dir, make_rows):
    directory = _complete_iteration(run_dir, make_rows)
    shard = directory / "generator_0000.arrow"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CorruptShardError, match=r"generator_0000.arrow: sha256 differs from its commit record"):
        RolloutReader(run_dir).read(0)

    shard.write_bytes(original[:-100])
    for verify in (True, False):
        with pytest.raises(CorruptShardError, match=r"generator_0000.arrow: has \d+ bytes, its commit record says"):
            RolloutReader(run_dir, verify_checksum=verify).read(0)
    with pytest.raises(CorruptShardError, match=r"generator_0000.arrow: not a readable Arrow IPC file"):
        read_shard_file(shard)
    shard.unlink()
    with pytest.raises(CorruptShardError, match=r"generator_0000.arrow: file is missing although it is committed"):
        RolloutReader(run_dir).read(0)


def _write_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def test_schema_mismatched_shard_raises_naming_file_and_column(run_dir, make_rows):
    rows = make_rows(3, 2)
    ShardWriter(run_dir).write(0, "generator_0000", rows)
    directory = iteration_dir(run_dir, 0)
    good = to_rollout_table(rows)
    index = ROLLOUT_SCHEMA.get_field_index("response_ids")
    wrong = good.set_column(
        index, pa.field("response_ids", pa.list_(pa.int64())), good.column(index).cast(pa.list_(pa.int64()))
    )
    shard = directory / "generator_0000.arrow"
    _write_arrow(shard, wrong)
    # committed by other code: its commit record matches the bytes, so only the schema check catches it
    data = shard.read_bytes()
    record = load_manifest(run_dir, 0).shards[0]
    write_record(directory, replace(record, bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    with pytest.raises(
        SchemaMismatchError, match=r"generator_0000.arrow: column 'response_ids' has type list<item: int64>"
    ):
        RolloutReader(run_dir).read(0, require_complete=False)

    other = directory / "older.arrow"
    _write_arrow(other, good.drop_columns(["values"]).replace_schema_metadata(ROLLOUT_SCHEMA.metadata))
    with pytest.raises(SchemaMismatchError, match=r"older.arrow: column 'values' is missing"):
        read_shard_file(other)
    _write_arrow(other, good.replace_schema_metadata({}))
    with pytest.raises(SchemaMismatchError, match=r"older.arrow: no rollout schema version"):
        read_shard_file(other)
