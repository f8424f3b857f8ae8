"""How each rank of a multi-process test ended, and the check that every one succeeded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RankRun:
    """How one rank's process ended."""

    rank: int
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str

    def record(self, out: Path) -> dict:
        return json.loads((out / f"rank{self.rank}.json").read_text())


def assert_ranks_succeeded(runs: list[RankRun]) -> None:
    """Fail with the stderr of every rank that did not exit 0, the earliest to end first (usually the cause)."""
    failed = sorted((run for run in runs if run.returncode != 0), key=lambda run: run.seconds)
    report = "\n".join(f"--- rank {run.rank}: exit {run.returncode} after {run.seconds:.1f} s\n{run.stderr[-3000:]}"
                        for run in failed)
    assert not failed, f"{len(failed)} of {len(runs)} ranks failed, the earliest first:\n{report}"
