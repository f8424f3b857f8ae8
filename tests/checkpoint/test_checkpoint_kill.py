"""A job SIGKILLed while saving never leaves a checkpoint that `latest_checkpoint` would pick but cannot use.

Real subprocesses (workers/save_and_die.py) are killed at chosen phases of a save and at random moments of a
stream of saves; after each kill the checkpoint picked must be complete and consistent (its weights, its trainer
state and its folder name agree), and the next save or resume removes what the killed save left behind.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
import torch

from hpc_rlhf.run.checkpoint import (
    config_fingerprint,
    is_complete,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)

FINGERPRINT = config_fingerprint({"train": {"seed": 0}})  # as in the worker
WEIGHTS = 1 << 20


def _assert_consistent(path: Path) -> int:
    """`path` is complete and its weights, trainer state and name all give the same iteration; returns it."""
    assert is_complete(path)
    iteration = read_trainer_state(path)["next_iteration"]
    assert path.name == f"iter_{iteration:06d}"
    model = torch.nn.Linear(WEIGHTS, 1, bias=False)
    load_checkpoint(path, rank=0, engines={"model": model}, config_fingerprint=FINGERPRINT, restore_rng=False)
    assert torch.all(model.weight == float(iteration)), f"{path} holds weights of another save"
    assert (path / "rng" / "rank_00000.pt").is_file()
    return iteration


def _fallback_pick(root: Path) -> Path | None:
    """What `latest_checkpoint` picks when the `latest` pointer is lost: it must rely on COMPLETE alone."""
    pointer, hidden = root / "latest", root / "latest.hidden"
    pointer.rename(hidden)
    try:
        return latest_checkpoint(root)
    finally:
        hidden.rename(pointer)


def _only_clean_entries(root: Path) -> bool:
    return all(p.name == "latest" or (p.name.startswith("iter_") and ".tmp-" not in p.name and is_complete(p))
               for p in root.iterdir())


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("phase", "expected"), [
    ("engine", "iter_000001"),    # killed while writing an engine: the temporary folder is ignored
    ("external", "iter_000001"),  # the same, killed from outside by the test
    ("rename", "iter_000001"),    # temporary folder finished (COMPLETE inside) but not renamed: still ignored
    ("latest", "iter_000001"),    # new checkpoint complete, `latest` not replaced yet: `latest` is still valid
    ("delete", "iter_000002"),    # killed while keep-last deletes the old one: the new one is published
])
def test_kill_at_each_phase_of_a_save(tmp_path: Path, start_worker, phase: str, expected: str) -> None:
    root = tmp_path / "checkpoints"
    proc = start_worker("save_and_die.py", ["phase", str(root), phase])
    if phase == "external":
        marker = tmp_path / "marker"
        deadline = time.monotonic() + 40
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "the worker never reached the engine write"
        proc.send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=40)
    assert proc.returncode == -signal.SIGKILL, output

    picked = latest_checkpoint(root)
    assert picked == root / expected
    newest_complete = root / ("iter_000001" if phase in ("engine", "external", "rename") else "iter_000002")
    assert _fallback_pick(root) == newest_complete
    assert not _only_clean_entries(root), "the kill should have left something behind"

    # The next save removes the leftovers and keeps the complete checkpoints (a resume does too: see below).
    survivors = {p.name for p in root.iterdir() if p.name.startswith("iter_") and ".tmp-" not in p.name
                 and is_complete(p)}
    save_checkpoint(root, 3, rank=0, world_size=1, barrier=lambda: None, engines={}, trainer_state={},
                    config_fingerprint=FINGERPRINT, keep_last=0)
    assert sorted(p.name for p in root.iterdir()) == sorted(survivors | {"iter_000003", "latest"})
    _assert_consistent(picked)
    _assert_consistent(newest_complete)


@pytest.mark.timeout(90)
def test_random_kills_during_a_stream_of_saves(tmp_path: Path, start_worker) -> None:
    """Kill a job that saves back to back at random moments; each restart resumes from a consistent checkpoint."""
    root = tmp_path / "checkpoints"
    chooser = random.Random(1234)
    resumed_from = []
    for _ in range(4):
        proc = start_worker("save_and_die.py", ["loop", str(root)])
        try:
            first = proc.stdout.readline()  # "resumed N" (checked by the worker) or "saved N"
            if first.startswith("resumed"):
                resumed_from.append(int(first.split()[1]))
                first = proc.stdout.readline()
            assert first.startswith("saved"), first + proc.stdout.read()
            time.sleep(chooser.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        fallback = _fallback_pick(root)
        assert fallback is not None
        fallback_iteration = _assert_consistent(fallback)
        picked = latest_checkpoint(root)
        assert picked is not None
        iteration = _assert_consistent(picked)  # loads as global rank 0 would on resume, removing leftovers
        assert _only_clean_entries(root)
        assert iteration >= max(resumed_from, default=1)
        assert fallback_iteration in (iteration, iteration + 1)  # killed after publishing, before `latest`
    assert len(resumed_from) == 3
    assert resumed_from == sorted(resumed_from) and len(set(resumed_from)) == 3, "each restart made progress"
