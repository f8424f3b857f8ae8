"""Commit records and per-iteration manifests: which shards of an iteration are committed, and whether it is complete.

Concurrent writers (one per generator rank, on different nodes of a shared filesystem) never write the
same file: each shard gets its own commit record `SHARD.commit.json`, created atomically after the shard
itself was renamed into place. The committed set of an iteration is the union of its commit records; no
file locks are needed. When every expected shard is committed, one process calls `commit_iteration`,
which writes `MANIFEST.json` (atomically) listing them: from then on the iteration is complete and its
shard list is fixed. Every JSON file carries a sha256 of its own content, so a truncated or edited
record or manifest is detected and reported with its path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hpc_rlhf.rollouts.atomic import atomic_write_bytes
from hpc_rlhf.rollouts.errors import IncompleteIterationError, ManifestError, RolloutError
from hpc_rlhf.rollouts.paths import (
    MANIFEST_NAME,
    RECORD_SUFFIX,
    SHARD_SUFFIX,
    check_name,
    is_temp_name,
    iteration_dir,
    parse_iteration_dir,
    parse_record_file_name,
    record_file_name,
    rollouts_dir,
)
from hpc_rlhf.rollouts.schema import SCHEMA_VERSION

RECORD_FORMAT = "hpc_rlhf.rollouts.commit"
MANIFEST_FORMAT = "hpc_rlhf.rollouts.manifest"


@dataclass(frozen=True)
class ShardRecord:
    """What a commit record says about one committed file (a shard, or a column shard when `stage` is set)."""

    iteration: int
    shard: str
    stage: str | None
    file: str
    rows: int
    bytes: int
    sha256: str
    schema_version: int
    columns: tuple[str, ...]
    base_sha256: str | None = None  # for a column shard: sha256 of the shard it fills
    host: str = ""
    pid: int = 0
    created_unix: float = 0.0

    @property
    def is_column_shard(self) -> bool:
        return self.stage is not None

    def to_json_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["columns"] = list(self.columns)
        return body

    @classmethod
    def from_json_dict(cls, body: dict[str, Any], path: Path) -> ShardRecord:
        try:
            values = {name: body[name] for name in cls.__dataclass_fields__}
        except KeyError as exc:
            raise ManifestError(f"{path}: shard entry has no field {exc.args[0]!r}") from exc
        values["columns"] = tuple(values["columns"])
        return cls(**values)


@dataclass(frozen=True)
class Manifest:
    """The committed state of one iteration: its shards, the column shards filling them, and completeness."""

    iteration: int
    complete: bool
    shards: tuple[ShardRecord, ...]
    column_shards: tuple[ShardRecord, ...] = ()
    expected_shards: tuple[str, ...] = field(default=())

    @property
    def rows(self) -> int:
        return sum(record.rows for record in self.shards)

    @property
    def shard_names(self) -> list[str]:
        return [record.shard for record in self.shards]

    def columns_for(self, shard: str) -> list[ShardRecord]:
        """Column shards that fill `shard`, sorted by stage name."""
        return sorted((r for r in self.column_shards if r.shard == shard), key=lambda r: r.stage or "")


# ----------------------------------------------------------------------------------------------
# Self-checksummed JSON


def _encode(body: dict[str, Any]) -> bytes:
    """JSON of `body` plus a `checksum` field: the sha256 of the canonical JSON of `body`."""
    checksum = hashlib.sha256(_canonical(body)).hexdigest()
    return (json.dumps({**body, "checksum": checksum}, indent=1, sort_keys=True) + "\n").encode()


def _decode(path: Path, expected_format: str) -> dict[str, Any]:
    """Read a self-checksummed JSON file; raise ManifestError naming `path` when it is damaged."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: file is missing") from exc
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({len(raw)} bytes; truncated or half-written?): {exc}") from exc
    if not isinstance(body, dict) or "checksum" not in body:
        raise ManifestError(f"{path}: no checksum field; truncated or not written by this code")
    checksum = body.pop("checksum")
    if hashlib.sha256(_canonical(body)).hexdigest() != checksum:
        raise ManifestError(f"{path}: content does not match its checksum; the file was damaged or edited")
    if body.get("format") != expected_format:
        raise ManifestError(f"{path}: format is {body.get('format')!r}, expected {expected_format!r}")
    if body.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: written for rollout schema version {body.get('schema_version')}; "
            f"this code reads version {SCHEMA_VERSION}"
        )
    return body


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# ----------------------------------------------------------------------------------------------
# Commit records


