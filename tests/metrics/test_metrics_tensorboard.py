"""TensorBoard scalars under RUN_DIR/tensorboard, read back with TensorBoard's own event reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hpc_rlhf.run.metrics import TENSORBOARD_DIR


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    accumulator = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_logged_scalars_are_in_the_event_files(tmp_path, make_logger):
    logger = make_logger(use_tensorboard=True, total_steps=3)
    for step in range(3):
        logger.log(step, {"rollout/reward_mean": 0.1 * step, "train/policy_loss": 1.0 / (step + 1),
                          "time/generate_s": 2.5 + step, "throughput/generate_tokens_per_s": 1000.0 * (step + 1)})
    logger.log(2, {"accuracy": 0.625}, prefix="eval")
    logger.close(plot=False)

    scalars = _scalars(tmp_path)
    assert set(scalars) == {"rollout/reward_mean", "train/policy_loss", "time/generate_s",
                            "throughput/generate_tokens_per_s", "eval/accuracy"}
    expected = {
        "rollout/reward_mean": [0.0, 0.1, 0.2],
        "train/policy_loss": [1.0, 0.5, 1.0 / 3.0],
        "time/generate_s": [2.5, 3.5, 4.5],
        "throughput/generate_tokens_per_s": [1000.0, 2000.0, 3000.0],
    }
    for tag, values in expected.items():
        assert [step for step, _ in scalars[tag]] == [0, 1, 2]
        # TensorBoard stores float32.
        assert [value for _, value in scalars[tag]] == pytest.approx(np.float32(values).tolist(), rel=1e-6)
    assert scalars["eval/accuracy"] == [(2, 0.625)]


def test_resumed_writer_replaces_the_steps_it_trains_again(tmp_path, make_logger):
    first = make_logger(use_tensorboard=True, total_steps=6)
    for step in range(5):
        first.log(step, {"rollout/kl": float(step)})
    first.close(plot=False)
    second = make_logger(use_tensorboard=True, total_steps=6, start_step=2)
    for step in range(2, 4):
        second.log(step, {"rollout/kl": 100.0 + step})
    second.close(plot=False)

    assert len(list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    # Steps from the resume point on come from the new run only; the old run's step 4 is purged.
    assert _scalars(tmp_path)["rollout/kl"] == [(0, 0.0), (1, 1.0), (2, 102.0), (3, 103.0)]


def test_no_tensorboard_directory_when_turned_off(tmp_path, make_logger):
    logger = make_logger(use_tensorboard=False)
    logger.log(0, {"rollout/kl": 0.1})
    logger.close(plot=False)
    assert not (tmp_path / TENSORBOARD_DIR).exists()
