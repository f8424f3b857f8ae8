"""The model cache of the built-in models: where it is, and building a folder into it exactly once.

$HPC_RLHF_CACHE (default ~/.cache/hpc_rlhf) may sit on a filesystem that every node of a job shares.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

CACHE_ENV = "HPC_RLHF_CACHE"


def cache_root() -> Path:
    """Folder holding built-in models: $HPC_RLHF_CACHE, else ~/.cache/hpc_rlhf."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "hpc_rlhf"


def build_once(final_dir: Path, build: Callable[[Path], object]) -> Path:
    """Return `final_dir`, first running `build(tmp)` in a fresh sibling folder and renaming it into place.

    Safe when many processes (or nodes sharing a filesystem) ask at once: the folder only ever appears complete,
    through one atomic rename; a process whose rename loses the race discards its copy and uses the winner's.
    """
    final_dir = Path(final_dir)
    if final_dir.is_dir():
        return final_dir
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.building-", dir=final_dir.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished folder should read like any other
        try:
            os.rename(tmp, final_dir)
        except OSError:
            if not final_dir.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final_dir
