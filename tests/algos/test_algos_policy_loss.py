"""Policy loss: a float64 loop reference over every option, hand cases for clipping, corrections, GSPO, entropy."""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.algos.policy_loss import entropy_bonus, entropy_from_logits, off_policy_weights, policy_loss


def reference_policy_loss(
    log_probs, old, advantages, mask, *, eps_low, eps_high, dual_clip, mode, loss_type, rollout, correction, low, high
):
    """Plain-Python PPO/GSPO loss with OpenRLHF's off-policy corrections; returns (loss, clip_ratio, approx_kl)."""
    batch, width = len(log_probs), len(log_probs[0])
    on = [[mask[i][t] == 1 for t in range(width)] for i in range(batch)]
    ratio = [[math.exp(log_probs[i][t] - old[i][t]) for t in range(width)] for i in range(batch)]
    if loss_type == "gspo":
        base = rollout if correction != "none" else old
        for i in range(batch):
            steps = [log_probs[i][t] - base[i][t] for t in range(width) if on[i][t]]
            s = math.exp(sum(steps) / len(steps))
            ratio[i] = [s] * width
        mode = "seq_mean_token_mean"
    losses = [[0.0] * width for _ in range(batch)]
    clipped_count, tokens = 0, 0
    for i, t in itertools.product(range(batch), range(width)):
        if not on[i][t]:
            continue
        a, r = advantages[i][t], ratio[i][t]
        surr1, surr2 = r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a
        objective = min(surr1, surr2)
        if dual_clip is not None and a < 0:
            objective = max(objective, dual_clip * a)
        weight = 1.0
        if correction != "none" and loss_type == "ppo":
            w = math.exp(old[i][t] - rollout[i][t])
            if correction == "tis":
                weight = min(max(w, low), high)
            elif correction == "icepop":
                weight = w if low <= w <= high else 0.0
            else:
                steps = [old[i][k] - rollout[i][k] for k in range(width) if on[i][k]]
                geometric = math.exp(sum(steps) / len(steps))
                weight = w if low <= geometric <= high else 0.0
        losses[i][t] = -objective * weight
        clipped_count += surr2 < surr1
        tokens += 1
    sums = [sum(losses[i][t] for t in range(width) if on[i][t]) for i in range(batch)]
    counts = [sum(on[i]) for i in range(batch)]
    if mode == "token_mean":
        loss = sum(sums) / sum(counts)
    elif mode == "seq_mean_token_sum":
        loss = sum(sums) / batch
    elif mode == "seq_mean_token_mean":
        loss = sum(s / c for s, c in zip(sums, counts)) / batch
    else:
        loss = sum(s / width for s in sums) / batch
    approx_kl = sum(old[i][t] - log_probs[i][t] for i in range(batch) for t in range(width) if on[i][t]) / tokens
    return loss, clipped_count / tokens, approx_kl


def random_inputs(seed: int, batch: int = 4, width: int = 6):
    generator = torch.Generator().manual_seed(seed)
    log_probs = -torch.rand(batch, width, generator=generator, dtype=torch.float64) * 3
    old = log_probs + 0.4 * torch.randn(batch, width, generator=generator, dtype=torch.float64)
    rollout = old + 0.5 * torch.randn(batch, width, generator=generator, dtype=torch.float64)
    advantages = torch.randn(batch, width, generator=generator, dtype=torch.float64)
    mask = (torch.rand(batch, width, generator=generator) < 0.7).long()
    mask[:, 0] = 1
    return log_probs, old, rollout, advantages, mask


