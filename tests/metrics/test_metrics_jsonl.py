"""metrics.jsonl: one strict JSON line per log call, appended across restarts, read back with the last value winning."""

from __future__ import annotations

import json

import io
import math
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.run.metrics import METRICS_FILE, MetricsLogger, read_metrics


def test_each_log_call_is_one_json_line(tmp_path, make_logger, jsonl_rows):
    logger = make_logger()
    logger.log(0, {"rollout/reward_mean": 0.5, "train/policy_loss": 2})
    logger.log(0, {"accuracy": 0.25}, prefix="eval")
    logger.log(1, {"reward_mean": np.float32(0.1), "n": torch.tensor(3.0), "ok": True}, prefix="rollout/")
    logger.log(2, {})  # nothing to record: no line
    logger.close(plot=False)
    assert jsonl_rows(tmp_path) == [
        {"step": 0, "rollout/reward_mean": 0.5, "train/policy_loss": 2.0},
        {"step": 0, "eval/accuracy": 0.25},
        {"step": 1, "rollout/reward_mean": float(np.float32(0.1)), "rollout/n": 3.0, "rollout/ok": 1.0},
    ]
    assert read_metrics(tmp_path) == {
        "rollout/reward_mean": [(0, 0.5), (1, float(np.float32(0.1)))],
        "train/policy_loss": [(0, 2.0)],
        "eval/accuracy": [(0, 0.25)],
        "rollout/n": [(1, 3.0)],
        "rollout/ok": [(1, 1.0)],
    }


def test_non_finite_values_are_null_in_the_file_and_nan_when_read(tmp_path, make_logger, jsonl_rows):
    logger = make_logger()
    logger.log(0, {"train/policy_loss": float("nan"), "train/grad_norm": float("inf"), "rollout/kl": 0.5})
    logger.close(plot=False)
    assert jsonl_rows(tmp_path) == [{"step": 0, "train/policy_loss": None, "train/grad_norm": None, "rollout/kl": 0.5}]
    series = read_metrics(tmp_path)
    assert math.isnan(series["train/policy_loss"][0][1]) and math.isnan(series["train/grad_norm"][0][1])
    assert series["rollout/kl"] == [(0, 0.5)]


def test_resumed_logger_supersedes_the_retrained_steps_and_keeps_them_aside(tmp_path, make_logger, jsonl_rows):
    first = make_logger(total_steps=6)
    for step in range(5):
        first.log(step, {"rollout/reward_mean": float(step)})
    first.log(4, {"eval/accuracy": 0.75})
    first.close(plot=False)
    # The run stopped after a checkpoint at step 2 and resumes at step 3: steps 3 and 4 are trained again.
    second = make_logger(total_steps=6, start_step=3)
    for step in range(3, 6):
        second.log(step, {"rollout/reward_mean": 10.0 * step})
    second.close(plot=False)

    # every step once: the stopped attempt's steps 3 and 4 were trained again
    rows = jsonl_rows(tmp_path)
    assert rows == ([{"step": s, "rollout/reward_mean": float(s)} for s in range(3)]
                    + [{"step": s, "rollout/reward_mean": 10.0 * s} for s in range(3, 6)])
    # and nothing written is lost: the superseded rows are kept in order beside it
    superseded = [json.loads(line) for line in (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()]
    assert superseded == [{"step": 3, "rollout/reward_mean": 3.0}, {"step": 4, "rollout/reward_mean": 4.0},
                          {"step": 4, "eval/accuracy": 0.75}]
    assert read_metrics(tmp_path) == {
        "rollout/reward_mean": [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)],
    }


def test_an_unfinished_last_line_is_skipped_then_cut_before_appending(tmp_path, make_logger, jsonl_rows):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 0, "rollout/kl": 0.1}\n{"step": 1, "rollout/kl": 0.2}\n{"step": 2, "rollout/k',
                    encoding="utf-8")
    assert read_metrics(tmp_path) == {"rollout/kl": [(0, 0.1), (1, 0.2)]}
    stream = io.StringIO()
    logger = make_logger(start_step=2, stream=stream)
    logger.log(2, {"rollout/kl": 0.3})
    logger.close(plot=False)
    assert jsonl_rows(tmp_path) == [{"step": 0, "rollout/kl": 0.1}, {"step": 1, "rollout/kl": 0.2},
                                    {"step": 2, "rollout/kl": 0.3}]
    assert "dropped an unfinished last line" in stream.getvalue()


