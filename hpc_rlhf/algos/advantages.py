"""Advantage estimators selected by `algo.advantage_estimator`, named and defined as in OpenRLHF.

Shapes: sequence rewards r are [B]; per-token tensors (values, kl, action_mask, results) are [B, T] over response
tokens. action_mask is 1 on tokens the policy produced and 0 on padding and on environment tokens of multi-turn
trajectories.

Groups: the B samples are n_prompts consecutive groups of `n_samples_per_prompt` samples of one prompt, i.e. sample
b belongs to prompt b // n_samples_per_prompt (rewards.view(n_prompts, n)). A group must lie whole in the batch.

Pipeline (OpenRLHF's `compute_advantages_and_returns`):
1. group baseline on sequence rewards (group estimators only), with group mean m, unbiased group std s:
       rloo:               r_i - (sum_{j != i} r_j) / (n - 1)
       reinforce_baseline: r_i - m
       dr_grpo:            r_i - m
       group_norm (GRPO):  (r_i - m) / (s + group_std_eps)
   then, with `clip_after_baseline`, the results are clamped into [low, high] (OpenRLHF clips here; hpc_rlhf's
   default clips the raw rewards before step 1, see `algo.reward_clip_stage`).
2. per-token rewards: rho_t = -kl_coef * kl_t on action tokens, plus the sequence reward on the last action token.
3. gae:        delta_t = rho_t + gamma V_{t+1} - V_t,  A_t = delta_t + gamma lambda A_{t+1},  returns R_t = A_t + V_t
   all others: G_t = rho_t + gamma G_{t+1} (token-level discounted return), A_t = G_t; group estimators need gamma = 1.
4. global whitening A <- (A - mean) / sqrt(max(var, 1e-8)) over every action token of the batch, for gae, reinforce
   (REINFORCE++) and reinforce_baseline; rloo, group_norm and dr_grpo are not whitened.

Masked tokens are transparent in the recursions of step 3: t+1 means the next action token, and an environment span
costs no discount. This equals OpenRLHF on right-padded batches and is the right reading for multi-turn trajectories
(OpenRLHF, which zeroes masked rewards and values, discounts across environment tokens when gamma < 1). Results are 0
on masked tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from hpc_rlhf.algos.masked import AllReduceFn, as_compute_dtype, check_same_shape, masked_whiten

ADVANTAGE_ESTIMATORS = ("gae", "reinforce", "reinforce_baseline", "rloo", "group_norm", "dr_grpo")
GROUP_ESTIMATORS = ("reinforce_baseline", "rloo", "group_norm", "dr_grpo")
WHITENED_ESTIMATORS = ("gae", "reinforce", "reinforce_baseline")


@dataclass
class AdvantagesAndReturns:
    """What the estimators produce: per-token advantages and returns [B, T], and the sequence rewards after step 1."""

    advantages: torch.Tensor
    returns: torch.Tensor
    sequence_rewards: torch.Tensor


def group_rewards(rewards: torch.Tensor, n_samples_per_prompt: int) -> torch.Tensor:
    """View [B] sequence rewards as [n_prompts, n_samples_per_prompt] (consecutive samples share a prompt)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [batch], got shape {tuple(rewards.shape)}")
    if n_samples_per_prompt < 1:
        raise ValueError(f"n_samples_per_prompt must be >= 1, got {n_samples_per_prompt}")
    if rewards.numel() % n_samples_per_prompt != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} samples, not a multiple of n_samples_per_prompt={n_samples_per_prompt}: "
            "every prompt's group must be whole in the batch"
        )
    return rewards.view(-1, n_samples_per_prompt)


