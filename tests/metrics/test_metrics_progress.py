"""Progress output: the text line format, which steps print one, the bar on a TTY and no bar without one."""

from __future__ import annotations

import io

from hpc_rlhf.metrics import BAR_KEYS, LINE_KEYS, format_metrics_line


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


def test_without_a_tty_there_is_no_bar_and_a_line_every_logging_steps(make_logger):
    stream = io.StringIO()
    logger = make_logger(total_steps=8, logging_steps=3, stream=stream)
    for step in range(8):
        logger.log(step, {"rollout/reward_mean": step / 10, "rollout/kl": step / 1000})
    logger.close(plot=False)
    # Steps 0, 3 and 6 by the interval, step 7 because it is the last.
    assert stream.getvalue() == "".join(
        f"iter {step}/8 | reward {step / 10:.4g} | kl {step / 1000:.4g}\n" for step in (0, 3, 6, 7))


def test_on_a_tty_the_bar_resumes_at_start_step_and_shows_key_metrics(make_logger, fake_terminal):
    stream = fake_terminal()
    logger = make_logger(total_steps=4, start_step=1, stream=stream)
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
        assert f"iter {step}/4 | reward {step / 10:.4g} | kl 0.001 | loss 0.5" in lines
    assert "iter 4/4 | eval_acc 0.75" in lines


def test_progress_bar_off_keeps_the_text_lines(make_logger, fake_terminal):
    stream = fake_terminal()
    logger = make_logger(total_steps=2, progress_bar=False, stream=stream)
    logger.log(0, {"rollout/reward_mean": 0.25})
    logger.log(1, {"rollout/reward_mean": 0.5})
    logger.close(plot=False)
    assert stream.getvalue() == "iter 0/2 | reward 0.25\niter 1/2 | reward 0.5\n"