@pytest.mark.parametrize("bad_line, message", [
    ('{"step": "x", "rollout/kl": 1}', "'step' must be an integer"),
    ('{"rollout/kl": 1}', "'step' must be an integer"),
    ('{"step": 1, "rollout/kl": "high"}', "metric 'rollout/kl' must be a number or null"),
    ('[1, 2]', "expected a JSON object"),
    ('{"step": 1,', "not a JSON object"),
])
def test_a_bad_row_is_an_error_that_names_file_and_line(tmp_path, bad_line, message):
    (tmp_path / METRICS_FILE).write_text(f'{{"step": 0, "rollout/kl": 0.1}}\n{bad_line}\n{{"step": 2}}\n')
    with pytest.raises(ValueError, match=f"metrics.jsonl:2: {message}"):
        read_metrics(tmp_path)


def test_reading_a_run_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path)


def test_bad_input_errors_name_the_metric_or_field(make_logger):
    logger = make_logger()
    with pytest.raises(TypeError, match="'rollout/reward_mean' must be a real number"):
        logger.log(0, {"rollout/reward_mean": "high"})
    with pytest.raises(TypeError, match="'train/loss' must be a real scalar"):
        logger.log(0, {"train/loss": torch.ones(2)})
    with pytest.raises(ValueError, match="'step' is reserved"):
        logger.log(0, {"step": 1.0})
    with pytest.raises(TypeError, match="step must be an int"):
        logger.log(1.5, {"rollout/kl": 0.1})
    logger.close(plot=False)
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(1, {"rollout/kl": 0.1})
    for field, value in (("logging_steps", 0), ("start_step", -1), ("total_steps", -5)):
        with pytest.raises(ValueError, match=field):
            make_logger(**{field: value})


def test_disabled_logger_opens_no_file_and_prints_nothing(tmp_path, fake_terminal):
    run_dir = tmp_path / "run"
    stream = fake_terminal()
    logger = MetricsLogger(run_dir, enabled=False, use_tensorboard=True, progress_bar=True, total_steps=3,
                           stream=stream)
    for step in range(3):
        logger.log(step, {"rollout/reward_mean": 1.0, "rollout/kl": 0.1})
    assert logger.close(plot=True) is None
    assert not run_dir.exists()
    assert stream.getvalue() == ""


_NAMES = st.sampled_from(["rollout/reward_mean", "rollout/kl", "train/policy_loss", "eval/accuracy"])
_LOG_CALL = st.tuples(st.integers(0, 12), st.dictionaries(_NAMES, st.floats(allow_nan=False, allow_infinity=False),
                                                          max_size=4))


@settings(max_examples=40, deadline=None)
@given(sessions=st.lists(st.lists(_LOG_CALL, max_size=8), min_size=1, max_size=4))
def test_read_metrics_equals_last_value_per_metric_and_step(sessions):
    """Any sequence of restarts and log calls reads back as the last value logged for each (metric, step), where a
    restart at step s first supersedes what earlier attempts logged at steps >= s."""
    with tempfile.TemporaryDirectory() as run_dir:
        expected: dict[str, dict[int, float]] = {}
        for calls in sessions:
            start = min((step for step, _ in calls), default=0)
            if start > 0:
                expected = {name: {s: v for s, v in points.items() if s < start} for name, points in expected.items()}
                expected = {name: points for name, points in expected.items() if points}
            logger = MetricsLogger(run_dir, enabled=True, use_tensorboard=False, progress_bar=False,
                                   total_steps=None, start_step=start, stream=io.StringIO())
            for step, metrics in calls:
                logger.log(step, metrics)
                for name, value in metrics.items():
                    expected.setdefault(name, {})[step] = value
            logger.close(plot=False)
        assert read_metrics(run_dir) == {name: sorted(points.items()) for name, points in expected.items()}
