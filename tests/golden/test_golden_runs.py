"""Golden runs: short GRPO, PPO, SFT and DPO trainings must reproduce the recorded losses, metrics, rollouts and final
weights bit for bit, so that a refactor provably changes no behaviour.

The runs, their configs and the comparison are defined once, in tools/record_golden.py; the recording of this CPU's
kernel set is tests/golden/golden_runs_<kernel set>.json (the CPU kernels torch dispatches to change the last bits).
Each run here is `python -m hpc_rlhf.train` on this checkout's code (about 7-25 s).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_recorder():
    spec = importlib.util.spec_from_file_location("record_golden", REPO / "tools" / "record_golden.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


recorder = _load_recorder()
GOLDEN_FILE = recorder.golden_file()
GOLDEN = recorder.load_golden(GOLDEN_FILE) if GOLDEN_FILE.exists() else None
needs_recording = pytest.mark.skipif(
    GOLDEN is None, reason=f"no golden recording for this CPU's kernels ({GOLDEN_FILE.name}); record one from an "
                          f"unchanged commit with `{recorder.RECORD_COMMAND}`")


def failure_message(name: str, problems: list[str]) -> str:
    """The differences, where the recording was made, and what to do about them."""
    recorded_on, here = GOLDEN["environment"], recorder.environment()
    lines = [f"golden run {name} no longer reproduces {GOLDEN_FILE.relative_to(REPO)}:", *problems, ""]
    if recorded_on != here:
        lines.append(f"Recorded on {recorded_on}, running on {here}: CPU kernels and library versions change the "
                     f"last bits; record on this machine from the unchanged commit first to tell the two apart.")
    lines.append(f"A refactor must keep these numbers: find the change that moved them. Only when a change of the "
                 f"numbers is intended, re-record with `{recorder.RECORD_COMMAND}` and say why in the commit message.")
    return "\n".join(lines)


def test_every_kernel_set_records_every_run():
    recordings = sorted(recorder.GOLDEN_DIR.glob("golden_runs_*.json"))
    assert recordings, "no golden recording at all"
    for path in recordings:
        golden = recorder.load_golden(path)
        assert path == recorder.golden_file(recorder.recorded_kernel_set(golden)), f"{path.name} holds another CPU's"
        assert sorted(golden["runs"]) == sorted(run.name for run in recorder.RUNS), (
            f"the runs of tools/record_golden.py and {path.name} differ; run `{recorder.RECORD_COMMAND}`")


def test_differences_name_the_run_step_and_metric():
    recorded = recorder.load_golden(sorted(recorder.GOLDEN_DIR.glob("golden_runs_*.json"))[0])["runs"]["sft"]
    fresh = copy.deepcopy(recorded)
    fresh["metrics"][2]["train/loss"] = "1.5"
    fresh["weights_sha256"]["actor"] = "0" * 64
    problems = recorder.differences("sft", recorded, fresh)
    step = recorded["metrics"][2]["step"]
    assert problems[0] == f"sft: step {step} train/loss: recorded {recorded['metrics'][2]['train/loss']}, now 1.5"
    assert problems[1].startswith("sft: final weights of hf/actor differ")
    assert recorder.differences("sft", recorded, copy.deepcopy(recorded)) == []


@needs_recording
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [run.name for run in recorder.RUNS])
def test_golden_run_is_bit_identical(tmp_path, name):
    run = next(run for run in recorder.RUNS if run.name == name)
    fresh = recorder.run_golden(run, tmp_path)
    problems = recorder.differences(name, GOLDEN["runs"][name], fresh)
    assert not problems, failure_message(name, problems)