def rloo_rewards(rewards: torch.Tensor, n_samples_per_prompt: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): r_i - mean_{j != i} r_j, the leave-one-out baseline within each group."""
    _require_group_size(n_samples_per_prompt, "rloo")
    groups = as_compute_dtype(group_rewards(rewards, n_samples_per_prompt))
    baseline = (groups.sum(dim=-1, keepdim=True) - groups) / (n_samples_per_prompt - 1)
    return (groups - baseline).reshape(-1)


def group_mean_centered_rewards(rewards: torch.Tensor, n_samples_per_prompt: int) -> torch.Tensor:
    """REINFORCE++-baseline and Dr. GRPO: r_i - mean_group(r), no division by the group std."""
    _require_group_size(n_samples_per_prompt, "reinforce_baseline / dr_grpo")
    groups = as_compute_dtype(group_rewards(rewards, n_samples_per_prompt))
    return (groups - groups.mean(dim=-1, keepdim=True)).reshape(-1)


def group_normalized_rewards(rewards: torch.Tensor, n_samples_per_prompt: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (r_i - mean_group(r)) / (std_group(r) + eps).

    std is the unbiased sample std (torch.std, divisor n - 1), as in OpenRLHF, TRL and verl. A group of equal rewards
    gives 0 for every sample.
    """
    _require_group_size(n_samples_per_prompt, "group_norm")
    if eps < 0:
        raise ValueError(f"group_std_eps must be >= 0, got {eps}")
    groups = as_compute_dtype(group_rewards(rewards, n_samples_per_prompt))
    centered = groups - groups.mean(dim=-1, keepdim=True)
    return (centered / (groups.std(dim=-1, keepdim=True) + eps)).reshape(-1)


