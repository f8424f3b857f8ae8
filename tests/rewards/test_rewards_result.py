"""Normalising raw reward outputs into RewardResult: accepted shapes, clear errors, concatenation invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.rewards.result import RewardError, RewardResult, check_batch, to_reward_result


def test_rewards_alone_in_every_container_become_float32_with_scores_equal_rewards():
    expected = torch.tensor([1.0, -0.5, 2.0])
    for raw in ([1, -0.5, 2.0], (1.0, -0.5, 2), np.array([1.0, -0.5, 2.0]), torch.tensor([1.0, -0.5, 2.0]),
                torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)):
        result = to_reward_result(raw, 3, "test")
        assert result.rewards.dtype == torch.float32 and result.scores.dtype == torch.float32
        assert torch.equal(result.rewards, expected)
        assert torch.equal(result.scores, expected)
        assert result.extra_logs == {}


def test_dict_with_scores_and_scalar_and_per_sample_logs():
    result = to_reward_result(
        {"rewards": torch.tensor([0.1, 1.0]), "scores": [0, 1], "extra_logs": {"acc": [0.0, 1.0], "n": 2}}, 2, "t")
    assert torch.equal(result.scores, torch.tensor([0.0, 1.0]))
    assert torch.equal(result.extra_logs["acc"], torch.tensor([0.0, 1.0]))
    assert torch.equal(result.extra_logs["n"], torch.tensor([2.0, 2.0]))  # a scalar log is repeated per sample
    assert len(result) == 2


def test_bool_tensor_rewards_are_zero_one():
    result = to_reward_result(torch.tensor([True, False]), 2, "t")
    assert torch.equal(result.rewards, torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("raw, fragment", [
    ({"scores": [1.0]}, "no 'rewards'"),
    ({"rewards": [1.0], "reward": [1.0]}, "unexpected key(s) ['reward']"),
    ("1.0", "returned str"),
    (None, "returned NoneType"),
    (1.0, "returned float"),
    ([1.0, 2.0], "rewards has 2 values, expected 1"),
    ([[1.0]], "rewards[0] is [1.0]"),
    (torch.ones(1, 1), "must be 1-D"),
    (["high"], "rewards[0] is 'high' (str), expected a number"),
    ({"rewards": [1.0], "scores": [None]}, "scores[0] is None"),
    ({"rewards": [1.0], "extra_logs": [1.0]}, "extra_logs must be a dict"),
    ({"rewards": [1.0], "extra_logs": {"x": [1.0, 2.0]}}, "extra_logs['x'] has 2 values, expected 1"),
])
def test_bad_outputs_name_the_field(raw, fragment):
    with pytest.raises(RewardError) as error:
        to_reward_result(raw, 1, "my_source")
    assert fragment in str(error.value)
    assert "my_source" in str(error.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rewards_name_the_sample_index(bad):
    with pytest.raises(RewardError, match=r"rewards\[2\] is"):
        to_reward_result([0.0, 1.0, bad, 0.5], 4, "t")
    with pytest.raises(RewardError, match=r"scores\[0\] is"):
        to_reward_result({"rewards": [0.0], "scores": [bad]}, 1, "t")


def test_check_batch_lengths_and_missing_labels():
    assert check_batch(["a", "b"], ["a", "b"], None, "t") == [None, None]
    with pytest.raises(RewardError, match="2 queries, 1 prompts and 2 labels"):
        check_batch(["a", "b"], ["a"], ["x", "y"], "t")
    with pytest.raises(RewardError, match="queries must be a list of strings"):
        check_batch("ab", ["a", "b"], None, "t")


def test_concat_refuses_different_log_names():
    a = to_reward_result({"rewards": [1.0], "extra_logs": {"x": 1}}, 1, "t")
    b = to_reward_result({"rewards": [1.0], "extra_logs": {"y": 1}}, 1, "t")
    with pytest.raises(RewardError, match="chunk 1"):
        RewardResult.concat([a, b])


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(finite, min_size=1, max_size=5), min_size=1, max_size=4))
def test_concat_of_chunks_equals_the_whole_batch(chunks):
    """Scoring a batch in chunks and concatenating gives what scoring it at once gives, order kept."""
    whole_values = [v for chunk in chunks for v in chunk]
    parts = [to_reward_result({"rewards": c, "extra_logs": {"v": c}}, len(c), "t") for c in chunks]
    joined = RewardResult.concat(parts)
    whole = to_reward_result({"rewards": whole_values, "extra_logs": {"v": whole_values}}, len(whole_values), "t")
    assert torch.equal(joined.rewards, whole.rewards)
    assert torch.equal(joined.scores, whole.rewards)
    assert torch.equal(joined.extra_logs["v"], whole.extra_logs["v"])
    assert joined.to_json()["rewards"] == whole.rewards.tolist()
