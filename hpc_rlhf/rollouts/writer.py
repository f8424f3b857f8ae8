"""Writing rollout shards and column shards durably, then committing them.

A shard is written to a hidden temp name in the iteration folder, fsynced, renamed to `SHARD.arrow`,
and the folder fsynced; only then is its commit record `SHARD.commit.json` created (atomically, the
same way). A writer killed at any point leaves either nothing a reader accepts (temp file, or a shard
without record: `cleanup_uncommitted` removes both) or a fully committed shard.

Later stages fill nullable columns (reward, score, reference_log_probs, values) without rewriting the
shard: `write_columns` writes a column shard `SHARD.STAGE.arrow` with one row per row of the shard, in
the same order, and a commit record holding the sha256 of the shard it fills. The reader replaces
those columns when it loads the shard.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hpc_rlhf.run.durable import make_dirs_durable
from hpc_rlhf.rollouts.atomic import atomic_file
from hpc_rlhf.rollouts.errors import CorruptShardError, RolloutError, RolloutValidationError, ShardExistsError
from hpc_rlhf.rollouts.manifest import ShardRecord, find_record, write_record
from hpc_rlhf.rollouts.paths import MANIFEST_NAME, check_name, iteration_dir, shard_file_name
from hpc_rlhf.rollouts.verify import file_problem
from hpc_rlhf.rollouts.schema import (
    ROLLOUT_SCHEMA,
    SCHEMA_VERSION,
    to_column_table,
    to_rollout_table,
    validate_column_table,
)

_COMPRESSIONS = (None, "lz4", "zstd")


class ShardWriter:
    """Writes and commits the shards of one run: `ShardWriter(run_dir).write(iteration, "generator_0003", rows)`."""

    def __init__(self, run_dir: str | os.PathLike, *, compression: str | None = None) -> None:
        if compression not in _COMPRESSIONS:
            raise ValueError(f"compression must be one of {_COMPRESSIONS}, got {compression!r}")
        self.run_dir = Path(run_dir)
        self.compression = compression

    def write(self, iteration: int, shard_name: str, data: Any, *, overwrite: bool = False) -> Path:
        """Write and commit a shard from rows (list of dicts), a dict of columns or an Arrow table; returns its path."""
        return self.write_batches(iteration, shard_name, [data], overwrite=overwrite)

    def write_batches(
        self, iteration: int, shard_name: str, batches: Iterable[Any], *, overwrite: bool = False
    ) -> Path:
        """Stream several batches (each anything `write` accepts) into one shard, then commit it."""
        check_name(shard_name, "shard name")
        directory = self._prepare(iteration, shard_name, None, overwrite)
        if (directory / MANIFEST_NAME).exists():
            raise RolloutError(
                f"{directory}: iteration {iteration} is complete (MANIFEST.json exists); its shards cannot change"
            )
        final = directory / shard_file_name(shard_name)

        # The first batch decides whether the shard has the optional images column; later ones follow it.
        rows, schema = 0, ROLLOUT_SCHEMA
        with atomic_file(final) as handle:
            arrow_writer = None
            try:
                for index, batch in enumerate(batches):
                    source = f"iteration {iteration}, shard {shard_name!r}, batch {index}"
                    if arrow_writer is None:
                        table = to_rollout_table(batch, source)
                        schema = table.schema
                        arrow_writer = pa.ipc.new_file(handle, schema, options=self._ipc_options())
                    else:
                        table = to_rollout_table(batch, source, with_images="images" in schema.names)
                        if table.schema.names != schema.names:
                            raise RolloutValidationError(f"{source}: has an images column, the shard's first batch "
                                                         "had none")
                    arrow_writer.write_table(table)
                    rows += table.num_rows
                if arrow_writer is None:
                    arrow_writer = pa.ipc.new_file(handle, schema, options=self._ipc_options())
            finally:
                if arrow_writer is not None:
                    arrow_writer.close()
        record = self._record(iteration, shard_name, None, final, rows, tuple(schema.names), None)
        write_record(directory, record)
        return final

    def write_columns(
        self,
        iteration: int,
        shard_name: str,
        stage: str,
        columns: Mapping[str, Any] | pa.Table,
        *,
        overwrite: bool = False,
    ) -> Path:
        """Fill columns of a committed shard (row i of `columns` is row i of the shard); returns the new file."""
        check_name(shard_name, "shard name")
        check_name(stage, "stage name")
        directory = iteration_dir(self.run_dir, iteration)
        base = find_record(directory, shard_name)
        if base is None:
            raise RolloutError(
                f"{directory}: shard {shard_name!r} is not committed; columns can only fill a committed shard"
            )
        self._prepare(iteration, shard_name, stage, overwrite)
        source = f"iteration {iteration}, shard {shard_name!r}, stage {stage!r}"
        table = to_column_table(columns, source)
        validate_column_table(table, _response_lengths(directory / base.file), source)

        final = directory / shard_file_name(shard_name, stage)
        with atomic_file(final) as handle:
            with pa.ipc.new_file(handle, table.schema, options=self._ipc_options()) as arrow_writer:
                arrow_writer.write_table(table)
        record = self._record(
            iteration, shard_name, stage, final, table.num_rows, tuple(table.schema.names), base.sha256
        )
        write_record(directory, record)
        return final

    # ------------------------------------------------------------------------------------------

    def _prepare(self, iteration: int, shard_name: str, stage: str | None, overwrite: bool) -> Path:
        """Create the iteration folder; refuse to replace a committed file unless `overwrite`."""
        directory = iteration_dir(self.run_dir, iteration)
        make_dirs_durable(directory)
        record = None if overwrite else find_record(directory, shard_name, stage)
        if record is not None:

            problem = file_problem(directory / record.file, record, checksum=False)
            if problem is not None:
                raise CorruptShardError(
                    f"{directory / record.file} {problem}: the committed file is damaged; resuming the job sets it "
                    f"aside and generates iteration {iteration} again (or says why it cannot)")
            what = f"shard {shard_name!r}" + ("" if stage is None else f" stage {stage!r}")
            raise ShardExistsError(f"{directory}: {what} is already committed; pass overwrite=True to replace it")
        return directory

    def _ipc_options(self) -> pa.ipc.IpcWriteOptions:
        return pa.ipc.IpcWriteOptions(compression=self.compression)

    def _record(
        self,
        iteration: int,
        shard_name: str,
        stage: str | None,
        path: Path,
        rows: int,
        columns: tuple[str, ...],
        base_sha256: str | None,
    ) -> ShardRecord:
        size, digest = _size_and_sha256(path)
        return ShardRecord(
            iteration=iteration,
            shard=shard_name,
            stage=stage,
            file=path.name,
            rows=rows,
            bytes=size,
            sha256=digest,
            schema_version=SCHEMA_VERSION,
            columns=columns,
            base_sha256=base_sha256,
            host=socket.gethostname(),
            pid=os.getpid(),
            created_unix=time.time(),
        )


def _size_and_sha256(path: Path) -> tuple[int, str]:
    """Byte size and sha256 of a file, read through a memory map."""
    buffer = pa.memory_map(str(path), "r").read_buffer()
    return buffer.size, hashlib.sha256(buffer).hexdigest()


def _response_lengths(path: Path) -> np.ndarray:
    """Number of response tokens of each row of a shard file (reads one column through a memory map)."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as exc:
        raise RolloutValidationError(f"{path}: cannot read the shard to check column lengths: {exc}") from exc
    return pc.list_value_length(table.column("response_ids")).to_numpy(zero_copy_only=False).astype(np.int64)
