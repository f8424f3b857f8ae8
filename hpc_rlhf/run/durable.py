"""Durable file writes: fsync the file, rename it into place, fsync the folder.

A reader sees either no file (or the previous one) or the complete new file under its final name, also after a
crash of the writer or the machine: `os.replace` is atomic within one folder on POSIX filesystems, NFS and Lustre
included. Imports nothing of the project, so checkpoints, rollouts and the SLURM helpers can all build on it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path, *, strict: bool = True) -> None:
    """Flush a folder's entries (new names, renames) to stable storage.

    With strict=False an OSError is let be, for filesystems that refuse to open or fsync folders.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if strict:
            raise


def make_dirs_durable(path: Path) -> None:
    """Create `path` and missing parents, fsyncing each parent whose entries changed."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(created.parent)


@contextlib.contextmanager
def synced_file(path: Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Yield `path` opened for binary writing; its bytes are flushed and fsynced once the block ends."""
    with open(path, mode) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_file(final: Path, temp: Path, *, strict_dir_sync: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file, written at the new name `temp` next to `final`, that replaces `final` once the block
    ends without an error; on an error the temporary file is removed. `strict_dir_sync`: see `fsync_dir`."""
    try:
        with synced_file(temp, "xb") as handle:
            yield handle
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_dir(final.parent, strict=strict_dir_sync)


def atomic_write_bytes(final: Path, data: bytes, temp: Path, *, strict_dir_sync: bool = True) -> None:
    """Write `data` to `final` atomically and durably, through the new name `temp` in the same folder."""
    with atomic_file(final, temp, strict_dir_sync=strict_dir_sync) as handle:
        handle.write(data)
