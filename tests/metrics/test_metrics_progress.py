"""Progress output: the text line format (with elapsed time and ETA), which steps print one, the bar on a TTY and no
bar without one."""

from __future__ import annotations

import io

import pytest

from hpc_rlhf.run.metrics import BAR_KEYS, LINE_KEYS, eta_seconds, format_duration, format_metrics_line


class Clock:
    """A clock the test sets by hand: `now` seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_format_metrics_line_shows_the_first_present_name_of_each_label():
    metrics = {"rollout/reward_mean": 0.41, "rollout/kl": 0.002, "train/kl": 9.0, "train/policy_loss": -0.0123456,
               "time/generate_s": 3.0, "throughput/generate_tokens_per_s": 12345.6}
    assert format_metrics_line(12, 60, metrics, LINE_KEYS) == (
        "iter 12/60 | reward 0.41 | kl 0.002 | loss -0.01235 | gen_tok/s 1.235e+04")
    assert format_metrics_line(3, None, {"train/kl": 0.5, "eval/accuracy": 1}, LINE_KEYS) == (
        "iter 3 | kl 0.5 | eval_acc 1")
    assert format_metrics_line(0, 5, {}, BAR_KEYS) == "iter 0/5"
    assert format_metrics_line(7, 9, {"b": 2.0, "a": 1.0}, [("A", ["a"]), ("B", ["missing", "b"])]) == (
        "iter 7/9 | A 1 | B 2")


def test_the_line_shows_the_score_and_leaves_out_a_switched_off_kl():
    """GRPO without a KL penalty logs rollout/kl = 0: `kl 0` says nothing; the reward function's 0/1 score (accuracy
    on the arithmetic task) follows the reward."""
    metrics = {"rollout/reward_mean": 0.3, "rollout/score_mean": 0.25, "rollout/kl": 0.0, "train/policy_loss": 0.5}
    assert format_metrics_line(4, 80, metrics, LINE_KEYS) == "iter 4/80 | reward 0.3 | score 0.25 | loss 0.5"
    assert format_metrics_line(4, 80, {"rollout/kl": 0.01}, LINE_KEYS) == "iter 4/80 | kl 0.01"


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (41.6, "42s"), (60, "1m00s"), (185, "3m05s"),
                                           (3725, "1h02m"), (-3, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_eta_is_the_pace_of_this_run_times_what_is_left():
    assert eta_seconds(done=4, start=0, total=80, elapsed_s=10.0) == 10.0 / 4 * 76  # 190 s
    assert eta_seconds(done=30, start=20, total=80, elapsed_s=5.0) == 5.0 / 10 * 50  # a resumed run: its own pace
    assert eta_seconds(done=80, start=0, total=80, elapsed_s=9.0) == 0.0
    assert eta_seconds(done=0, start=0, total=80, elapsed_s=1.0) is None
    assert eta_seconds(done=5, start=0, total=None, elapsed_s=1.0) is None
    line = format_metrics_line(3, 80, {"rollout/reward_mean": 0.5}, LINE_KEYS, elapsed_s=10.0, eta_s=190.0)
    assert line == "iter 3/80 | reward 0.5 | 10s elapsed | ETA 3m10s"


def test_without_a_tty_there_is_no_bar_and_a_line_every_logging_steps(make_logger):
    stream = io.StringIO()
    clock = Clock()
    logger = make_logger(total_steps=8, logging_steps=3, stream=stream, clock=clock)
    for step in range(8):
        clock.now = 5.0 * (step + 1)  # 5 s an iteration: after step s, (s + 1) iterations took 5 (s + 1) s
        logger.log(step, {"rollout/reward_mean": step / 10, "rollout/kl": (step + 1) / 1000})
    logger.close(plot=False)
    # Steps 0, 3 and 6 by the interval, step 7 because it is the last; ETA = 5 s x iterations left.
    expected = {0: "5s elapsed | ETA 35s", 3: "20s elapsed | ETA 20s", 6: "35s elapsed | ETA 5s",
                7: "40s elapsed | ETA 0s"}
    assert stream.getvalue() == "".join(
        f"iter {step}/8 | reward {step / 10:.4g} | kl {(step + 1) / 1000:.4g} | {expected[step]}\n"
        for step in (0, 3, 6, 7))


def test_on_a_tty_the_bar_resumes_at_start_step_and_shows_key_metrics(make_logger, fake_terminal):
    stream = fake_terminal()
    logger = make_logger(total_steps=4, start_step=1, stream=stream, clock=Clock())
    for step in range(1, 4):
        logger.log(step, {"rollout/reward_mean": step / 10, "rollout/kl": 0.001, "train/policy_loss": 0.5})
    logger.log(4, {"eval/accuracy": 0.75})  # the final evaluation, after the last iteration
    logger.close(plot=False)
    output = stream.getvalue()
    assert "1/4 [" in output  # the bar starts where the resumed run starts
    assert "reward=0.3, kl=0.001, loss=0.5" in output
    assert "4/4 [" in output and "5/4" not in output
    lines = [line.split("\r")[-1] for line in output.split("\n")]
    for step in range(1, 4):
        assert f"iter {step}/4 | reward {step / 10:.4g} | kl 0.001 | loss 0.5 | 0s elapsed | ETA 0s" in lines
    assert "iter 4/4 | eval_acc 0.75 | 0s elapsed | ETA 0s" in lines


def test_progress_bar_off_keeps_the_text_lines(make_logger, fake_terminal):
    stream = fake_terminal()
    clock = Clock()
    logger = make_logger(total_steps=2, progress_bar=False, stream=stream, clock=clock)
    clock.now = 65.0
    logger.log(0, {"rollout/reward_mean": 0.25})
    clock.now = 130.0
    logger.log(1, {"rollout/reward_mean": 0.5})
    logger.close(plot=False)
    assert stream.getvalue() == ("iter 0/2 | reward 0.25 | 1m05s elapsed | ETA 1m05s\n"
                                 "iter 1/2 | reward 0.5 | 2m10s elapsed | ETA 0s\n")
