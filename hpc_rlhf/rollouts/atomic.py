"""Durable, atomic file creation: write to a temp name, fsync the file, rename, fsync the folder.

A reader sees either no file or the complete file under its final name, also after a crash of the writer
or the machine. `os.replace` is atomic within one folder on POSIX filesystems, NFS and Lustre included.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from hpc_rlhf.rollouts.paths import temp_path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
def atomic_file(final: Path) -> Iterator[BinaryIO]:
    """Yield a binary file that appears at `final` only once the block ends without an error."""
    temp = temp_path(final)
    try:
        with open(temp, "xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_dir(final.parent)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Write `data` to `final` atomically and durably."""
    with atomic_file(final) as handle:
        handle.write(data)


def sha256_of_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
