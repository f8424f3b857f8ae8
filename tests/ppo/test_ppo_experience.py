"""Rollout rows -> training tensors, advantages and merged metrics of the PPO loop, against hand-derived values."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hpc_rlhf.config.loading import load_config
from hpc_rlhf.run.rank_metrics import merge_metrics
from hpc_rlhf.rollouts import to_rollout_table
from hpc_rlhf.trainers.ppo import experience as exp
from hpc_rlhf.trainers.ppo.update import actor_loss_fn, loss_weighting, optimizer_batches
from hpc_rlhf.training.batching import MicroBatch
from hpc_rlhf.training.forwards import ForwardOutput


def rows(rewards, scores, lengths, n):
    out = []
    for k, (reward, score, length) in enumerate(zip(rewards, scores, lengths)):
        out.append({"prompt_ids": [1, 5, 6], "response_ids": list(range(10, 10 + length)),
                    "behaviour_log_probs": [-0.5] * length, "action_mask": [1] * length, "reward": reward,
                    "score": score, "label": "x", "prompt_id": k // n, "group_id": k // n,
                    "sample_index": k % n, "weight_version": 3})
    return out


def test_table_to_tensors_pads_and_keeps_values():
    table = to_rollout_table(rows([1.0, 0.0, 0.5], [1.0, 0.0, 1.0], [2, 4, 1], n=3))
    t = exp.table_to_tensors(table)
    assert t.num_samples == 3 and t.action_mask.shape == (3, 4)
    assert t.action_mask.sum(1).tolist() == [2, 4, 1]
    assert t.behaviour_log_probs[0].tolist() == [-0.5, -0.5, 0.0, 0.0]
    assert t.rewards.tolist() == [1.0, 0.0, 0.5] and t.reference_log_probs is None and t.values is None
    assert t.response_ids[1].tolist() == [10, 11, 12, 13] and t.weight_versions.tolist() == [3, 3, 3]


def test_group_norm_advantages_by_hand():
    cfg = load_config(None, ["--rollout.n_samples_per_prompt=2", "--train.train_batch_size=16"]).config
    t = exp.table_to_tensors(to_rollout_table(rows([1.0, 0.0, 3.0, 3.0], [1, 0, 1, 1], [2, 1, 1, 3], n=2)))
    shaped = exp.shape_rewards(cfg, t, None)
    result, kl = exp.advantages_and_returns(cfg, t, shaped.rewards, 0.0, None)
    # group 0: rewards (1, 0): mean 0.5, unbiased std sqrt(0.5) -> +-0.5/0.7071; group 1 equal -> 0
    a = 0.5 / math.sqrt(0.5)
    assert result.advantages[0, :2].tolist() == pytest.approx([a, a], rel=1e-5)
    assert result.advantages[1, 0].item() == pytest.approx(-a, rel=1e-5)
    assert result.advantages[1, 1:].abs().sum() == 0  # padding stays zero
    assert result.advantages[2:].abs().max() < 1e-4 and kl == 0.0


def test_dynamic_filter_drops_uniform_groups():
    cfg = load_config(None, ["--rollout.n_samples_per_prompt=2", "--rollout.dynamic_filtering=true"]).config
    t = exp.table_to_tensors(to_rollout_table(rows([1.0, 0.0, 1.0, 1.0], [1, 0, 1, 1], [1, 1, 1, 1], n=2)))
    keep = exp.group_filter(cfg, t)
    assert keep.tolist() == [True, True, False, False]
    assert exp.table_to_tensors(to_rollout_table(rows([1.0] * 2, [1] * 2, [1, 1], 2))).select(
        torch.tensor([True, False])).num_samples == 1


def test_reward_clipping_and_overlong_penalty():
    cfg = load_config(None, ["--algo.reward_clip_range=[-1, 1]", "--algo.overlong_buffer_len=2",
                             "--rollout.generate_max_len=4"]).config
    t = exp.table_to_tensors(to_rollout_table(rows([5.0, 0.0, 0.0, 0.0], [1, 0, 0, 0], [1, 2, 3, 4], n=4)))
    shaped = exp.shape_rewards(cfg, t, None)
    # DAPO: no penalty up to max - buffer = 2 tokens, then linear to -factor at the limit
    assert shaped.overlong_penalty.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])
    assert shaped.rewards.tolist() == pytest.approx([1.0, 0.0, -0.5, -1.0])


def test_merge_metrics_sums_maxes_and_rates():
    merged = merge_metrics([{"sum/generate_tokens": 100.0, "max/generate_engine_s": 2.0, "train/loss": 1.0},
                            {"sum/generate_tokens": 300.0, "max/generate_engine_s": 4.0, "train/loss": 3.0},
                            {"sum/eval_count": 4.0, "sum/eval_score": 3.0, "sum/eval_reward": 2.0}])
    assert merged["train/loss"] == 2.0 and merged["time/generate_engine_s"] == 4.0
    assert merged["throughput/generate_tokens_per_s"] == 100.0
    assert merged["eval/accuracy"] == 0.75 and merged["eval/reward_mean"] == 0.5


def test_optimizer_batches_are_a_pure_partition():
    a = optimizer_batches(10, 4, seed=1, iteration=2, epoch=0)
    assert a == optimizer_batches(10, 4, seed=1, iteration=2, epoch=0)
    assert sorted(i for chunk in a for i in chunk) == list(range(10)) and [len(c) for c in a] == [4, 4, 2]
    assert a != optimizer_batches(10, 4, seed=1, iteration=3, epoch=0)
    assert loss_weighting("token_mean") == "token" and loss_weighting("seq_mean_token_mean") == "sample"


@pytest.mark.parametrize("stage, expected", [("before_baseline", [-2.5, -2.5, -2.5, 7.5]),
                                             ("after_baseline", [-10.0, -10.0, -10.0, 10.0])])
def test_reward_clip_stage_from_the_config(stage, expected):
    # rewards [0, 0, 0, 100] in one group of 4 under reinforce_baseline (r - group mean), range [-10, 10]:
    # clipped raw -> [0, 0, 0, 10] - 2.5; clipped after the baseline -> clamp([-25, -25, -25, 75])
    cfg = load_config(None, ["--rollout.n_samples_per_prompt=4", "--algo.advantage_estimator=reinforce_baseline",
                             f"--algo.reward_clip_stage={stage}", "--train.train_batch_size=16"]).config
    t = exp.table_to_tensors(to_rollout_table(rows([0.0, 0.0, 0.0, 100.0], [0, 0, 0, 1], [1, 1, 1, 1], n=4)))
    shaped = exp.shape_rewards(cfg, t, None)
    result, _ = exp.advantages_and_returns(cfg, t, shaped.rewards, 0.0, None)
    assert result.sequence_rewards.tolist() == expected


def test_kl_penalty_is_clamped_per_token_by_the_config():
    # behaviour log-prob -0.5 against a reference of 2.5: k3 of log r = -3 is e^3 - 4 = 16.09 unclamped, 10 clamped
    cfg = load_config(None, ["--rollout.n_samples_per_prompt=2", "--algo.kl_estimator=k3",
                             "--algo.advantage_estimator=reinforce", "--train.train_batch_size=16"]).config
    t = exp.table_to_tensors(to_rollout_table(rows([1.0, 0.0], [1, 0], [1, 1], n=2)))
    t.reference_log_probs = torch.full_like(t.behaviour_log_probs, 2.5)
    _, mean_kl = exp.advantages_and_returns(cfg, t, t.rewards, 0.1, None)
    assert mean_kl == pytest.approx(10.0)
    off = load_config(None, ["--rollout.n_samples_per_prompt=2", "--algo.kl_estimator=k3", "--algo.kl_clamp=",
                             "--algo.advantage_estimator=reinforce", "--train.train_batch_size=16"]).config
    _, mean_kl = exp.advantages_and_returns(off, t, t.rewards, 0.1, None)
    assert mean_kl == pytest.approx(math.exp(3.0) - 4.0, rel=1e-5)


def _micro_batch(action_mask: torch.Tensor, **tensors: torch.Tensor) -> MicroBatch:
    """Only the response-layout fields the loss functions read."""
    samples = action_mask.shape[0]
    empty = torch.zeros(samples, 1, dtype=torch.long)
    return MicroBatch(input_ids=empty, attention_mask=None, position_ids=empty, response_rows=torch.arange(samples),
                      response_starts=torch.zeros(samples, dtype=torch.long),
                      response_lengths=action_mask.sum(1), action_mask=action_mask, response_tensors=tensors,
                      sample_indices=torch.arange(samples))


@pytest.mark.parametrize("mode, expected_bonus", [("token_mean", -(1.0 + 1.0 + 4.0) / 3),
                                                  ("seq_mean_token_mean", -(1.0 + 4.0) / 2)])
def test_entropy_bonus_is_aggregated_like_the_loss(mode, expected_bonus):
    # zero advantages make the policy loss 0, so the loss is the bonus: -coef * agg(H) with coef 1;
    # sample 0 has entropies (1, 1), sample 1 has (4): token mean 2, mean of sequence means 2.5
    cfg = load_config(None, [f"--algo.loss_agg_mode={mode}", "--algo.entropy_loss_coef=1.0"]).config
    mask = torch.tensor([[True, True], [True, False]])
    zeros = torch.zeros(2, 2)
    batch = _micro_batch(mask, advantages=zeros, old_log_probs=zeros, behaviour_log_probs=zeros)
    out = ForwardOutput(log_probs=zeros.clone(), entropy=torch.tensor([[1.0, 1.0], [4.0, 0.0]]))
    loss, metrics = actor_loss_fn(cfg)(batch, out)
    assert loss.item() == pytest.approx(expected_bonus)
    assert metrics["train/entropy"] == pytest.approx(2.0)  # the logged entropy stays a token mean


def test_log_ratio_clamp_from_the_config_reaches_the_policy_loss():
    # one token with log-ratio 24 under advantage -1: the loss is e^20 with the default clamp, e^24 without it
    mask = torch.tensor([[True]])
    zeros = torch.zeros(1, 1)
    batch = _micro_batch(mask, advantages=-torch.ones(1, 1), old_log_probs=zeros, behaviour_log_probs=zeros)
    out = ForwardOutput(log_probs=torch.full((1, 1), 24.0))
    for overrides, expected in (([], math.exp(20.0)), (["--algo.log_ratio_clamp="], math.exp(24.0))):
        loss, _ = actor_loss_fn(load_config(None, overrides).config)(batch, out)
        assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_stop_properly_penalty_from_the_config():
    # the generator records each finish reason in `extra`; a row without one counts as cut at generate_max_len = 4
    table_rows = rows([1.0, 1.0, 0.6, 0.6], [1, 1, 1, 1], [4, 2, 4, 4], n=4)
    for row, reason in zip(table_rows, ["stop", "length", "length", None]):
        row["extra"] = json.dumps({"finish_reason": reason} if reason else {"other": 1})
    t = exp.table_to_tensors(to_rollout_table(table_rows))
    assert t.finish_reasons == ["stop", "length", "length", None]
    assert t.select(torch.tensor([False, True, False, True])).finish_reasons == ["length", None]
    base = ["--rollout.generate_max_len=4", "--rollout.n_samples_per_prompt=4"]
    off = exp.shape_rewards(load_config(None, base).config, t, None)
    assert off.rewards.tolist() == pytest.approx([1.0, 1.0, 0.6, 0.6]) and off.truncated.tolist() == [
        False, True, True, True]
    scaled = exp.shape_rewards(load_config(None, base + ["--algo.stop_properly_penalty_coef=0.5"]).config, t, None)
    assert scaled.rewards.tolist() == pytest.approx([1.0, 0.5, 0.3, 0.3])
    fixed = exp.shape_rewards(load_config(None, base + ["--algo.stop_properly_penalty_coef=-0.5"]).config, t, None)
    assert fixed.rewards.tolist() == pytest.approx([1.0, -0.5, -0.5, -0.5])
    # after the overlong penalty (OpenRLHF's order): 4 tokens with buffer 2 at L_max 4 -> -1, then x 0.5
    both = exp.shape_rewards(load_config(None, base + ["--algo.stop_properly_penalty_coef=0.5",
                                                       "--algo.overlong_buffer_len=2"]).config, t, None)
    assert both.rewards.tolist() == pytest.approx([0.0, 0.5, -0.2, -0.2])


def test_advantage_std_norm_from_the_config():
    # reinforce, lengths 2 and 1, rewards 3 and 0: returns [[3, 3], [0, -]]; token mean 2, population var 2
    t = exp.table_to_tensors(to_rollout_table(rows([3.0, 0.0], [1, 0], [2, 1], n=1)))
    base = ["--algo.advantage_estimator=reinforce", "--rollout.n_samples_per_prompt=1", "--train.train_batch_size=8"]
    for extra, scale in (([], 1 / math.sqrt(2.0)), (["--algo.advantage_std_norm=false"], 1.0)):
        cfg = load_config(None, base + extra).config
        result, _ = exp.advantages_and_returns(cfg, t, exp.shape_rewards(cfg, t, None).rewards, 0.0, None)
        expected = torch.tensor([[1.0, 1.0], [-2.0, 0.0]]) * scale
        torch.testing.assert_close(result.advantages.float(), expected)