def last_action_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of the last token with mask 1 in each row (the token that receives the sequence reward); empty for
    a batch without rows (a rank, or an iteration, whose groups were all filtered out)."""
    length = action_mask.shape[-1]
    if action_mask.numel() == 0:
        return torch.zeros(action_mask.shape[:-1], dtype=torch.long, device=action_mask.device)
    return length - 1 - action_mask.long().flip(dims=[-1]).argmax(dim=-1)


def kl_shaped_token_rewards(
    sequence_rewards: torch.Tensor,
    action_mask: torch.Tensor,
    kl: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
) -> torch.Tensor:
    """Per-token rewards rho [B, T]: -kl_coef * kl_t on action tokens, plus r_i on the last action token of row i.

    A row without action tokens gets all zeros.
    """
    if action_mask.dim() != 2 or sequence_rewards.shape != action_mask.shape[:1]:
        raise ValueError(
            f"sequence rewards [batch] and action_mask [batch, len] do not match: "
            f"{tuple(sequence_rewards.shape)} vs {tuple(action_mask.shape)}"
        )
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    mask = action_mask.bool()
    dtype = as_compute_dtype(sequence_rewards).dtype
    token_rewards = torch.zeros(action_mask.shape, dtype=dtype, device=action_mask.device)
    rows = torch.arange(action_mask.shape[0], device=action_mask.device)
    token_rewards[rows, last_action_index(action_mask)] = sequence_rewards.to(dtype)
    if kl is not None and kl_coef != 0.0:
        check_same_shape("kl", kl, "action_mask", action_mask)
        token_rewards = token_rewards - kl_coef * as_compute_dtype(kl).to(dtype)
    return torch.where(mask, token_rewards, torch.zeros_like(token_rewards))


def discounted_returns(token_rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = rho_t + gamma * G_{t'} with t' the next action token after t (masked tokens are skipped); 0 off-mask."""
    check_same_shape("token_rewards", token_rewards, "action_mask", action_mask)
    mask = action_mask.bool()
    rewards = torch.where(mask, token_rewards, torch.zeros_like(token_rewards))
    if gamma == 1.0:
        suffix_sums = rewards.flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
        return torch.where(mask, suffix_sums, torch.zeros_like(suffix_sums))
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[-1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(mask[:, t], running, torch.zeros_like(running))
    return returns


def gae_advantages_and_returns(
    values: torch.Tensor,
    token_rewards: torch.Tensor,
    action_mask: torch.Tensor,
    gamma: float = 1.0,
    lambd: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) over action tokens: returns (advantages, returns), both 0 off-mask.

    delta_t = rho_t + gamma V_{t'} - V_t and A_t = delta_t + gamma lambda A_{t'}, t' the next action token (V and A are
    0 past the last one); returns R_t = A_t + V_t are the value-loss targets. Not whitened here.
    """
    check_same_shape("values", values, "action_mask", action_mask)
    check_same_shape("token_rewards", token_rewards, "action_mask", action_mask)
    mask = action_mask.bool()
    values = as_compute_dtype(values).to(token_rewards.dtype)
    advantages = torch.zeros_like(token_rewards)
    next_value = token_rewards.new_zeros(token_rewards.shape[0])
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(token_rewards.shape[-1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lambd * next_advantage
        on = mask[:, t]
        advantages[:, t] = torch.where(on, advantage, torch.zeros_like(advantage))
        next_advantage = torch.where(on, advantage, next_advantage)
        next_value = torch.where(on, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, torch.zeros_like(advantages))
    return advantages, returns


def compute_advantages(
    advantage_estimator: str,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    values: Optional[torch.Tensor] = None,
    kl: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    gamma: float = 1.0,
    lambd: float = 1.0,
    n_samples_per_prompt: int = 1,
    group_std_eps: float = 1e-6,
    advantage_std_norm: bool = True,
    all_reduce: Optional[AllReduceFn] = None,
    clip_after_baseline: Optional[tuple[float, float]] = None,
) -> AdvantagesAndReturns:
    """Advantages and returns for one batch by `advantage_estimator` (pipeline in the module docstring).

    `kl` is the per-token KL estimate (kl.compute_kl) used as a reward penalty with weight `kl_coef`; pass kl_coef=0
    when KL is a loss term instead. `values` (the critic's, [B, T]) are required by gae. `advantage_std_norm=False`
    only centres in step 4. `all_reduce` sums whitening statistics over the ranks that share the global batch
    (masked.masked_whiten); group baselines never cross ranks. `clip_after_baseline` = (low, high) clamps the
    sequence rewards after step 1 (OpenRLHF's order, `algo.reward_clip_stage: after_baseline`); by default the
    caller clips raw rewards before the baseline (reward_shaping.clip_reward).
    """
    if advantage_estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, got {advantage_estimator!r}")
    if action_mask.dim() != 2 or rewards.shape != action_mask.shape[:1]:
        raise ValueError(
            f"rewards must be [batch] and action_mask [batch, len] with the same batch, got "
            f"{tuple(rewards.shape)} and {tuple(action_mask.shape)}"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lambd <= 1.0:
        raise ValueError(f"lambd must be in [0, 1], got {lambd}")
    if advantage_estimator in GROUP_ESTIMATORS and gamma != 1.0:
        raise ValueError(
            f"advantage_estimator={advantage_estimator} needs gamma=1.0 (a per-prompt baseline), got {gamma}"
        )
    if advantage_estimator == "gae" and values is None:
        raise ValueError("advantage_estimator=gae needs values from the critic")

    if advantage_estimator == "rloo":
        sequence_rewards = rloo_rewards(rewards, n_samples_per_prompt)
    elif advantage_estimator in ("reinforce_baseline", "dr_grpo"):
        sequence_rewards = group_mean_centered_rewards(rewards, n_samples_per_prompt)
    elif advantage_estimator == "group_norm":
        sequence_rewards = group_normalized_rewards(rewards, n_samples_per_prompt, group_std_eps)
    else:
        sequence_rewards = as_compute_dtype(rewards)
    if clip_after_baseline is not None:
        low, high = clip_after_baseline
        if low > high:
            raise ValueError(f"clip_after_baseline must be (low, high) with low <= high, got {clip_after_baseline}")
        sequence_rewards = sequence_rewards.clamp(min=low, max=high)

    token_rewards = kl_shaped_token_rewards(sequence_rewards, action_mask, kl, kl_coef)
    if advantage_estimator == "gae":
        advantages, returns = gae_advantages_and_returns(values, token_rewards, action_mask, gamma, lambd)
    else:
        returns = discounted_returns(token_rewards, action_mask, gamma)
        advantages = returns.clone()

    if advantage_estimator in WHITENED_ESTIMATORS:
        advantages = masked_whiten(advantages, action_mask, std_norm=advantage_std_norm, all_reduce=all_reduce)
    return AdvantagesAndReturns(advantages=advantages, returns=returns, sequence_rewards=sequence_rewards)


def _require_group_size(n_samples_per_prompt: int, estimator: str) -> None:
    """Group baselines need at least two samples per prompt."""
    if n_samples_per_prompt < 2:
        raise ValueError(f"{estimator} needs n_samples_per_prompt >= 2, got {n_samples_per_prompt}")