def write_record(directory: Path, record: ShardRecord) -> Path:
    """Write the commit record of `record` atomically; the file it names is committed from then on."""
    path = directory / record_file_name(record.shard, record.stage)
    atomic_write_bytes(path, _encode({"format": RECORD_FORMAT, **record.to_json_dict()}))
    return path


def read_record(path: Path) -> ShardRecord:
    """Read and check one commit record."""
    body = _decode(path, RECORD_FORMAT)
    body.pop("format")
    record = ShardRecord.from_json_dict(body, path)
    if parse_record_file_name(path.name) != (record.shard, record.stage):
        raise ManifestError(f"{path}: describes shard {record.shard!r} stage {record.stage!r}, not its own name")
    return record


def list_records(directory: Path) -> list[ShardRecord]:
    """All commit records of an iteration folder, sorted by file name."""
    if not directory.is_dir():
        return []
    names = sorted(
        entry.name
        for entry in os.scandir(directory)
        if entry.name.endswith(RECORD_SUFFIX) and not is_temp_name(entry.name)
    )
    return [read_record(directory / name) for name in names]


def find_record(directory: Path, shard: str, stage: str | None = None) -> ShardRecord | None:
    """The commit record of one shard (or column shard), None when it is not committed."""
    path = directory / record_file_name(shard, stage)
    return read_record(path) if path.exists() else None


# ----------------------------------------------------------------------------------------------
# Manifests


def load_manifest(run_dir: str | os.PathLike, iteration: int) -> Manifest:
    """The committed state of `iteration`: from MANIFEST.json when complete, else from the commit records."""
    directory = iteration_dir(run_dir, iteration)
    records = list_records(directory)
    base = {r.shard: r for r in records if not r.is_column_shard}
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.exists():
        return Manifest(
            iteration=iteration,
            complete=False,
            shards=tuple(base[name] for name in sorted(base)),
            column_shards=tuple(r for r in records if r.is_column_shard),
        )

    body = _decode(manifest_path, MANIFEST_FORMAT)
    if body.get("iteration") != iteration:
        raise ManifestError(f"{manifest_path}: describes iteration {body.get('iteration')}, not {iteration}")
    listed = [ShardRecord.from_json_dict(entry, manifest_path) for entry in body.get("shards", [])]
    for entry in listed:
        on_disk = base.get(entry.shard)
        if on_disk is None:
            raise ManifestError(
                f"{manifest_path}: lists shard {entry.shard!r} but its commit record "
                f"{record_file_name(entry.shard)} is missing"
            )
        if on_disk.sha256 != entry.sha256 or on_disk.rows != entry.rows:
            raise ManifestError(
                f"{manifest_path}: shard {entry.shard!r} was rewritten after the iteration was completed "
                f"(manifest sha256 {entry.sha256[:12]}, commit record sha256 {on_disk.sha256[:12]})"
            )
    names = {entry.shard for entry in listed}
    return Manifest(
        iteration=iteration,
        complete=True,
        shards=tuple(sorted(listed, key=lambda r: r.shard)),
        column_shards=tuple(r for r in records if r.is_column_shard and r.shard in names),
        expected_shards=tuple(body.get("expected_shards", [])),
    )


