"""Per-rank step metrics (hpc_rlhf/run/rank_metrics.py): phase timing with `timed`, how a rank's reports add up, and how
rank 0 merges every rank's metrics by key family into the logged row."""

from __future__ import annotations

import time

import pytest

from hpc_rlhf.run.rank_metrics import KEY_FAMILIES, accumulate, family_of, is_phase_time, mean_metrics, merge_metrics, timed


def test_timed_adds_the_block_time_under_the_phase_key():
    metrics: dict[str, float] = {}
    with timed(metrics, "wait_data"):
        time.sleep(0.02)
    with timed(metrics, "wait_data"):  # a phase that runs twice in a step adds up
        time.sleep(0.02)
    with timed(metrics, "step", prefix="time/"):
        pass
    assert set(metrics) == {"max/wait_data_s", "time/step_s"}
    assert 0.04 <= metrics["max/wait_data_s"] < 5 and metrics["time/step_s"] >= 0


def test_timed_records_the_time_of_a_failing_block():
    metrics: dict[str, float] = {}
    with pytest.raises(RuntimeError), timed(metrics, "actor_update"):
        raise RuntimeError("boom")
    assert "max/actor_update_s" in metrics


def test_every_name_has_one_family_and_the_table_is_documented():
    assert [f.prefix for f in KEY_FAMILIES][-1] == ""  # the catch-all comes last
    assert family_of("sum/train_tokens").prefix == "sum/" and family_of("max/train_s").prefix == "max/"
    assert family_of("train/loss").prefix == "" and is_phase_time("max/eval_s") and not is_phase_time("eval/x")


def test_a_rank_adds_counts_and_times_and_keeps_the_last_value_of_the_rest():
    metrics = {"sum/generate_tokens": 10.0, "max/shard_read_s": 1.0, "rollout/kl": 0.5}
    accumulate(metrics, {"sum/generate_tokens": 5.0, "max/shard_read_s": 0.25, "rollout/kl": 0.1, "train/loss": 2.0})
    assert metrics == {"sum/generate_tokens": 15.0, "max/shard_read_s": 1.25, "rollout/kl": 0.1, "train/loss": 2.0}


def test_merge_sums_counts_takes_the_slowest_rank_and_averages_the_rest():
    merged = merge_metrics([
        {"train/loss": 1.0, "sum/generate_tokens": 100.0, "sum/generate_samples": 4.0, "max/generate_engine_s": 2.0,
         "max/iteration_s": 5.0},
        {"train/loss": 3.0, "sum/generate_tokens": 300.0, "sum/generate_samples": 4.0, "max/generate_engine_s": 4.0,
         "max/iteration_s": 3.0, "critic/value_loss": 0.5},
    ])
    assert merged == {
        "train/loss": 2.0, "critic/value_loss": 0.5,  # averaged over the ranks that report it
        "time/generate_engine_s": 4.0, "time/iteration_s": 5.0,  # the slowest rank
        "throughput/generate_tokens_per_s": 100.0,  # 400 tokens over all ranks / 4 s of the slowest
        "count/generate_samples": 8.0,  # sample counts are logged; other sums only through what they give
    }
    assert list(merged)[:2] == ["train/loss", "critic/value_loss"]  # averaged first, then times, then derived


def test_merge_derives_eval_means_only_when_something_was_evaluated():
    assert "eval/accuracy" not in merge_metrics([{"sum/eval_count": 0.0, "sum/eval_score": 0.0,
                                                  "sum/eval_reward": 0.0}])
    merged = merge_metrics([{"sum/eval_count": 4.0, "sum/eval_score": 3.0, "sum/eval_reward": 2.0},
                            {"sum/eval_count": 0.0, "sum/eval_score": 0.0, "sum/eval_reward": 0.0}])
    assert merged == {"eval/reward_mean": 0.5, "eval/accuracy": 0.75}


def test_a_rate_needs_its_time():
    merged = merge_metrics([{"sum/train_tokens": 10.0, "max/actor_update_s": 0.0}])
    assert "throughput/train_tokens_per_s" not in merged and merged["time/actor_update_s"] == 0.0


def test_mean_metrics_prefixes_bare_names():
    steps = [{"loss": 1.0, "train/kl_loss": 0.5}, {"loss": 3.0, "train/kl_loss": 1.5}]
    assert mean_metrics(steps, prefix="critic/") == {"critic/loss": 2.0, "train/kl_loss": 1.0}
    assert mean_metrics([], prefix="train/") == {}
