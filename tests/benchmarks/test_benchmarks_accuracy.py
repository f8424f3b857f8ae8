"""Time-to-accuracy arithmetic: eval points from metrics rows, seconds to a threshold, interpolation, the report."""

from __future__ import annotations

import json

import pytest

from hpc_rlhf.benchmarks.accuracy import (
    CurvePoint,
    curve_from_json,
    curve_from_metrics,
    curve_to_json,
    interpolate_accuracy,
    plot_curves,
    ratio_line,
    read_metrics,
    seconds_to_reach,
    summarize,
)

# Four iterations evaluated every 2 (at the start of ticks 0 and 2) plus the final evaluation row (step 4).
ROWS = [
    {"step": 0, "time/iteration_s": 3.0, "time/eval_s": 1.0, "eval/accuracy": 0.05},
    {"step": 1, "time/iteration_s": 2.5},
    {"step": 2, "time/iteration_s": 4.0, "time/eval_s": 1.5, "eval/accuracy": 0.40},
    {"step": 3, "time/iteration_s": 2.0},
    {"step": 4, "eval/accuracy": 0.85},
]


def test_curve_takes_eval_seconds_off_the_clock():
    curve = curve_from_metrics(ROWS)
    # before step 2: (3.0 - 1.0) + 2.5 = 4.5 s; before step 4: 4.5 + (4.0 - 1.5) + 2.0 = 9.0 s
    assert curve == [CurvePoint(0, 0.0, 0.05), CurvePoint(2, 4.5, 0.40), CurvePoint(4, 9.0, 0.85)]


def test_rows_order_does_not_matter():
    assert curve_from_metrics(list(reversed(ROWS))) == curve_from_metrics(ROWS)


def test_seconds_to_reach_and_interpolation():
    curve = curve_from_metrics(ROWS)
    assert seconds_to_reach(curve, 0.05) == 0.0
    assert seconds_to_reach(curve, 0.4) == 4.5
    assert seconds_to_reach(curve, 0.5) == 9.0  # first eval point at or above 0.5
    assert seconds_to_reach(curve, 0.9) is None
    # halfway between (4.5, 0.40) and (9.0, 0.85)
    assert interpolate_accuracy(curve, 6.75) == pytest.approx(0.625)
    assert interpolate_accuracy(curve, 10.0) is None


def test_summary_and_ratio_words():
    ours = summarize("hpc_rlhf", curve_from_metrics(ROWS), [2.0, 2.5, 2.5, 2.0])
    assert ours.seconds_to == {"0.5": 9.0, "0.8": 9.0}
    assert ours.median_iteration_s == 2.5
    assert (ours.start_accuracy, ours.final_accuracy, ours.best_accuracy) == (0.05, 0.85, 0.85)
    peer = summarize("trl", [CurvePoint(0, 0.0, 0.05), CurvePoint(5, 18.0, 0.6)], [3.6] * 5)
    assert ratio_line(ours, peer, "0.5") == "accuracy 0.5: hpc_rlhf 9 s, trl 18 s (2.00x faster)"
    assert ratio_line(ours, peer, "0.8") == "accuracy 0.8: hpc_rlhf in 9 s, trl did not reach it"
    with pytest.raises(ValueError, match="no eval points"):
        summarize("empty", [], [])


def test_read_metrics_keeps_the_last_row_of_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "time/iteration_s": 9.0}, {"step": 1, "time/iteration_s": 1.0},
        {"step": 1, "time/iteration_s": 2.0}]) + "\n\n")
    assert read_metrics(path) == [{"step": 0, "time/iteration_s": 9.0}, {"step": 1, "time/iteration_s": 2.0}]
    path.write_text('{"step": 0}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(path)


def test_json_round_trip_and_plot(tmp_path):
    curve = curve_from_metrics(ROWS)
    assert curve_from_json(json.loads(json.dumps(curve_to_json(curve)))) == curve
    png = plot_curves({"a": curve}, tmp_path / "c.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
