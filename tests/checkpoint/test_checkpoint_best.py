"""Best-model tracking (ckpt.best_metric_key / ckpt.best_mode): the selection rule on hand-made evaluation values, the
folder and record it writes, and its survival through a checkpoint and resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hpc_rlhf.config.schema import Config
from hpc_rlhf.trainers.checkpointing import BestMetric, CheckpointService, improves
from hpc_rlhf.trainers.common import StepProgress
from tests.checkpoint.one_rank import OneRank




def service(run_dir: Path, key: str = "eval/accuracy", mode: str = "max") -> CheckpointService:
    cfg = Config()
    cfg.train.run_dir = str(run_dir)
    cfg.ckpt.best_metric_key, cfg.ckpt.best_mode = key, mode
    return CheckpointService(cfg, rank=0, world_size=1, control=OneRank(), engines={}, trainer=StepProgress())


def test_improves_by_hand():
    assert improves(0.5, None, "max") and improves(0.5, None, "min")
    assert improves(0.6, 0.5, "max") and not improves(0.5, 0.5, "max") and not improves(0.4, 0.5, "max")
    assert improves(0.4, 0.5, "min") and not improves(0.5, 0.5, "min") and not improves(0.6, 0.5, "min")
    assert not improves(math.nan, None, "max")
    with pytest.raises(ValueError, match="best_mode"):
        improves(1.0, 0.0, "largest")


@pytest.mark.parametrize("mode, values, kept, best", [
    # max: 0.25 (first), 0.5 better, 0.375 worse, 0.5 a tie (not better), 0.75 better -> step 50
    ("max", [0.25, 0.5, 0.375, 0.5, 0.75], [True, True, False, False, True], (50, 0.75)),
    # min (a loss): 2.0, 1.5 better, 1.5 tie, 3.0 worse, 1.25 better -> step 50
    ("min", [2.0, 1.5, 1.5, 3.0, 1.25], [True, True, False, False, True], (50, 1.25)),
    # max with a NaN evaluation in between: it never counts
    ("max", [0.5, math.nan, 0.25], [True, False, False], (10, 0.5)),
])
def test_best_metric_selection(mode, values, kept, best):
    tracker = BestMetric("eval/accuracy", mode)
    got = [tracker.offer(10 * (i + 1), {"eval/accuracy": v, "eval/loss": 1.0}) for i, v in enumerate(values)]
    assert got == kept
    assert (tracker.step, tracker.value) == best


def test_unknown_metric_names_the_evaluation_metrics():
    with pytest.raises(KeyError, match="eval/acc.*eval/accuracy"):
        BestMetric("eval/acc").offer(1, {"eval/accuracy": 0.5, "train/loss": 1.0})


def test_keep_if_best_writes_the_model_and_the_record(tmp_path):
    svc = service(tmp_path / "run")
    written: list[int] = []

    def write(step: int):
        def write_model(out: Path) -> None:
            out.mkdir(parents=True)
            (out / "step.txt").write_text(str(step))
            written.append(step)
        return write_model

    assert svc.keep_if_best(2, {"eval/accuracy": 0.25}, write(2))
    assert not svc.keep_if_best(4, {"eval/accuracy": 0.125}, write(4))
    assert svc.keep_if_best(6, {"eval/accuracy": 0.5}, write(6))
    assert written == [2, 6]  # a worse evaluation writes nothing
    hf = tmp_path / "run" / "hf"
    assert (hf / "best" / "step.txt").read_text() == "6"
    assert sorted(p.name for p in hf.iterdir()) == ["best"]  # no candidate or old copy left behind
    record = json.loads((tmp_path / "run" / "best.json").read_text())
    assert record == {"metric": "eval/accuracy", "mode": "max", "step": 6, "value": 0.5}


def test_candidate_written_before_the_evaluation_is_settled(tmp_path):
    svc = service(tmp_path / "run", key="eval/reward_mean")
    for step, value in ((0, -1.0), (1, -2.0)):
        svc.best_candidate_dir.mkdir(parents=True)
        (svc.best_candidate_dir / "step.txt").write_text(str(step))
        svc.settle_best_candidate(step, {"eval/reward_mean": value})
    hf = tmp_path / "run" / "hf"
    assert (hf / "best" / "step.txt").read_text() == "0" and not svc.best_candidate_dir.exists()


def test_best_so_far_survives_a_resume(tmp_path):
    svc = service(tmp_path / "run")
    write = lambda out: out.mkdir(parents=True)  # noqa: E731
    svc.keep_if_best(3, {"eval/accuracy": 0.5}, write)
    path = svc.save(3)
    assert json.loads((path / "trainer_state.json").read_text())["best_metric"] == {
        "key": "eval/accuracy", "mode": "max", "value": 0.5, "step": 3}
    resumed = service(tmp_path / "run")
    assert resumed.restore() == path
    assert (resumed.best.step, resumed.best.value) == (3, 0.5)
    assert not resumed.keep_if_best(5, {"eval/accuracy": 0.375}, write)  # worse than the best before the resume
    # Another metric or direction starts afresh.
    assert service(tmp_path / "run", mode="min").restore() is not None
    other = service(tmp_path / "run", mode="min")
    other.restore()
    assert other.best.value is None


def test_tracking_off_by_default(tmp_path):
    svc = service(tmp_path / "run", key="")
    assert svc.best is None
    assert not svc.keep_if_best(1, {"eval/accuracy": 1.0}, lambda out: out.mkdir(parents=True))
    assert "best_metric" not in json.loads((svc.save(1) / "trainer_state.json").read_text())
    assert not (tmp_path / "run" / "hf").exists()
