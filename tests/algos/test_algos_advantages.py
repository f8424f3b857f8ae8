"""Advantage estimators: hand-derived values, an independent float64 loop reference, and invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.algos.advantages import (
    ADVANTAGE_ESTIMATORS,
    GROUP_ESTIMATORS,
    compute_advantages,
    gae_advantages_and_returns,
    group_mean_centered_rewards,
    group_normalized_rewards,
    kl_shaped_token_rewards,
    rloo_rewards,
)


def reference_advantages(
    estimator: str,
    rewards: list[float],
    lengths: list[int],
    width: int,
    kl: list[list[float]],
    kl_coef: float,
    values: list[list[float]] | None,
    gamma: float,
    lambd: float,
    n: int,
    eps: float,
) -> tuple[list[list[float]], list[list[float]]]:
    """The published pipeline for right-padded rows in Python floats: (advantages, returns), 0 past each length."""
    batch = len(rewards)
    shaped = list(rewards)
    for start in range(0, batch, n):
        group = rewards[start : start + n]
        mean = sum(group) / n
        for k in range(n):
            r = group[k]
            if estimator == "rloo":
                shaped[start + k] = r - (sum(group) - r) / (n - 1)
            elif estimator in ("reinforce_baseline", "dr_grpo"):
                shaped[start + k] = r - mean
            elif estimator == "group_norm":
                std = math.sqrt(sum((g - mean) ** 2 for g in group) / (n - 1))
                shaped[start + k] = (r - mean) / (std + eps)
    advantages = [[0.0] * width for _ in range(batch)]
    returns = [[0.0] * width for _ in range(batch)]
    for i in range(batch):
        length = lengths[i]
        rho = [-kl_coef * kl[i][t] for t in range(length)]
        rho[length - 1] += shaped[i]
        if estimator == "gae":
            last = 0.0
            for t in reversed(range(length)):
                next_value = values[i][t + 1] if t + 1 < length else 0.0
                delta = rho[t] + gamma * next_value - values[i][t]
                last = delta + gamma * lambd * last
                advantages[i][t] = last
                returns[i][t] = last + values[i][t]
        else:
            running = 0.0
            for t in reversed(range(length)):
                running = rho[t] + gamma * running
                advantages[i][t] = running
                returns[i][t] = running
    if estimator in ("gae", "reinforce", "reinforce_baseline"):
        flat = [advantages[i][t] for i in range(batch) for t in range(lengths[i])]
        mean = sum(flat) / len(flat)
        var = sum((a - mean) ** 2 for a in flat) / len(flat)
        scale = 1.0 / math.sqrt(max(var, 1e-8))
        for i in range(batch):
            for t in range(lengths[i]):
                advantages[i][t] = (advantages[i][t] - mean) * scale
    return advantages, returns


def test_group_baselines_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(
        rloo_rewards(rewards, 4), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0, 0, 0, 0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        group_mean_centered_rewards(rewards, 4),
        torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], dtype=torch.float64),
    )
    # mean 0.25, unbiased std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5; equal rewards give 0
    torch.testing.assert_close(
        group_normalized_rewards(rewards, 4, eps=0.0)[:4], torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64)
    )
    assert torch.all(group_normalized_rewards(rewards, 4)[4:] == 0)


def test_reinforce_returns_by_hand():
    # rho = [-0.05, -0.1, 1 - 0.15]; returns are suffix sums
    mask = torch.tensor([[1, 1, 1]])
    kl = torch.tensor([[0.1, 0.2, 0.3]], dtype=torch.float64)
    rewards = torch.tensor([1.0], dtype=torch.float64)
    out = compute_advantages("reinforce", rewards, mask, kl=kl, kl_coef=0.5)
    torch.testing.assert_close(out.returns, torch.tensor([[0.7, 0.75, 0.85]], dtype=torch.float64))
    g = torch.tensor([0.7, 0.75, 0.85], dtype=torch.float64)
    torch.testing.assert_close(out.advantages[0], (g - g.mean()) / g.var(unbiased=False).sqrt())


def test_gae_by_hand():
    # delta_1 = 1 - 0.2 = 0.8; delta_0 = 0.9 * 0.2 - 0.5 = -0.32; A_0 = -0.32 + 0.9 * 0.8 * 0.8 = 0.256
    values = torch.tensor([[0.5, 0.2, 7.0]], dtype=torch.float64)
    token_rewards = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    advantages, returns = gae_advantages_and_returns(values, token_rewards, mask, gamma=0.9, lambd=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[0.256, 0.8, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor([[0.756, 1.0, 0.0]], dtype=torch.float64))


def test_kl_shaped_rewards_put_reward_on_last_action_token():
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    kl = torch.full((2, 5), 2.0, dtype=torch.float64)
    rho = kl_shaped_token_rewards(torch.tensor([5.0, 3.0], dtype=torch.float64), mask, kl, kl_coef=0.1)
    torch.testing.assert_close(rho, torch.tensor([[-0.2, -0.2, 0.0, 4.8, 0.0], [0.0] * 5], dtype=torch.float64))


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_on_random_right_padded_batches(estimator, seed, right_padded_mask):
    generator = torch.Generator().manual_seed(seed)
    n = 1 if estimator in ("gae", "reinforce") and seed == 0 else 3
    batch, width = 6, 7
    lengths = torch.randint(1, width + 1, (batch,), generator=generator).tolist()
    mask = right_padded_mask(lengths, width)
    rewards = torch.randn(batch, generator=generator, dtype=torch.float64)
    kl = torch.randn(batch, width, generator=generator, dtype=torch.float64)
    values = torch.randn(batch, width, generator=generator, dtype=torch.float64)
    group = estimator in GROUP_ESTIMATORS
    gamma, lambd = (1.0, 1.0) if group else (0.97, 0.9)
    out = compute_advantages(
        estimator,
        rewards,
        mask,
        values=values if estimator == "gae" else None,
        kl=kl,
        kl_coef=0.05,
        gamma=gamma,
        lambd=lambd,
        n_samples_per_prompt=n,
        group_std_eps=1e-6,
    )
    expected_advantages, expected_returns = reference_advantages(
        estimator, rewards.tolist(), lengths, width, kl.tolist(), 0.05, values.tolist(), gamma, lambd, n, 1e-6
    )
    torch.testing.assert_close(out.advantages, torch.tensor(expected_advantages, dtype=torch.float64))
    torch.testing.assert_close(out.returns, torch.tensor(expected_returns, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(
    estimator=st.sampled_from(ADVANTAGE_ESTIMATORS),
    seed=st.integers(0, 2**31 - 1),
    holes=st.lists(st.integers(0, 6), min_size=1, max_size=4),
)
def test_environment_tokens_are_transparent_and_garbage_under_mask_is_ignored(estimator, seed, holes):
    """Inserting masked (environment) tokens holding NaN anywhere changes nothing on the action tokens."""
    generator = torch.Generator().manual_seed(seed)
    batch, width = 4, 6
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
    rewards = torch.randn(batch, generator=generator, dtype=torch.float64)
    kl = torch.randn(batch, width, generator=generator, dtype=torch.float64)
    values = torch.randn(batch, width, generator=generator, dtype=torch.float64)
    group = estimator in GROUP_ESTIMATORS
    kwargs = dict(kl_coef=0.1, gamma=1.0 if group else 0.9, lambd=0.95, n_samples_per_prompt=2)
    plain = compute_advantages(estimator, rewards, mask, values=values, kl=kl, **kwargs)

    keep = list(range(width))
    for position in sorted(holes, reverse=True):
        keep.insert(min(position, len(keep)), -1)

    def spread(x: torch.Tensor, fill: float) -> torch.Tensor:
        columns = [x[:, j] if j >= 0 else torch.full((batch,), fill, dtype=x.dtype) for j in keep]
        return torch.stack(columns, dim=1)

    holey_mask = spread(mask, 0)
    holey = compute_advantages(
        estimator, rewards, holey_mask, values=spread(values, float("nan")), kl=spread(kl, float("nan")), **kwargs
    )
    on = [k for k, j in enumerate(keep) if j >= 0]
    torch.testing.assert_close(holey.advantages[:, on], plain.advantages)
    torch.testing.assert_close(holey.returns[:, on], plain.returns)
    assert torch.all(holey.advantages[holey_mask == 0] == 0)


@settings(max_examples=40, deadline=None)
@given(
    rewards=st.lists(st.floats(-100, 100), min_size=2, max_size=12),
    n=st.integers(2, 4),
)
def test_group_baselines_sum_to_zero_and_are_permutation_equivariant(rewards, n):
    rewards = rewards[: len(rewards) // n * n]
    if not rewards:
        return
    r = torch.tensor(rewards, dtype=torch.float64)
    groups = len(rewards) // n
    generator = torch.Generator().manual_seed(len(rewards) * 10 + n)
    permutation = torch.cat([torch.randperm(n, generator=generator) + g * n for g in range(groups)])
    for shaping in (rloo_rewards, group_mean_centered_rewards, group_normalized_rewards):
        shaped = shaping(r, n)
        sums = shaped.view(groups, n).sum(dim=-1)
        torch.testing.assert_close(sums, torch.zeros(groups, dtype=torch.float64), atol=1e-7, rtol=0)
        torch.testing.assert_close(shaping(r[permutation], n), shaped[permutation])


def test_rloo_is_proportional_to_mean_centering():
    """r_i - mean_{j!=i} r_j = n / (n - 1) * (r_i - mean_j r_j)."""
    r = torch.randn(12, dtype=torch.float64)
    torch.testing.assert_close(rloo_rewards(r, 4), 4 / 3 * group_mean_centered_rewards(r, 4))


def test_dr_grpo_and_group_norm_are_not_whitened_but_reinforce_baseline_is():
    mask = torch.ones(4, 3, dtype=torch.long)
    rewards = torch.tensor([3.0, 1.0, 10.0, 10.0], dtype=torch.float64)
    dr = compute_advantages("dr_grpo", rewards, mask, n_samples_per_prompt=2).advantages
    torch.testing.assert_close(dr[:, 0], torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64))
    baseline = compute_advantages("reinforce_baseline", rewards, mask, n_samples_per_prompt=2).advantages
    assert baseline.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert baseline.var(unbiased=False).item() == pytest.approx(1.0)


def test_bad_input_is_named():
    mask = torch.ones(4, 3)
    rewards = torch.zeros(4)
    with pytest.raises(ValueError, match="advantage_estimator"):
        compute_advantages("ppo", rewards, mask)
    with pytest.raises(ValueError, match="gamma=1.0"):
        compute_advantages("group_norm", rewards, mask, gamma=0.9, n_samples_per_prompt=2)
    with pytest.raises(ValueError, match="n_samples_per_prompt=3"):
        compute_advantages("rloo", rewards, mask, n_samples_per_prompt=3)
    with pytest.raises(ValueError, match="n_samples_per_prompt >= 2"):
        compute_advantages("rloo", rewards, mask, n_samples_per_prompt=1)
    with pytest.raises(ValueError, match="values"):
        compute_advantages("gae", rewards, mask)
    with pytest.raises(ValueError, match="batch"):
        compute_advantages("reinforce", torch.zeros(3), mask)
    with pytest.raises(ValueError, match="kl_coef"):
        compute_advantages("reinforce", rewards, mask, kl=torch.zeros(4, 3), kl_coef=-1.0)


def test_reward_clip_after_the_baseline_follows_openrlhf_order():
    # rewards [0, 0, 0, 100], one group of 4, reinforce_baseline (r - mean):
    #   clipped before the baseline into [-10, 10]: [0, 0, 0, 10] - 2.5 = [-2.5, -2.5, -2.5, 7.5]
    #   clipped after it:                          [-25, -25, -25, 75] -> [-10, -10, -10, 10]
    rewards = torch.tensor([0.0, 0.0, 0.0, 100.0])
    mask = torch.ones(4, 1)
    before = compute_advantages("reinforce_baseline", rewards.clamp(-10.0, 10.0), mask, n_samples_per_prompt=4)
    after = compute_advantages("reinforce_baseline", rewards, mask, n_samples_per_prompt=4,
                               clip_after_baseline=(-10.0, 10.0))
    assert before.sequence_rewards.tolist() == [-2.5, -2.5, -2.5, 7.5]
    assert after.sequence_rewards.tolist() == [-10.0, -10.0, -10.0, 10.0]


def test_without_std_norm_the_whitened_estimators_are_only_centred():
    """OpenRLHF --no_advantage_std_norm: A <- A - mean over action tokens, for gae, reinforce and reinforce_baseline;
    the group estimators rloo, group_norm and dr_grpo are not whitened either way."""
    mask = torch.tensor([[1, 1], [1, 0]])
    rewards = torch.tensor([3.0, 0.0], dtype=torch.float64)
    # reinforce, gamma 1: returns [[3, 3], [0, 0]]; action-token mean (3 + 3 + 0) / 3 = 2, population var 2
    centred = compute_advantages("reinforce", rewards, mask, advantage_std_norm=False)
    torch.testing.assert_close(centred.advantages, torch.tensor([[1.0, 1.0], [-2.0, 0.0]], dtype=torch.float64))
    whitened = compute_advantages("reinforce", rewards, mask)
    torch.testing.assert_close(whitened.advantages, centred.advantages / math.sqrt(2.0))
    # reinforce_baseline, one group of 2: r - mean = [1.5, -1.5] -> tokens [[1.5, 1.5], [-1.5, 0]], mean 0.5
    baseline = compute_advantages("reinforce_baseline", rewards, mask, n_samples_per_prompt=2,
                                  advantage_std_norm=False)
    torch.testing.assert_close(baseline.advantages, torch.tensor([[1.0, 1.0], [-2.0, 0.0]], dtype=torch.float64))
    # gae with zero values, gamma = lambda = 1: A = returns, centred the same way
    gae = compute_advantages("gae", rewards, mask, values=torch.zeros(2, 2, dtype=torch.float64),
                             advantage_std_norm=False)
    torch.testing.assert_close(gae.advantages, torch.tensor([[1.0, 1.0], [-2.0, 0.0]], dtype=torch.float64))
    for estimator in ("rloo", "group_norm", "dr_grpo"):
        plain = compute_advantages(estimator, rewards, mask, n_samples_per_prompt=2)
        assert torch.equal(compute_advantages(estimator, rewards, mask, n_samples_per_prompt=2,
                                              advantage_std_norm=False).advantages, plain.advantages)
