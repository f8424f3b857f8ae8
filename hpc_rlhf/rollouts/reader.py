"""Reading committed rollout shards: integrity checks, column shards applied, deterministic rank partition.

Only files named by a commit record are read; temp files and shards without a record are ignored. Each
file is memory-mapped, its size (and by default its sha256) compared with its commit record, and its
Arrow schema checked; any mismatch raises an error naming the file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from hpc_rlhf.rollouts.errors import (
    CorruptShardError,
    IncompleteIterationError,
    ManifestError,
    RolloutError,
)
from hpc_rlhf.rollouts.manifest import Manifest, ShardRecord, iterations_completed, iterations_started, load_manifest
from hpc_rlhf.rollouts.partition import duplicate_positions, partition_bounds, sort_order
from hpc_rlhf.rollouts.paths import iteration_dir
from hpc_rlhf.rollouts.schema import (
    ROLLOUT_SCHEMA,
    check_file_schema,
    columns_schema,
    empty_rollout_table,
    with_images_column,
)


def read_shard_file(
    path: str | os.PathLike,
    *,
    record: ShardRecord | None = None,
    verify_checksum: bool = True,
    expected_schema: pa.Schema = ROLLOUT_SCHEMA,
) -> pa.Table:
    """Read one Arrow shard file (zero-copy, memory-mapped), checking it against `record` and the schema."""
    path = Path(path)
    try:
        buffer = pa.memory_map(str(path), "r").read_buffer()
    except FileNotFoundError as exc:
        raise CorruptShardError(f"{path}: file is missing" + (" although it is committed" if record else "")) from exc
    except OSError as exc:
        raise CorruptShardError(f"{path}: cannot be opened: {exc}") from exc
    if record is not None:
        if buffer.size != record.bytes:
            raise CorruptShardError(
                f"{path}: has {buffer.size} bytes, its commit record says {record.bytes} (truncated or replaced)"
            )
        if verify_checksum and hashlib.sha256(buffer).hexdigest() != record.sha256:
            raise CorruptShardError(f"{path}: sha256 differs from its commit record; the file is corrupt")
    try:
        arrow_file = pa.ipc.open_file(buffer)
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise CorruptShardError(f"{path}: not a readable Arrow IPC file: {exc}") from exc
    check_file_schema(arrow_file.schema, path, expected_schema)
    try:
        table = arrow_file.read_all()
    except (pa.ArrowInvalid, pa.ArrowException) as exc:
        raise CorruptShardError(f"{path}: Arrow data cannot be read: {exc}") from exc
    if record is not None and table.num_rows != record.rows:
        raise CorruptShardError(f"{path}: has {table.num_rows} rows, its commit record says {record.rows}")
    return table


class RolloutReader:
    """Reads the committed rollouts of one run: `RolloutReader(run_dir).read(42, rank=r, world_size=w)`."""

    def __init__(self, run_dir: str | os.PathLike, *, verify_checksum: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.verify_checksum = verify_checksum

    def iterations(self, *, complete_only: bool = True) -> list[int]:
        """Iterations that are complete (or, with complete_only=False, that have been started)."""
        return iterations_completed(self.run_dir) if complete_only else iterations_started(self.run_dir)

    def manifest(self, iteration: int) -> Manifest:
        """The committed state of `iteration`."""
        return load_manifest(self.run_dir, iteration)

    def read_shard(self, iteration: int, shard_name: str, *, manifest: Manifest | None = None) -> pa.Table:
        """One committed shard with its column shards applied."""
        manifest = manifest or self.manifest(iteration)
        records = {r.shard: r for r in manifest.shards}
        if shard_name not in records:
            raise RolloutError(
                f"{iteration_dir(self.run_dir, iteration)}: shard {shard_name!r} is not committed "
                f"(committed: {sorted(records)})"
            )
        return self._load(manifest, records[shard_name])

    def read(
        self,
        iteration: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        keep_groups: bool = True,
        require_complete: bool = True,
        require_filled: Sequence[str] = (),
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        """Rank `rank`'s slice of the iteration's samples, ordered by (group_id, sample_index).

        require_filled names nullable columns (e.g. "reward") that must have no nulls in the iteration.
        Every rank checks the whole iteration, so all ranks agree on success or failure.
        """
        manifest = self.manifest(iteration)
        if require_complete and not manifest.complete:
            raise IncompleteIterationError(
                f"{iteration_dir(self.run_dir, iteration)}: iteration {iteration} is not complete "
                f"(no MANIFEST.json; committed shards: {manifest.shard_names})"
            )
        tables = [self._load(manifest, record) for record in manifest.shards]
        if any("images" in t.schema.names for t in tables):  # some shards have images: null for the others' rows
            tables = [with_images_column(t) for t in tables]
        table = pa.concat_tables(tables) if tables else empty_rollout_table()
        owners = np.repeat(np.arange(len(tables)), [t.num_rows for t in tables])
        files = [record.file for record in manifest.shards]
        where = str(iteration_dir(self.run_dir, iteration))

        group_ids = table.column("group_id").to_numpy()
        sample_indices = table.column("sample_index").to_numpy()
        order = sort_order(group_ids, sample_indices)
        _check_unique_keys(group_ids[order], sample_indices[order], owners[order], files, where)
        _check_one_prompt_per_group(group_ids[order], table.column("prompt_id").to_numpy()[order], where)
        for name in require_filled:
            _check_filled(table, name, owners, files, where)

        start, stop = partition_bounds(group_ids[order], rank, world_size, keep_groups)
        part = table.take(pa.array(order[start:stop]))
        return part.select(list(columns)) if columns is not None else part

    def _load(self, manifest: Manifest, record: ShardRecord) -> pa.Table:
        directory = iteration_dir(self.run_dir, manifest.iteration)
        table = read_shard_file(directory / record.file, record=record, verify_checksum=self.verify_checksum)
        filled_by: dict[str, str] = {}
        for column_record in manifest.columns_for(record.shard):
            path = directory / column_record.file
            if column_record.base_sha256 != record.sha256:
                raise ManifestError(
                    f"{path}: fills an earlier version of {record.file} (its base sha256 "
                    f"{str(column_record.base_sha256)[:12]} != {record.sha256[:12]}); rewrite this column shard"
                )
            patch = read_shard_file(
                path,
                record=column_record,
                verify_checksum=self.verify_checksum,
                expected_schema=columns_schema(column_record.columns),
            )
            if patch.num_rows != table.num_rows:
                raise CorruptShardError(f"{path}: has {patch.num_rows} rows, {record.file} has {table.num_rows}")
            for name in patch.schema.names:
                if name in filled_by:
                    raise RolloutError(f"{path}: column {name!r} is also filled by {filled_by[name]}")
                filled_by[name] = column_record.file
                table = table.set_column(
                    table.schema.get_field_index(name), ROLLOUT_SCHEMA.field(name), patch.column(name)
                )
        return table


def _check_unique_keys(
    group_ids: np.ndarray, sample_indices: np.ndarray, owners: np.ndarray, files: list[str], where: str
) -> None:
    duplicates = duplicate_positions(group_ids, sample_indices)
    if len(duplicates):
        i = int(duplicates[0])
        raise RolloutError(
            f"{where}: sample (group_id={group_ids[i]}, sample_index={sample_indices[i]}) appears more than once "
            f"(in {files[owners[i - 1]]} and {files[owners[i]]})"
        )


def _check_one_prompt_per_group(group_ids: np.ndarray, prompt_ids: np.ndarray, where: str) -> None:
    mixed = np.flatnonzero((group_ids[1:] == group_ids[:-1]) & (prompt_ids[1:] != prompt_ids[:-1]))
    if len(mixed):
        i = int(mixed[0]) + 1
        raise RolloutError(
            f"{where}: group_id {group_ids[i]} holds prompt_id {prompt_ids[i - 1]} and {prompt_ids[i]}; "
            f"a group is the samples of one prompt"
        )


def _check_filled(table: pa.Table, name: str, owners: np.ndarray, files: list[str], where: str) -> None:
    if name not in table.schema.names:
        raise ValueError(f"require_filled names unknown column {name!r}")
    column = table.column(name)
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        first_row_of_owner = int(np.searchsorted(owners, owners[row]))
        raise IncompleteIterationError(
            f"{where}: column {name!r} is not filled for {column.null_count} of {table.num_rows} samples "
            f"(first: {files[owners[row]]} row {row - first_row_of_owner})"
        )
