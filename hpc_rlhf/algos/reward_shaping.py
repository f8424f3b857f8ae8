"""Reward shaping over a batch of sequence rewards [B]: normalisation, clipping, overlong and stop-properly penalties,
dynamic filtering.

All are pure functions except `RunningMoments`, the running mean/variance behind `normalize_reward`, which carries
state across iterations and therefore has a state_dict for resume. Groups follow the advantages module's convention:
consecutive runs of `n_samples_per_prompt` samples share one prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from hpc_rlhf.algos.advantages import group_rewards
from hpc_rlhf.algos.masked import AllReduceFn


@dataclass
class RunningMoments:
    """Running count, mean and sum of squared deviations (m2) of every reward seen so far, in float64.

    Batches merge by Chan et al.'s parallel formula: with batch statistics (n_b, mean_b, m2_b) and
    delta = mean_b - mean: count' = count + n_b, mean' = mean + delta n_b / count',
    m2' = m2 + m2_b + delta^2 count n_b / count'.
    """

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    @property
    def var(self) -> float:
        """Unbiased variance m2 / (count - 1); 1.0 until two rewards have been seen."""
        return self.m2 / (self.count - 1) if self.count > 1 else 1.0

    @property
    def std(self) -> float:
        """sqrt(var)."""
        return math.sqrt(self.var)

    def update(self, rewards: torch.Tensor, all_reduce: Optional[AllReduceFn] = None) -> None:
        """Merge a batch of rewards; with `all_reduce` the batch is the union of every rank's rewards."""
        x = rewards.detach().double().reshape(-1)
        count_and_sum = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), x.sum()])
        if all_reduce is not None:
            count_and_sum = all_reduce(count_and_sum)
        batch_count = float(count_and_sum[0])
        if batch_count == 0:
            return
        batch_mean = float(count_and_sum[1]) / batch_count
        batch_m2 = ((x - batch_mean) ** 2).sum().reshape(1)
        if all_reduce is not None:
            batch_m2 = all_reduce(batch_m2)
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.m2 = self.m2 + float(batch_m2[0]) + delta**2 * self.count * batch_count / total
        self.mean = self.mean + delta * batch_count / total
        self.count = total

    def state_dict(self) -> dict[str, float]:
        """count, mean and m2, for checkpoints."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what `state_dict` saved."""
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


def normalize_reward(rewards: torch.Tensor, mean: float, std: float, eps: float = 1e-8) -> torch.Tensor:
    """(r - mean) / (std + eps), with mean and std usually a RunningMoments' after updating it with this batch."""
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    return (rewards - mean) / (std + eps)


def clip_reward(rewards: torch.Tensor, reward_clip_range: tuple[float, float] | list[float]) -> torch.Tensor:
    """Clamp rewards into [low, high] (`reward_clip_range`)."""
    if len(reward_clip_range) != 2 or reward_clip_range[0] > reward_clip_range[1]:
        raise ValueError(f"reward_clip_range must be [low, high] with low <= high, got {list(reward_clip_range)}")
    return rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])


def overlong_penalty(
    response_lengths: torch.Tensor,
    max_new_tokens: int,
    overlong_buffer_len: int,
    overlong_penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) per sample, to be added to the reward; <= 0.

    With L_max = max_new_tokens, L_buf = overlong_buffer_len and exceed = |y| - (L_max - L_buf):
        0                                            if exceed <= 0
        -min(exceed, L_buf) / L_buf * penalty_factor otherwise (linear inside the buffer, capped at -penalty_factor)
    """
    if overlong_buffer_len <= 0:
        raise ValueError(f"overlong_buffer_len must be positive, got {overlong_buffer_len}")
    if max_new_tokens < overlong_buffer_len:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= overlong_buffer_len ({overlong_buffer_len})")
    exceed = response_lengths.double() - (max_new_tokens - overlong_buffer_len)
    penalty = -exceed.clamp(min=0, max=overlong_buffer_len) / overlong_buffer_len * overlong_penalty_factor
    return penalty.float()


def truncated_responses(finish_reasons: Sequence[Optional[str]], response_lengths: torch.Tensor,
                        max_new_tokens: int) -> torch.Tensor:
    """bool [B]: the responses the token limit cut before they ended (no eos): finish_reason "length" where the
    generator recorded a reason (hpc_rlhf's generators always do; "stop" and "max_turns" are proper ends), and for a
    row without one, a response of max_new_tokens tokens or more."""
    if len(finish_reasons) != len(response_lengths):
        raise ValueError(f"{len(finish_reasons)} finish reasons for {len(response_lengths)} responses")
    return torch.tensor([reason == "length" if reason is not None else int(length) >= max_new_tokens
                         for reason, length in zip(finish_reasons, response_lengths.tolist())], dtype=torch.bool)


def stop_properly_penalty(rewards: torch.Tensor, truncated: torch.Tensor, coef: float) -> torch.Tensor:
    """ProRL's stop-properly penalty (OpenRLHF `apply_stop_properly_penalty`): the reward r of a truncated response
    becomes r * coef for coef in [0, 1] (0 = no credit for a cut answer), or coef itself for coef < 0 (a fixed
    punishment, e.g. -0.5); other rewards stay as they are."""
    if math.isnan(coef) or coef > 1:
        raise ValueError(f"stop_properly_penalty_coef must be in [0, 1] or negative, got {coef}")
    if truncated.shape != rewards.shape:
        raise ValueError(f"truncated {tuple(truncated.shape)} and rewards {tuple(rewards.shape)} differ in shape")
    penalized = torch.full_like(rewards, coef) if coef < 0 else rewards * coef
    return torch.where(truncated.to(rewards.device), penalized, rewards)


def dynamic_filter_mask(
    scores: torch.Tensor,
    n_samples_per_prompt: int,
    *,
    score_range: tuple[float, float] = (0.0, 1.0),
    std_threshold: float = 0.0,
) -> torch.Tensor:
    """DAPO dynamic sampling: per-sample keep mask [B] (bool) that keeps or drops whole groups.

    A group of scores (e.g. 0/1 correctness) is kept when low < mean(group) < high (open interval, so all-correct and
    all-wrong 0/1 groups go) and its population std > std_threshold (so equal scores go even inside the range).
    Such groups have zero group-relative advantage and carry no gradient.
    """
    low, high = score_range
    if low >= high:
        raise ValueError(f"score_range must be (low, high) with low < high, got {score_range}")
    groups = group_rewards(scores, n_samples_per_prompt).double()
    mean = groups.mean(dim=-1)
    std = groups.std(dim=-1, correction=0)
    keep_group = (mean > low) & (mean < high) & (std > std_threshold)
    return keep_group.repeat_interleave(n_samples_per_prompt)
