"""Names of the rollout files on disk (one place, so writer, reader and tools agree).

    RUN_DIR/rollouts/iter_000042/generator_0003.arrow               a committed shard
    RUN_DIR/rollouts/iter_000042/generator_0003.commit.json         its commit record
    RUN_DIR/rollouts/iter_000042/generator_0003.rewards.arrow       a column shard filling it
    RUN_DIR/rollouts/iter_000042/generator_0003.rewards.commit.json its commit record
    RUN_DIR/rollouts/iter_000042/MANIFEST.json                      the iteration is complete
    RUN_DIR/rollouts/iter_000042/.generator_0003.arrow.tmp.HOST.PID.RANDOM   a write in flight

Shard and stage names are `[A-Za-z0-9_-]+`: the dot separates shard, stage and suffix.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from pathlib import Path

ROLLOUTS_DIRNAME = "rollouts"
ITERATION_PREFIX = "iter_"
SHARD_SUFFIX = ".arrow"
RECORD_SUFFIX = ".commit.json"
MANIFEST_NAME = "MANIFEST.json"
TEMP_MARKER = ".tmp."

_NAME_PATTERN = re.compile(r"[A-Za-z0-9_\-]+")
_ITERATION_PATTERN = re.compile(r"iter_(\d+)")
_RECORD_PATTERN = re.compile(r"([A-Za-z0-9_\-]+)(?:\.([A-Za-z0-9_\-]+))?\.commit\.json")


def rollouts_dir(run_dir: str | os.PathLike) -> Path:
    """The folder that holds one sub-folder per iteration."""
    return Path(run_dir) / ROLLOUTS_DIRNAME


def iteration_dir(run_dir: str | os.PathLike, iteration: int) -> Path:
    """`RUN_DIR/rollouts/iter_000042` for iteration 42."""
    if not isinstance(iteration, int) or isinstance(iteration, bool) or iteration < 0:
        raise ValueError(f"iteration must be a non-negative int, got {iteration!r}")
    return rollouts_dir(run_dir) / f"{ITERATION_PREFIX}{iteration:06d}"


def parse_iteration_dir(name: str) -> int | None:
    """The iteration number of a folder name such as `iter_000042`, None for other names."""
    match = _ITERATION_PATTERN.fullmatch(name)
    return int(match.group(1)) if match else None


def generator_shard_name(rank: int) -> str:
    """The conventional shard name of generator rank `rank`: `generator_0003`."""
    return f"generator_{rank:04d}"


def check_name(name: str, what: str) -> str:
    """Return `name` if it is a valid shard or stage name, else raise naming `what`."""
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{what} must match [A-Za-z0-9_-]+ (no dots or slashes), got {name!r}")
    return name


def shard_file_name(shard: str, stage: str | None = None) -> str:
    """`generator_0003.arrow`, or `generator_0003.rewards.arrow` for a column shard of stage `rewards`."""
    return f"{shard}{'' if stage is None else '.' + stage}{SHARD_SUFFIX}"


def record_file_name(shard: str, stage: str | None = None) -> str:
    """`generator_0003.commit.json`, or `generator_0003.rewards.commit.json` for a column shard."""
    return f"{shard}{'' if stage is None else '.' + stage}{RECORD_SUFFIX}"


def parse_record_file_name(name: str) -> tuple[str, str | None] | None:
    """(shard, stage) of a commit-record file name, None for other names."""
    match = _RECORD_PATTERN.fullmatch(name)
    return (match.group(1), match.group(2)) if match else None


def temp_path(final: Path) -> Path:
    """A unique hidden name next to `final` for writing before the atomic rename."""
    token = secrets.token_hex(4)
    return final.parent / f".{final.name}{TEMP_MARKER}{socket.gethostname()}.{os.getpid()}.{token}"


def is_temp_name(name: str) -> bool:
    """True for the hidden names of writes that have not been renamed into place."""
    return name.startswith(".") and TEMP_MARKER in name