def commit_iteration(run_dir: str | os.PathLike, iteration: int, expected_shards: list[str]) -> Manifest:
    """Mark `iteration` complete once every shard in `expected_shards` is committed; call from one process.

    Raises IncompleteIterationError listing the missing shards. Calling it again with the same shards is a
    no-op, so a resumed job may repeat it.
    """
    expected = sorted({check_name(name, "shard name") for name in expected_shards})
    if not expected:
        raise ValueError("expected_shards is empty; an iteration needs at least one shard")
    directory = iteration_dir(run_dir, iteration)
    current = load_manifest(run_dir, iteration)
    committed = {r.shard: r for r in current.shards}
    if current.complete:
        if sorted(committed) != expected:
            raise ManifestError(
                f"{directory / MANIFEST_NAME}: iteration {iteration} was completed with shards "
                f"{sorted(committed)}, not {expected}"
            )
        return current
    missing = [name for name in expected if name not in committed]
    if missing:
        raise IncompleteIterationError(
            f"iteration {iteration} in {directory}: {len(expected) - len(missing)} of {len(expected)} expected "
            f"shards committed; missing {missing}"
        )
    unexpected = sorted(set(committed) - set(expected))
    if unexpected:
        raise RolloutError(
            f"iteration {iteration} in {directory}: committed shards {unexpected} are not in expected_shards; "
            f"delete them (file and .commit.json) or list them"
        )
    for record in committed.values():
        path = directory / record.file
        size = path.stat().st_size if path.exists() else None
        if size != record.bytes:
            raise RolloutError(f"{path}: committed with {record.bytes} bytes but now has {size}")

    shards = [committed[name] for name in expected]
    body = {
        "format": MANIFEST_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "iteration": iteration,
        "complete": True,
        "expected_shards": expected,
        "rows": sum(r.rows for r in shards),
        "shards": [r.to_json_dict() for r in shards],
    }
    atomic_write_bytes(directory / MANIFEST_NAME, _encode(body))
    return load_manifest(run_dir, iteration)


# ----------------------------------------------------------------------------------------------
# Queries for resuming jobs


def committed_shards(run_dir: str | os.PathLike, iteration: int) -> list[str]:
    """Names of the shards of `iteration` that are committed and present, so a restart can skip them."""
    directory = iteration_dir(run_dir, iteration)
    names = []
    for record in load_manifest(run_dir, iteration).shards:
        path = directory / record.file
        if path.exists() and path.stat().st_size == record.bytes:
            names.append(record.shard)
    return names


def iterations_started(run_dir: str | os.PathLike) -> list[int]:
    """Iterations that have a folder, complete or not, in increasing order."""
    root = rollouts_dir(run_dir)
    if not root.is_dir():
        return []
    found = (parse_iteration_dir(entry.name) for entry in os.scandir(root) if entry.is_dir())
    return sorted(i for i in found if i is not None)


def iterations_completed(run_dir: str | os.PathLike) -> list[int]:
    """Iterations whose MANIFEST.json exists (and is intact), in increasing order."""
    done = []
    for iteration in iterations_started(run_dir):
        if (iteration_dir(run_dir, iteration) / MANIFEST_NAME).exists():
            load_manifest(run_dir, iteration)  # raises if the manifest is damaged
            done.append(iteration)
    return done


def latest_complete_iteration(run_dir: str | os.PathLike) -> int | None:
    """The highest complete iteration, None when there is none."""
    done = iterations_completed(run_dir)
    return done[-1] if done else None


def cleanup_uncommitted(run_dir: str | os.PathLike, iteration: int | None = None) -> list[Path]:
    """Delete temp files and shard files that have no commit record; returns what was removed.

    Run it only while no writer of those iterations is active (e.g. at job start): a writer between its
    shard rename and its commit record would lose its shard.
    """
    iterations = iterations_started(run_dir) if iteration is None else [iteration]
    removed = []
    for it in iterations:
        directory = iteration_dir(run_dir, it)
        if not directory.is_dir():
            continue
        recorded = {r.file for r in list_records(directory)}
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            orphan = entry.name.endswith(SHARD_SUFFIX) and entry.name not in recorded
            if entry.is_file() and (is_temp_name(entry.name) or orphan):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed
