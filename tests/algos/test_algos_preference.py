"""Preference losses: reward-model pairwise loss, DPO, cDPO, IPO and KTO against hand values and float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.algos.preference import (
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_reference_kl,
    mismatched_completion_indices,
    pairwise_rm_loss,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_rm_losses_by_hand():
    chosen = torch.tensor([2.0, 0.0], dtype=torch.float64)
    rejected = torch.tensor([1.0, 1.0], dtype=torch.float64)
    expected = -(log_sigmoid(1.0) + log_sigmoid(-1.0)) / 2
    assert pairwise_rm_loss(chosen, rejected).item() == pytest.approx(expected)
    assert pairwise_rm_loss(chosen, rejected, loss_type="logexp").item() == pytest.approx(
        (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(1.0))) / 2
    )
    margin = torch.tensor([0.5, 0.5], dtype=torch.float64)
    expected_margin = -(log_sigmoid(0.5) + log_sigmoid(-1.5)) / 2
    assert pairwise_rm_loss(chosen, rejected, margin=margin).item() == pytest.approx(expected_margin)
    with pytest.raises(ValueError, match="loss_type"):
        pairwise_rm_loss(chosen, rejected, loss_type="hinge")


@settings(max_examples=50, deadline=None)
@given(
    logps=st.lists(st.floats(-50, 0), min_size=4, max_size=4),
    beta=st.floats(0.01, 2.0),
    smoothing=st.floats(0.0, 0.5),
)
def test_dpo_is_log_sigmoid_of_the_margin_and_cdpo_mixes_both_sides(logps, beta, smoothing):
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in logps)
    margin = (logps[0] - logps[2]) - (logps[1] - logps[3])
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert out.loss.item() == pytest.approx(-log_sigmoid(beta * margin), rel=1e-9, abs=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(beta * (logps[0] - logps[2]))
    assert out.rejected_rewards.item() == pytest.approx(beta * (logps[1] - logps[3]))
    smoothed = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=smoothing).loss.item()
    expected = -(1 - smoothing) * log_sigmoid(beta * margin) - smoothing * log_sigmoid(-beta * margin)
    assert smoothed == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_dpo_gradient_and_errors():
    pc = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5], dtype=torch.float64)
    loss = dpo_loss(pc, pr, ref, ref, beta=0.1).loss
    loss.backward()
    # d/dpc -log sigmoid(beta h) = -beta sigmoid(-beta h), h = 1
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.1)))
    assert pr.grad.item() == pytest.approx(0.1 / (1 + math.exp(0.1)))
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, ref, ref, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, ref, ref, beta=0.1, label_smoothing=0.7)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(pc, pr, torch.zeros(2), ref, beta=0.1)


def test_ipo_by_hand():
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.0, -2.0]), torch.tensor([-1.0, -2.0])
    # h = [-1 - (-1)] - [-2 - (-1)] = 1 and [-3 + 2] - [-1 + 2] = -2; target 1 / (2 * 0.25) = 2
    assert ipo_loss(pc, pr, rc, rr, beta=0.25).loss.item() == pytest.approx(((1 - 2) ** 2 + (-2 - 2) ** 2) / 2)


@pytest.mark.parametrize("seed", range(4))
def test_kto_matches_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    pc, rc = -torch.rand(2, 5, generator=generator, dtype=torch.float64) * 10
    pr, rr = -torch.rand(2, 3, generator=generator, dtype=torch.float64) * 10
    policy_kl, ref_kl = -torch.rand(2, 8, generator=generator, dtype=torch.float64) * 10
    beta, wd, wu = 0.1, 1.0, 1.33
    z = max(sum(a - b for a, b in zip(policy_kl.tolist(), ref_kl.tolist())) / 8, 0.0)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    terms = [wd * (1 - sigmoid(beta * (a - b - z))) for a, b in zip(pc.tolist(), rc.tolist())]
    terms += [wu * (1 - sigmoid(beta * (z - (a - b)))) for a, b in zip(pr.tolist(), rr.tolist())]
    out = kto_loss(
        pc, pr, rc, rr, kto_reference_kl(policy_kl, ref_kl), beta=beta, desirable_weight=wd, undesirable_weight=wu
    )
    assert out.loss.item() == pytest.approx(sum(terms) / len(terms))
    assert out.reference_kl.item() == pytest.approx(z)


def test_kto_clamps_reference_point_and_allows_one_sided_batches():
    chosen = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    empty = torch.zeros(0, dtype=torch.float64)
    out = kto_loss(chosen, empty, zero, empty, torch.tensor(-3.0), beta=1.0)
    assert out.reference_kl.item() == 0.0
    assert out.loss.item() == pytest.approx(1 - 1 / (1 + math.exp(-0.5)))
    with pytest.raises(ValueError, match="at least one"):
        kto_loss(empty, empty, empty, empty, torch.tensor(0.0), beta=1.0)


def test_mismatched_indices_never_pair_a_sample_with_itself():
    indices = mismatched_completion_indices(5)
    assert sorted(indices.tolist()) == list(range(5))
    assert all(i != j for i, j in enumerate(indices.tolist()))
    with pytest.raises(ValueError, match="at least 2"):
        mismatched_completion_indices(1)
