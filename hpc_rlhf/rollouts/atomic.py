"""Durable, atomic file creation for rollout files: the shared temp-file + fsync + rename + folder fsync
(`hpc_rlhf.run.durable`) under the hidden temporary names that rollout readers and cleanup recognise (`paths.temp_path`).

A reader sees either no file or the complete file under its final name, also after a crash of the writer
or the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from hpc_rlhf.run import durable
from hpc_rlhf.rollouts.paths import temp_path


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[BinaryIO]:
    """Yield a binary file that appears at `final` only once the block ends without an error."""
    with durable.atomic_file(final, temp_path(final)) as handle:
        yield handle


def atomic_write_bytes(final: Path, data: bytes) -> None:
    """Write `data` to `final` atomically and durably."""
    durable.atomic_write_bytes(final, data, temp_path(final))


def sha256_of_file(path: Path, chunk_bytes: int = 8 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
