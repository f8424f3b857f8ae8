"""Checking committed rollout files against their commit records, and setting damaged ones aside.

A committed file whose size or sha256 no longer matches its record (a truncated copy, a disk error, a hand edit) is
damaged. A resumed job checks every file it will read and every file of iterations it has already trained; damaged
files it needs are moved to RUN_DIR/rollouts/damaged/ (with their record and what depends on them) so that the
iteration can be generated again, exactly, from the same seeds and weights.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from hpc_rlhf.rollouts.manifest import ShardRecord, iterations_started, list_records
from hpc_rlhf.rollouts.paths import MANIFEST_NAME, iteration_dir, record_file_name, rollouts_dir

DAMAGED_DIR = "damaged"  # under RUN_DIR/rollouts: files set aside, kept for a look


@dataclass(frozen=True)
class DamagedFile:
    """A committed file that does not match its commit record."""

    path: Path
    record: ShardRecord
    problem: str  # "is missing", "has 812 bytes, its commit record says 4096", "sha256 differs from its commit record"

    def describe(self, run_dir: str | os.PathLike) -> str:
        return f"{_relative(self.path, run_dir)} {self.problem}"


def file_problem(path: Path, record: ShardRecord, *, checksum: bool = True) -> str | None:
    """What is wrong with a committed file, or None when its size (and, with `checksum`, its sha256) match."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if size != record.bytes:
        return f"has {size} bytes, its commit record says {record.bytes}"
    if checksum:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
        if digest.hexdigest() != record.sha256:
            return "sha256 differs from its commit record"
    return None


def damaged_files(run_dir: str | os.PathLike, iteration: int, *, checksum: bool = True) -> list[DamagedFile]:
    """The committed files of `iteration` (shards and column shards) that do not match their records."""
    directory = iteration_dir(run_dir, iteration)
    found = []
    for record in list_records(directory):
        problem = file_problem(directory / record.file, record, checksum=checksum)
        if problem is not None:
            found.append(DamagedFile(directory / record.file, record, problem))
    return found


def damaged_in_run(run_dir: str | os.PathLike, iterations: range | None = None, *,
                   checksum: bool = True) -> dict[int, list[DamagedFile]]:
    """{iteration: damaged files} over the started iterations (within `iterations` when given)."""
    out = {}
    for iteration in iterations_started(run_dir):
        if iterations is not None and iteration not in iterations:
            continue
        damaged = damaged_files(run_dir, iteration, checksum=checksum)
        if damaged:
            out[iteration] = damaged
    return out


def set_aside(run_dir: str | os.PathLike, iteration: int, damaged: list[DamagedFile]) -> Path:
    """Move damaged files, their commit records, the column shards that fill a damaged shard, and the iteration's
    MANIFEST.json to RUN_DIR/rollouts/damaged/iter_N/ (an older copy there is replaced); returns that folder.

    Afterwards the iteration holds only intact committed files, so the writers commit the missing ones again.
    """
    directory = iteration_dir(run_dir, iteration)
    target = rollouts_dir(run_dir) / DAMAGED_DIR / directory.name
    target.mkdir(parents=True, exist_ok=True)
    shards = {item.record.shard for item in damaged if not item.record.is_column_shard}
    records = {(item.record.shard, item.record.stage) for item in damaged}
    records |= {(r.shard, r.stage) for r in list_records(directory) if r.shard in shards}
    names = {MANIFEST_NAME}
    for shard, stage in records:
        names.add(record_file_name(shard, stage))
    names |= {item.path.name for item in damaged}
    names |= {r.file for r in list_records(directory) if r.shard in shards}
    # the record goes first: from then on the file is not committed, whatever happens next
    for name in sorted(names, key=lambda n: (not n.endswith(".commit.json"), n)):
        source = directory / name
        if source.exists():
            shutil.move(str(source), str(target / name))
    return target


def _relative(path: Path, run_dir: str | os.PathLike) -> str:
    try:
        return str(path.relative_to(Path(run_dir)))
    except ValueError:
        return str(path)
