"""curves.png: a valid, non-blank PNG with one panel per curve family that was logged."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from hpc_rlhf.metrics import CURVES_FILE, curve_panels, plot_curves

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


def test_close_writes_a_png_with_reward_and_kl_panels(tmp_path, make_logger):
    logger = make_logger(total_steps=20)
    for step in range(20):
        logger.log(step, {"rollout/reward_mean": math.sin(step / 3), "rollout/kl": 0.001 * step})
        if step % 5 == 0:
            logger.log(step, {"accuracy": step / 20}, prefix="eval")
    path = logger.close(plot=True)
    assert path == tmp_path / CURVES_FILE
    pixels = _image(path)
    assert pixels.shape == (400, 1200, 3)  # two panels of 600 x 400
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
    # Lines are drawn in both halves, not only axes and text.
    assert _line_pixels(pixels[:, :600]) > 200 and _line_pixels(pixels[:, 600:]) > 200


def test_panels_for_missing_metrics_are_skipped(tmp_path, make_logger):
    logger = make_logger()
    for step in range(5):
        logger.log(step, {"train/kl": 0.5 * step, "train/policy_loss": 1.0})
    path = logger.close(plot=True)
    assert _image(path).shape == (400, 600, 3)
    assert curve_panels({"train/kl": [(0, 0.5)], "train/policy_loss": [(0, 1.0)]}) == [("KL", ["train/kl"])]
    assert curve_panels({"eval/accuracy": [(3, 0.5)], "rollout/reward_mean": [(0, 1.0)], "rollout/kl": []}) == [
        ("reward", ["rollout/reward_mean", "eval/accuracy"])]


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
