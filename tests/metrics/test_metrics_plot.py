"""curves.png: a valid, non-blank PNG with one panel per curve family that was logged."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from hpc_rlhf.run.metrics import CURVES_FILE, curve_panels, curves_figure, plot_curves, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIRST_LINE_COLOUR = np.array([31, 119, 180])  # matplotlib's default first line colour, #1f77b4


def _image(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB")).astype(int)


def _line_pixels(pixels: np.ndarray) -> int:
    return int((np.abs(pixels - FIRST_LINE_COLOUR).sum(axis=-1) < 30).sum())


def test_close_writes_a_png_with_reward_accuracy_and_kl_panels(tmp_path, make_logger):
    logger = make_logger(total_steps=20)
    for step in range(20):
        logger.log(step, {"rollout/reward_mean": math.sin(step / 3), "rollout/kl": 0.001 * step})
        if step % 5 == 0:
            logger.log(step, {"accuracy": step / 20}, prefix="eval")
    path = logger.close(plot=True)
    assert path == tmp_path / CURVES_FILE
    pixels = _image(path)
    assert pixels.shape == (800, 1200, 3)  # three panels of 600 x 400, two a row
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    # Lines are drawn in the three used cells, not only axes and text; the fourth cell stays blank.
    for rows, columns in ((slice(0, 400), slice(0, 600)), (slice(0, 400), slice(600, None)),
                          (slice(400, None), slice(0, 600))):
        assert _line_pixels(pixels[rows, columns]) > 100
    assert _line_pixels(pixels[400:, 600:]) == 0


def test_panels_for_missing_metrics_are_skipped(tmp_path, make_logger):
    logger = make_logger()
    for step in range(5):
        logger.log(step, {"train/kl": 0.5 * step, "train/policy_loss": 1.0})
    path = logger.close(plot=True)
    assert _image(path).shape == (400, 600, 3)
    assert curve_panels({"train/kl": [(0, 0.5)], "train/policy_loss": [(0, 1.0)]}) == [
        ("KL", ["train/kl"], "KL (nats / token)")]
    assert curve_panels({"eval/accuracy": [(3, 0.5)], "rollout/reward_mean": [(0, 1.0)], "rollout/kl": []}) == [
        ("reward", ["rollout/reward_mean"], "mean reward"), ("accuracy", ["eval/accuracy"], "score / accuracy")]
    # Panels given as (title, names) pairs (the supervised trainers') take the title as their y label.
    assert curve_panels({"train/loss": [(0, 2.0)]}, [("loss", ("train/loss", "eval/loss"))]) == [
        ("loss", ["train/loss"], "loss")]


def test_constant_zero_series_are_left_out():
    """GRPO without a KL penalty logs rollout/kl = 0 every iteration: no flat-zero line, the policy's approx_kl
    instead; an all-zero panel is dropped rather than drawn empty."""
    steps = range(6)
    series = {"rollout/reward_mean": [(s, 0.3 + s / 100) for s in steps], "rollout/kl": [(s, 0.0) for s in steps],
              "train/approx_kl": [(s, 0.01 * (s + 1)) for s in steps], "rollout/score_mean": [(s, 0.0) for s in steps],
              "eval/accuracy": [(0, 0.2), (5, math.nan)], "rollout/response_length": [(s, 2.5) for s in steps]}
    assert curve_panels(series) == [
        ("reward", ["rollout/reward_mean"], "mean reward"),
        ("accuracy", ["eval/accuracy"], "score / accuracy"),
        ("KL", ["train/approx_kl"], "KL (nats / token)"),
        ("response length", ["rollout/response_length"], "tokens"),
    ]
    assert curve_panels({"rollout/kl": [(0, 0.0), (1, 0.0)], "train/kl": [(0, math.nan)]}) == []


def test_figure_axes_have_titles_y_labels_and_only_informative_lines(tmp_path, make_logger):
    """The default tiny_cpu run's metrics (KL penalty off): every drawn axis has a y label and at least one line,
    and no line is constant zero."""
    logger = make_logger(total_steps=6)
    for step in range(6):
        logger.log(step, {"rollout/reward_mean": 0.3 + step / 50, "rollout/score_mean": 0.2 + step / 60,
                          "rollout/kl": 0.0, "rollout/kl_coef": 0.0, "train/approx_kl": 0.01 + step / 1000,
                          "rollout/response_length": 2.5 + step / 10, "train/policy_loss": 0.01})
        if step % 5 == 0:
            logger.log(step, {"reward_mean": 0.3, "accuracy": 0.25}, prefix="eval")
    logger.close(plot=False)
    series = read_metrics(tmp_path)
    chosen = curve_panels(series)
    figure = curves_figure(series, chosen, "run")
    drawn = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in drawn] == ["reward", "accuracy", "KL", "response length"]
    assert [ax.get_ylabel() for ax in drawn] == ["mean reward", "score / accuracy", "KL (nats / token)", "tokens"]
    lines = {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in drawn}
    assert lines == {"reward": ["rollout/reward_mean", "eval/reward_mean"],
                     "accuracy": ["rollout/score_mean", "eval/accuracy"],
                     "KL": ["train/approx_kl"], "response length": ["rollout/response_length"]}
    for ax in drawn:
        assert ax.get_xlabel() == "iteration"
        for line in ax.get_lines():
            assert np.any(np.asarray(line.get_ydata(), dtype=float) != 0)
    eval_line = next(line for line in drawn[1].get_lines() if line.get_label() == "eval/accuracy")
    assert list(eval_line.get_xdata()) == [0, 5] and list(eval_line.get_ydata()) == [0.25, 0.25]


def test_no_png_without_reward_or_kl_or_when_not_asked(tmp_path, make_logger):
    stream = io.StringIO()
    logger = make_logger(stream=stream)
    logger.log(0, {"train/policy_loss": 1.0})
    assert logger.close(plot=True) is None
    assert not (tmp_path / CURVES_FILE).exists()
    assert "curves.png not written" in stream.getvalue()

    logger = make_logger()
    logger.log(1, {"rollout/reward_mean": 1.0})
    assert logger.close(plot=False) is None
    assert not (tmp_path / CURVES_FILE).exists()
    assert plot_curves(tmp_path / "no-such-run") is None


@pytest.mark.parametrize("points", [1, 200])
def test_plot_curves_writes_to_a_chosen_path(tmp_path, make_logger, points):
    logger = make_logger(total_steps=points)
    for step in range(points):
        logger.log(step, {"rollout/reward_mean": float(step % 7)})
    logger.close(plot=False)
    out = plot_curves(tmp_path, out_path=tmp_path / "reward.png")
    assert out == tmp_path / "reward.png"
    assert _line_pixels(_image(out)) > 10
    assert not list(tmp_path.glob("*.partial"))
