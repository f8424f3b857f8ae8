"""Time-to-accuracy arithmetic: eval points from metrics rows, seconds to a threshold, interpolation, accuracy by
iteration, the speed of a span of iterations, and tools/bench_accuracy.py's report of hand-made results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpc_rlhf.benchmarks.accuracy import (
    CurvePoint,
    accuracy_at,
    curve_from_json,
    curve_from_metrics,
    curve_to_json,
    interpolate_accuracy,
    phase_means,
    phase_speed,
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
    # the peer stopped at 18 s short of 0.8: its whole training time bounds the ratio
    bounded = "accuracy 0.8: hpc_rlhf in 9 s, trl not within its 18 s (more than 2.00x {})"
    assert ratio_line(ours, peer, "0.8") == bounded.format("faster")
    assert ratio_line(peer, ours, "0.8") == bounded.format("slower")  # the same words from the other side
    short = summarize("trl", [CurvePoint(0, 0.0, 0.05), CurvePoint(1, 4.0, 0.1)], [4.0])
    assert ratio_line(ours, short, "0.8") == "accuracy 0.8: hpc_rlhf in 9 s, trl not within its 4 s"
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


def test_accuracy_at_iterations():
    curve = curve_from_metrics(ROWS)
    assert accuracy_at(curve, [0, 1, 2, 4, 6]) == [0.05, None, 0.40, 0.85, None]


def test_phase_speed_by_hand():
    seconds, tokens = [9.0, 2.0, 4.0, 3.0, 1.0], [900.0, 200.0, 600.0, 300.0, 50.0]
    speed = phase_speed(seconds, tokens, 10, 1, 4)
    # iterations 1-3: median of 2, 4, 3 is 3; 1100 tokens over 30 samples; 1100 tokens in 9 s
    assert (speed.first, speed.last, speed.median_iteration_s) == (1, 4, 3.0)
    assert speed.completion_length == pytest.approx(1100 / 30)
    assert speed.completion_tokens_per_s == pytest.approx(1100 / 9)
    assert phase_speed(seconds, tokens, 10, 3, 99).last == 5  # cut to the run's iterations
    with pytest.raises(ValueError, match=r"no iterations in \[5, 5\)"):
        phase_speed(seconds, tokens, 10, 5, 9)


def hpc_result(name: str, curve: list[tuple[int, float, float]], seconds: list[float], lengths: list[float]) -> dict:
    """An hpc_rlhf result as bench_accuracy writes it, 4 samples per iteration generated at 100 tokens/s."""
    rows = [{"step": i, "time/iteration_s": s, "throughput/generate_tokens_per_s": 100.0,
             "time/generate_engine_s": 4 * length / 100.0} for i, (s, length) in enumerate(zip(seconds, lengths))]
    return {"system": "hpc_rlhf", "name": name, "iteration_s": seconds, "iterations": rows,
            "curve": [{"iteration": i, "train_s": t, "accuracy": a} for i, t, a in curve],
            "config": "configs/smollm2_grpo_1gpu.yaml",
            "overrides": ["--rollout.batch_size=2", "--rollout.n_samples_per_prompt=2", "--train.train_batch_size=4",
                          "--train.micro_train_batch_size=2"]}


def test_report_pairs_runs_by_label_and_shows_speed(tmp_path):
    # 16 iterations: 5 s of warm-up, 8 of 2 s with 60-token answers, 7 of 1 s with 10-token answers
    seconds, lengths = [5.0] + [2.0] * 8 + [1.0] * 7, [60.0] * 9 + [10.0] * 7
    hpc = hpc_result("hpc_rlhf", [(0, 0.0, 0.1), (3, 6.0, 0.5), (6, 8.0, 0.8)], seconds, lengths)
    other_task = hpc_result("hpc_rlhf_other", [(0, 0.0, 0.0), (3, 6.0, 0.0)], seconds[:4], lengths[:4])
    trl = {**hpc, "system": "trl", "name": "trl", "iteration_s": [9.0] + [6.0] * 8 + [3.0] * 6,
           "curve": [{"iteration": 0, "train_s": 0.0, "accuracy": 0.1}, {"iteration": 3, "train_s": 21.0,
                                                                          "accuracy": 0.6}],
           "trl_logs": [{"completions/mean_length": length} for length in lengths[:15]] + [{"train_runtime": 1.0}]}
    del trl["iterations"]
    for result in (hpc, other_task, trl):
        (tmp_path / f"{result['name']}.json").write_text(json.dumps(result))
    tool = Path(__file__).resolve().parents[2] / "tools" / "bench_accuracy.py"
    done = subprocess.run([sys.executable, str(tool), "report", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    # only the run of the peer's label is compared with it
    assert "accuracy 0.5: hpc_rlhf 6 s, trl 21 s (3.50x faster)" in text
    assert "accuracy 0.8: hpc_rlhf in 8 s, trl not within its 21 s (more than 2.62x faster)" in text
    assert "hpc_rlhf_other 0" not in text and "hpc_rlhf_other in" not in text
    assert "| hpc_rlhf | 0.10 | 0.50 | 0.80 |" in text and "| trl | 0.10 | 0.60 | - |" in text
    # iterations 1-12: 8 x 2 s + 4 x 1 s = 20 s; (8 x 60 + 4 x 10) x 4 samples = 2080 tokens, 43.3 a sample
    assert "| hpc_rlhf | 1-12 | 2.00 | 43.3 | 104 |" in text
    assert "| trl | 1-12 | 6.00 | 43.3 | 35 |" in text  # the same tokens in 8 x 6 s + 4 x 3 s = 60 s
    # the last 10 iterations both ran (trl ran 15): 5-14, 4 of 60 tokens and 6 of 10: 1200 tokens, 30 a sample
    assert "| hpc_rlhf | 5-14 | 1.00 | 30.0 | 86 |" in text  # in 4 x 2 s + 6 x 1 s = 14 s
    assert "| trl | 5-14 | 3.00 | 30.0 | 29 |" in text  # in 4 x 6 s + 6 x 3 s = 42 s
    assert "| hpc_rlhf_other | 1-3 | 2.00 | 60.0 | 120 |" in text  # too short for two spans: one row
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_phase_means_per_block_of_iterations():
    rows = [
        {"step": 0, "time/iteration_s": 3.0, "time/eval_s": 1.0, "time/generate_s": 1.2, "time/actor_update_s": 0.6,
         "rollout/response_length": 60.0},
        {"step": 1, "time/iteration_s": 1.0, "time/generate_s": 0.6, "time/actor_update_s": 0.3,
         "rollout/response_length": 40.0},
        {"step": 2, "time/iteration_s": 0.5, "time/generate_s": 0.2, "time/actor_update_s": 0.2},
        {"step": 3, "time/eval_s": 0.4, "eval/accuracy": 0.5},  # the final evaluation alone
    ]
    blocks = phase_means(rows, span=2)
    assert [first for first, _ in blocks] == [0, 2]
    first, second = blocks[0][1], blocks[1][1]
    assert first["iteration"] == pytest.approx(1.5)  # (3 - 1 + 1) / 2: the evaluation is not training
    assert first["generate"] == pytest.approx(0.9) and first["update"] == pytest.approx(0.45)
    assert first["response_len"] == pytest.approx(50.0)
    assert second == pytest.approx({"iteration": 0.5, "generate": 0.2, "update": 0.2})  # no length logged there
