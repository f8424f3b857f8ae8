"""The run directory's record of its config, and the rule that keeps one directory to one run.

RUN_DIR/config.yaml records the resolved config of the run whose metrics, rollouts, checkpoints and models sit beside
it. A start on a directory that already holds a run is allowed when it continues that run: a SLURM requeue, a resume,
or a restart that changes only keys a checkpoint may differ in (run length, eval, logging, the allocation; see
`hpc_rlhf.run.checkpoint.VOLATILE_KEYS`). Any other difference is refused before anything is written, with the keys that
differ; `overwrite=True` moves the earlier run's files to RUN_DIR/previous/N/ first, so nothing is ever deleted.
When a continuation changes a volatile key, the config it replaces is kept as RUN_DIR/config_history/config-N.yaml.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from hpc_rlhf.rollouts.atomic import atomic_write_bytes

CONFIG_FILE = "config.yaml"
PREVIOUS_DIR = "previous"  # earlier runs moved aside by overwrite, one numbered folder each
HISTORY_DIR = "config_history"  # configs replaced by a continuation that changed volatile keys
SHOWN_DIFFERENCES = 3


class RunDirConflict(Exception):
    """The run directory holds another run (a config that differs in keys a resume must keep)."""


def config_differences(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """{key: (saved value, current value)} for the fingerprinted keys (those a resume must keep) that differ."""
    from hpc_rlhf.run.checkpoint import fingerprinted_fields

    absent = "<absent>"
    old, new = fingerprinted_fields(saved), fingerprinted_fields(current)
    return {key: (old.get(key, absent), new.get(key, absent))
            for key in sorted(set(old) | set(new)) if old.get(key, absent) != new.get(key, absent)}


def read_recorded_config(run_dir: Path) -> dict | None:
    """RUN_DIR/config.yaml as a dict, or None when there is none; RunDirConflict when it cannot be read."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        recorded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RunDirConflict(f"cannot read {path} ({type(err).__name__}); use a new --train.run_dir, or "
                             f"--overwrite-run-dir to move what {run_dir} holds to {run_dir / PREVIOUS_DIR}/") from None
    if not isinstance(recorded, dict):
        raise RunDirConflict(f"{path} is not a config mapping; use a new --train.run_dir, or --overwrite-run-dir")
    return recorded


def conflict_message(run_dir: Path, differences: dict[str, tuple[Any, Any]]) -> str:
    """One line: which directory, the first differing keys, and the ways forward."""
    shown = "; ".join(f"{key}: {old!r} there, {new!r} now"
                      for key, (old, new) in list(differences.items())[:SHOWN_DIFFERENCES])
    more = f"; and {len(differences) - SHOWN_DIFFERENCES} more" if len(differences) > SHOWN_DIFFERENCES else ""
    return (f"train.run_dir: {run_dir} holds a run with a different config ({shown}{more}); to keep that run, use a "
            f"new --train.run_dir; to start over here, add --overwrite-run-dir (the earlier run's files move to "
            f"{run_dir / PREVIOUS_DIR}/N/); to resume it, run with its config ({run_dir / CONFIG_FILE})")


def check_run_dir(run_dir: str | os.PathLike, config: dict, *, overwrite: bool = False) -> dict | None:
    """Read-only check: RunDirConflict when `run_dir` holds another run and `overwrite` is off. Returns the recorded
    config (None for a fresh directory)."""
    run_dir = Path(run_dir)
    try:
        recorded = read_recorded_config(run_dir)
    except RunDirConflict:
        if overwrite:
            return None
        raise
    if recorded is not None and not overwrite:
        differences = config_differences(recorded, config)
        if differences:
            raise RunDirConflict(conflict_message(run_dir, differences))
    return recorded


def _next_number(folder: Path, prefix: str = "", suffix: str = "") -> int:
    """1 + the largest N among `folder`'s entries named PREFIX N SUFFIX (1 when there are none)."""
    numbers = [0]
    if folder.is_dir():
        for entry in folder.iterdir():
            middle = entry.name[len(prefix):len(entry.name) - len(suffix)] if suffix else entry.name[len(prefix):]
            if entry.name.startswith(prefix) and entry.name.endswith(suffix) and middle.isdigit():
                numbers.append(int(middle))
    return max(numbers) + 1


def move_aside(run_dir: Path) -> Path | None:
    """Move every entry of `run_dir` (but earlier moved runs) into RUN_DIR/previous/N/; returns that folder, or None
    when there was nothing to move."""
    entries = [entry for entry in run_dir.iterdir() if entry.name != PREVIOUS_DIR]
    if not entries:
        return None
    target = run_dir / PREVIOUS_DIR / str(_next_number(run_dir / PREVIOUS_DIR))
    target.mkdir(parents=True)
    for entry in entries:
        os.rename(entry, target / entry.name)
    return target


def record_run_config(run_dir: str | os.PathLike, config: dict, *, overwrite: bool = False) -> tuple[Path, str]:
    """Create `run_dir` and record `config` there, refusing (RunDirConflict) a directory that holds another run unless
    `overwrite`. Returns (run_dir, what happened: "new", "same", "updated" or "moved:<folder>")."""
    run_dir = Path(run_dir)
    recorded = check_run_dir(run_dir, config, overwrite=overwrite) if run_dir.exists() else None
    text = yaml.safe_dump(config, sort_keys=False)
    outcome = "new"
    if overwrite and run_dir.is_dir():
        previous_ok = recorded is not None and not config_differences(recorded, config)
        if not previous_ok and (run_dir / CONFIG_FILE).exists():
            moved = move_aside(run_dir)
            outcome = f"moved:{moved}" if moved else "new"
            recorded = None
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    if recorded is not None:
        if path.read_text() == text:
            return run_dir, "same"
        history = run_dir / HISTORY_DIR
        history.mkdir(exist_ok=True)
        number = _next_number(history, "config-", ".yaml")
        (history / f"config-{number}.yaml").write_text(path.read_text())
        outcome = "updated"
    atomic_write_bytes(path, text.encode())  # other ranks may read it at any moment: old or new, never half
    return run_dir, outcome
