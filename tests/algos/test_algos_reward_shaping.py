"""Reward shaping: running moments, normalisation, clipping, DAPO overlong and ProRL stop-properly penalties, dynamic
filtering."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.algos.reward_shaping import (
    RunningMoments,
    clip_reward,
    dynamic_filter_mask,
    normalize_reward,
    overlong_penalty,
    stop_properly_penalty,
    truncated_responses,
)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(-1e3, 1e3), min_size=0, max_size=8), min_size=1, max_size=6))
def test_running_moments_equal_statistics_of_everything_seen(batches):
    moments = RunningMoments()
    for batch in batches:
        moments.update(torch.tensor(batch, dtype=torch.float32))
    seen = [x for batch in batches for x in torch.tensor(batch, dtype=torch.float32).double().tolist()]
    assert moments.count == len(seen)
    if len(seen) >= 2:
        everything = torch.tensor(seen, dtype=torch.float64)
        assert moments.mean == pytest.approx(everything.mean().item(), abs=1e-9)
        assert moments.var == pytest.approx(everything.var().item(), rel=1e-9, abs=1e-6)
    else:
        assert moments.std == 1.0


def test_running_moments_resume_and_normalise():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    resumed = RunningMoments()
    resumed.load_state_dict(moments.state_dict())
    for m in (moments, resumed):
        m.update(torch.tensor([4.0, 5.0]))
    assert resumed.state_dict() == moments.state_dict()
    assert moments.mean == 3.0 and moments.var == pytest.approx(2.5)
    normalised = normalize_reward(torch.tensor([3.0, 5.5]), moments.mean, moments.std, eps=0.0)
    torch.testing.assert_close(normalised, torch.tensor([0.0, 2.5 / 2.5**0.5]))


def test_clip_reward():
    torch.testing.assert_close(
        clip_reward(torch.tensor([-20.0, 0.5, 20.0]), [-10, 10]), torch.tensor([-10.0, 0.5, 10.0])
    )
    with pytest.raises(ValueError, match="reward_clip_range"):
        clip_reward(torch.zeros(2), [1.0, -1.0])


def test_overlong_penalty_by_hand():
    # L_max 20, buffer 4: no penalty up to 16, linear to -factor at 20, capped beyond
    lengths = torch.tensor([10, 16, 17, 20, 25])
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4, 0.5), torch.tensor([0.0, 0.0, -0.125, -0.5, -0.5]))
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        overlong_penalty(lengths, 3, 4)


def test_dynamic_filter_by_hand():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.2, 0.9])
    keep = dynamic_filter_mask(scores, 2)
    assert keep.tolist() == [False, False, True, True, False, False, False, False, True, True]
    keep_wide_std = dynamic_filter_mask(scores, 2, std_threshold=0.4)
    assert keep_wide_std.tolist() == [False, False, True, True] + [False] * 6
    # groups that vary but whose mean lies outside the range go too
    outside = torch.tensor([2.0, 3.0, 0.4, 0.8, 0.1, 0.3])
    assert dynamic_filter_mask(outside, 2).tolist() == [False, False, True, True, True, True]
    assert dynamic_filter_mask(outside, 2, score_range=(0.15, 0.5)).tolist() == [False] * 4 + [True, True]
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        dynamic_filter_mask(scores, 3)


def test_truncated_responses_from_finish_reasons_or_length():
    # recorded reasons decide ("length" = cut by the token limit); rows without one: length >= max_new_tokens
    reasons = ["stop", "length", "max_turns", None, None, "stop"]
    lengths = torch.tensor([8, 3, 8, 8, 7, 9])
    assert truncated_responses(reasons, lengths, 8).tolist() == [False, True, False, True, False, False]
    with pytest.raises(ValueError, match="2 finish reasons for 3 responses"):
        truncated_responses(["stop", "stop"], torch.tensor([1, 2, 3]), 8)


def test_stop_properly_penalty_by_hand():
    # OpenRLHF apply_stop_properly_penalty: truncated r -> r * coef (0 <= coef <= 1) or -> coef (coef < 0)
    rewards = torch.tensor([1.0, 0.8, -0.4, 1.0])
    truncated = torch.tensor([False, True, True, False])
    torch.testing.assert_close(stop_properly_penalty(rewards, truncated, 0.5), torch.tensor([1.0, 0.4, -0.2, 1.0]))
    torch.testing.assert_close(stop_properly_penalty(rewards, truncated, 0.0), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(stop_properly_penalty(rewards, truncated, -0.5), torch.tensor([1.0, -0.5, -0.5, 1.0]))
    assert torch.equal(stop_properly_penalty(rewards, truncated, 1.0), rewards)
    for bad in (1.5, float("nan")):
        with pytest.raises(ValueError, match="stop_properly_penalty_coef"):
            stop_properly_penalty(rewards, truncated, bad)
