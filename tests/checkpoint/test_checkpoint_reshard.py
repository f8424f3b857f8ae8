"""Resuming real DeepSpeed engines on another number of ranks through the universal checkpoint (gloo, CPU).

A 3-rank job trains 2 steps and checkpoints; a 2-rank job converts that checkpoint (`hpc_rlhf.run.universal`), loads
it into its own ZeRO partitions, trains one step and checkpoints; a 3-rank job does the same from the 2-rank
checkpoint. What each job holds right after its load (fp32 master weights and both Adam moments, gathered whole per
parameter, step count and learning rate) must equal bit for bit what the job before it held when it saved. The
command-line conversion ahead of a resume (several processes) must write what rank 0's conversion writes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpc_rlhf.run.universal import convert_checkpoint
from tests.multiproc import run_ranks

STAGES = [2, 3]
LEGS = [("first", 3, 2), ("fewer", 2, 3), ("more", 3, 4)]  # (leg, ranks, steps done when it saves)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def legs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.checkpoint.workers.reshard import run_leg  # imports DeepSpeed: only when these tests run

    out = tmp_path_factory.mktemp("reshard")
    for leg, ranks, step in LEGS:
        run_ranks(run_leg, ranks, str(out), leg, step, STAGES, timeout_s=150, init_process_group=False)
    return out


def _record(out: Path, leg: str, stage: int) -> dict:
    return torch.load(out / f"{leg}_stage{stage}.pt", map_location="cpu", weights_only=False)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage", STAGES)
def test_each_job_loads_exactly_what_the_previous_job_saved(legs: Path, stage: int) -> None:
    for (before, ranks_before, step), (after, ranks_after, _) in zip(LEGS, LEGS[1:]):
        saved, resumed = _record(legs, before, stage), _record(legs, after, stage)
        assert saved["world"] == ranks_before and resumed["world"] == ranks_after
        assert resumed["loaded_from"] == (f"iter_{step:06d}", ranks_before, {"next_iteration": step})
        assert len(resumed["converted"]) == 1 and f"{ranks_before} data-parallel rank(s)" in resumed["converted"][0]
        loaded = resumed["loaded"]
        assert loaded["global_steps"] == saved["saved"]["global_steps"] == step
        assert loaded["lr"] == saved["saved"]["lr"]
        keys = [key for key in saved["saved"] if ":" in key]
        assert len(keys) == 21 * 3  # 21 parameters, each fp32 weights and two moments
        for key in keys:
            assert torch.equal(loaded[key], saved["saved"][key]), f"{before} -> {after}: {key} differs"
        moved = [key for key in keys if key.endswith(":fp32")
                 and not torch.equal(resumed["saved"][key], loaded[key])]
        assert len(moved) >= 20, "the step after the load changes the weights: the comparison is not vacuous"


def _universal_tensors(checkpoint: Path) -> dict[str, object]:
    """Every file of the checkpoint's universal folders, loaded, by its path below the checkpoint."""
    return {str(f.relative_to(checkpoint)): torch.load(f, map_location="cpu", weights_only=False)
            for f in sorted(checkpoint.glob("*/*_universal/**/*")) if f.is_file() and f.suffix == ".pt"}


@pytest.mark.timeout(300)
def test_converting_ahead_from_the_command_line_writes_what_the_resume_would(legs: Path, tmp_path: Path) -> None:
    """`python -m hpc_rlhf.run.universal CHECKPOINT --workers 2` (processes reading and merging in parallel) writes
    the same universal form as the single-process conversion a resuming rank 0 runs; bad input is one line."""
    saved = legs / "stage2" / "checkpoints" / "iter_000004"  # the last 3-rank save, never converted
    in_process, ahead = tmp_path / "a" / saved.name, tmp_path / "b" / saved.name
    shutil.copytree(saved, in_process)
    shutil.copytree(saved, ahead)
    announced: list[str] = []
    assert len(convert_checkpoint(in_process, saved.name, announce=announced.append)) == 1
    assert announced == ["checkpoint iter_000004: converting actor's ZeRO states of 3 data-parallel rank(s) to "
                         "DeepSpeed's universal form ..."]

    command = [sys.executable, "-m", "hpc_rlhf.run.universal", str(ahead), "--workers", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == [announced[0], "checkpoint iter_000004: actor's ZeRO states of 3 "
                                          "data-parallel rank(s) converted to DeepSpeed's universal form "
                                          "(actor/iter_000004_universal)"]
    expected, written = _universal_tensors(in_process), _universal_tensors(ahead)
    assert sorted(written) == sorted(expected) and len(written) >= 21 * 3
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(written[name], value), name

    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == ("checkpoint iter_000004: already converted "
                                                              "(actor/iter_000004_universal)")
    missing = subprocess.run([sys.executable, "-m", "hpc_rlhf.run.universal", str(tmp_path / "nothing")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].endswith("no such checkpoint folder")