@pytest.mark.parametrize("loss_type", ["ppo", "gspo"])
@pytest.mark.parametrize("correction", ["none", "tis", "icepop", "seq_mask_tis"])
@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_matches_reference(loss_type, correction, mode):
    seed = zlib.crc32(f"{loss_type}/{correction}/{mode}".encode()) % 1000
    log_probs, old, rollout, advantages, mask = random_inputs(seed)
    eps_low, eps_high = (0.2, 0.28) if loss_type == "ppo" else (3e-4, 4e-4)
    dual_clip = 3.0 if correction in ("none", "tis") else None
    loss, metrics = policy_loss(
        log_probs,
        old,
        advantages,
        mask,
        eps_clip_low=eps_low,
        eps_clip_high=eps_high,
        dual_clip=dual_clip,
        loss_agg_mode=mode,
        policy_loss_type=loss_type,
        rollout_log_probs=rollout,
        off_policy_correction=correction,
        is_low=0.5,
        is_high=1.6,
    )
    expected, clip_ratio, approx_kl = reference_policy_loss(
        log_probs.tolist(),
        old.tolist(),
        advantages.tolist(),
        mask.tolist(),
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        mode=mode,
        loss_type=loss_type,
        rollout=rollout.tolist(),
        correction=correction,
        low=0.5,
        high=1.6,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert metrics["clip_ratio"].item() == pytest.approx(clip_ratio)
    assert metrics["approx_kl"].item() == pytest.approx(approx_kl)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_ratio_one_gives_plain_policy_gradient(mode):
    log_probs, _, _, advantages, mask = random_inputs(7)
    log_probs.requires_grad_(True)
    loss, metrics = policy_loss(log_probs, log_probs.detach(), advantages, mask, loss_agg_mode=mode)
    on = mask.bool()
    count = on.sum()
    per_seq = on.sum(dim=-1, keepdim=True)
    if mode == "token_mean":
        expected_grad = -advantages / count
    elif mode == "seq_mean_token_mean":
        expected_grad = -advantages / per_seq / mask.shape[0]
    else:
        expected_grad = -advantages / mask.shape[0]
    expected_grad = torch.where(on, expected_grad, torch.zeros_like(expected_grad))
    loss.backward()
    torch.testing.assert_close(log_probs.grad, expected_grad)
    # with ratio 1 the loss is sum_t w_t * (-A_t), and its gradient is -w_t * A_t: the same sum
    assert loss.item() == pytest.approx(expected_grad.sum().item())
    assert metrics["clip_ratio"].item() == 0.0
    assert metrics["approx_kl"].item() == 0.0


@settings(max_examples=60, deadline=None)
@given(
    log_ratio=st.floats(-2, 2),
    advantage=st.floats(-5, 5).filter(lambda a: abs(a) > 1e-3),
    eps_low=st.floats(0.05, 0.5),
    eps_high=st.floats(0.05, 0.5),
)
def test_clipping_bounds_hold(log_ratio, advantage, eps_low, eps_high):
    """The gradient vanishes exactly where the ratio has left the trust region in the advantage's direction."""
    old = torch.tensor([[-1.0]], dtype=torch.float64)
    log_probs = (old + log_ratio).requires_grad_(True)
    a = torch.tensor([[advantage]], dtype=torch.float64)
    loss, _ = policy_loss(log_probs, old, a, torch.ones(1, 1), eps_clip_low=eps_low, eps_clip_high=eps_high)
    loss.backward()
    ratio = math.exp(log_ratio)
    outside = (advantage > 0 and ratio > 1 + eps_high) or (advantage < 0 and ratio < 1 - eps_low)
    if outside:
        assert log_probs.grad.item() == 0.0
        bound = (1 + eps_high) if advantage > 0 else (1 - eps_low)
        assert loss.item() == pytest.approx(-bound * advantage)
    else:
        assert log_probs.grad.item() == pytest.approx(-advantage * ratio)
        assert loss.item() == pytest.approx(-ratio * advantage)


def test_dual_clip_bounds_negative_advantage_loss():
    old = torch.zeros(1, 2, dtype=torch.float64)
    log_probs = torch.full((1, 2), math.log(10.0), dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    loss, metrics = policy_loss(log_probs, old, advantages, torch.ones(1, 2), dual_clip=3.0)
    # token 0: min(-10, -1.2) = -10, max(-10, -3) = -3 -> loss 3; token 1: clipped at 1.2 -> loss -1.2
    assert loss.item() == pytest.approx((3.0 - 1.2) / 2)
    assert metrics["dual_clip_ratio"].item() == 0.5
    loss.backward()
    assert torch.all(log_probs.grad == 0)
    plain, _ = policy_loss(log_probs, old, advantages, torch.ones(1, 2))
    assert plain.item() == pytest.approx((10.0 - 1.2) / 2)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(log_probs, old, advantages, torch.ones(1, 2), dual_clip=1.0)


def test_off_policy_weights_by_hand():
    rollout = torch.zeros(2, 3, dtype=torch.float64)
    old = torch.log(torch.tensor([[0.5, 1.5, 3.0], [4.0, 4.0, 9.0]], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    tis, tis_filtered = off_policy_weights(old, rollout, mask, "tis", 0.8, 2.0)
    torch.testing.assert_close(tis, torch.tensor([[0.8, 1.5, 2.0], [2.0, 2.0, 0.0]], dtype=torch.float64))
    assert tis_filtered.item() == pytest.approx(4 / 5)
    icepop, _ = off_policy_weights(old, rollout, mask, "icepop", 0.8, 2.0)
    torch.testing.assert_close(icepop, torch.tensor([[0.0, 1.5, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    # geometric means: (0.5 * 1.5 * 3) ** (1/3) = 1.31 kept; 4.0 dropped
    seq, seq_filtered = off_policy_weights(old, rollout, mask, "seq_mask_tis", 0.8, 2.0)
    torch.testing.assert_close(seq, torch.tensor([[0.5, 1.5, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
    assert seq_filtered.item() == 0.5


def test_gspo_with_uniform_token_ratios_equals_ppo_sequence_mean():
    log_probs, old, _, advantages, mask = random_inputs(3)
    per_sequence_shift = torch.tensor([[0.1], [-0.05], [0.0002], [0.3]], dtype=torch.float64)
    old = log_probs - per_sequence_shift
    advantages = advantages[:, :1].expand_as(advantages)
    gspo, _ = policy_loss(log_probs, old, advantages, mask, policy_loss_type="gspo", loss_agg_mode="token_mean")
    ppo, _ = policy_loss(log_probs, old, advantages, mask, loss_agg_mode="seq_mean_token_mean")
    assert gspo.item() == pytest.approx(ppo.item())


def test_garbage_under_mask_does_not_leak():
    log_probs, old, rollout, advantages, mask = random_inputs(11)
    clean, _ = policy_loss(log_probs, old, advantages, mask, rollout_log_probs=rollout, off_policy_correction="tis")
    dirty_log_probs = torch.where(mask.bool(), log_probs, torch.full_like(log_probs, float("inf")))
    dirty_log_probs.requires_grad_(True)
    dirty_advantages = torch.where(mask.bool(), advantages, torch.full_like(advantages, float("nan")))
    dirty, _ = policy_loss(
        dirty_log_probs, old, dirty_advantages, mask, rollout_log_probs=rollout, off_policy_correction="tis"
    )
    assert dirty.item() == pytest.approx(clean.item())
    dirty.backward()
    assert torch.isfinite(dirty_log_probs.grad).all()
    assert torch.all(dirty_log_probs.grad[mask == 0] == 0)


def test_entropy_by_hand_and_against_reference():
    uniform = torch.zeros(2, 3, 5)
    torch.testing.assert_close(entropy_from_logits(uniform), torch.full((2, 3), math.log(5)))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, generator=generator, dtype=torch.float64) * 3
    expected = [
        -sum(
            math.exp(z - math.log(sum(math.exp(v) for v in row))) * (z - math.log(sum(math.exp(v) for v in row)))
            for z in row
        )
        for row in logits.tolist()
    ]
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor(expected, dtype=torch.float64))
    bonus = entropy_bonus(torch.tensor([[1.0, 3.0]]), torch.ones(1, 2), entropy_loss_coef=0.01)
    assert bonus.item() == pytest.approx(-0.02)


def test_bad_input_is_named():
    log_probs, old, rollout, advantages, mask = random_inputs(0)
    with pytest.raises(ValueError, match="rollout_log_probs"):
        policy_loss(log_probs, old, advantages, mask, off_policy_correction="icepop")
    with pytest.raises(ValueError, match="policy_loss_type"):
        policy_loss(log_probs, old, advantages, mask, policy_loss_type="grpo")
    with pytest.raises(ValueError, match="off_policy_correction"):
        policy_loss(log_probs, old, advantages, mask, off_policy_correction="is")
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(log_probs, old, advantages[:, :2], mask)
    with pytest.raises(ValueError, match="is_low"):
        policy_loss(log_probs, old, advantages, mask, rollout_log_probs=rollout, off_policy_correction="tis", is_low=3)


def test_low_precision_inputs_are_computed_in_float32():
    log_probs, old, rollout, advantages, mask = random_inputs(5)
    exact, _ = policy_loss(log_probs, old, advantages, mask, rollout_log_probs=rollout, off_policy_correction="tis")
    half = [t.to(torch.bfloat16) for t in (log_probs, old, advantages, rollout)]
    loss, metrics = policy_loss(half[0], half[1], half[2], mask, rollout_log_probs=half[3], off_policy_correction="tis")
    assert loss.dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in metrics.values())
    assert loss.item() == pytest.approx(exact.item(), abs=0.05)


def test_log_ratio_clamp_bounds_a_stale_token_and_stops_its_gradient():
    # log-ratio 24 under advantage -1: unclamped rho = e^24 = 2.6e10 is the loss (min picks the unclipped term), with a
    # gradient of the same size; clamped at 20 the loss is e^20 and the clamp passes no gradient back.
    old = torch.zeros(1, 2)
    advantages = torch.full((1, 2), -1.0)
    mask = torch.tensor([[1.0, 0.0]])
    for clamp, expected_loss, expected_grad in ((None, math.exp(24.0), math.exp(24.0)), (20.0, math.exp(20.0), 0.0)):
        log_probs = torch.tensor([[24.0, 0.0]], requires_grad=True)
        loss, _ = policy_loss(log_probs, old, advantages, mask, log_ratio_clamp=clamp)
        loss.backward()
        assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
        assert log_probs.grad[0, 0].item() == pytest.approx(expected_grad, rel=1e-5)


def test_log_ratio_clamp_changes_nothing_inside_its_range():
    log_probs = torch.tensor([[0.3, -0.2, 1.5]], requires_grad=True)
    old = torch.tensor([[0.1, 0.1, 0.1]])
    advantages = torch.tensor([[1.0, -2.0, 0.5]])
    mask = torch.ones(1, 3)
    plain, _ = policy_loss(log_probs, old, advantages, mask)
    clamped, _ = policy_loss(log_probs, old, advantages, mask, log_ratio_clamp=20.0)
    assert torch.equal(plain, clamped)


def test_log_ratio_clamp_must_be_positive():
    ones = torch.ones(1, 1)
    with pytest.raises(ValueError, match="log_ratio_clamp must be > 0"):
        policy_loss(ones, ones, ones, ones, log_ratio_clamp=0.0)
