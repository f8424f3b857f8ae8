"""KL estimators, the KL loss term and the KL coefficient controllers."""

from __future__ import annotations

import math

import pytest
import torch

from hpc_rlhf.algos.kl import (
    AdaptiveKLController,
    FixedKLController,
    build_kl_controller,
    compute_kl,
    kl_loss,
)


def test_estimators_by_hand():
    log_p = torch.tensor([math.log(0.5)], dtype=torch.float64)
    log_ref = torch.tensor([math.log(0.25)], dtype=torch.float64)
    log2 = math.log(2.0)
    assert compute_kl(log_p, log_ref, "k1").item() == pytest.approx(log2)
    assert compute_kl(log_p, log_ref, "k2").item() == pytest.approx(log2**2 / 2)
    # k3 = ref/p - 1 - log(ref/p) = 0.5 - 1 + log 2
    assert compute_kl(log_p, log_ref, "k3").item() == pytest.approx(0.5 - 1 + log2)
    assert compute_kl(log_p, log_ref, "k3", log_ratio_clamp=0.1).item() == pytest.approx(math.exp(-0.1) - 1 + 0.1)


@pytest.mark.parametrize("seed", range(5))
def test_k1_and_k3_are_exactly_unbiased_and_k2_k3_nonnegative(seed):
    """Sum over the whole vocabulary of p(a) * k(a) is KL(p || ref) for k1 and k3."""
    generator = torch.Generator().manual_seed(seed)
    log_p = torch.log_softmax(torch.randn(11, generator=generator, dtype=torch.float64), dim=0)
    log_ref = torch.log_softmax(torch.randn(11, generator=generator, dtype=torch.float64), dim=0)
    exact = sum(math.exp(a) * (a - b) for a, b in zip(log_p.tolist(), log_ref.tolist()))
    for estimator in ("k1", "k3"):
        assert (log_p.exp() * compute_kl(log_p, log_ref, estimator)).sum().item() == pytest.approx(exact)
    for estimator in ("k2", "k3"):
        assert torch.all(compute_kl(log_p, log_ref, estimator) >= 0)
        assert torch.all(compute_kl(log_p, log_p, estimator) == 0)


def test_kl_loss_is_masked_mean_and_k2_gradient_is_log_ratio():
    log_p = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    log_ref = torch.tensor([[-1.5, -1.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    loss = kl_loss(log_p, log_ref, mask, kl_estimator="k2")
    assert loss.item() == pytest.approx((0.5**2 / 2 + 1.0 / 2) / 2)
    loss.backward()
    torch.testing.assert_close(log_p.grad, torch.tensor([[0.25, -0.5, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="kl_estimator"):
        compute_kl(log_p, log_ref, "k4")


def test_adaptive_controller_by_hand_and_resume():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(12.0, n_steps=1000)  # error clipped to +0.2 -> * 1.02
    assert controller.value == pytest.approx(0.102)
    controller.update(5.4, n_steps=500)  # error -0.1 -> * (1 - 0.005)
    assert controller.value == pytest.approx(0.102 * 0.995)
    resumed = AdaptiveKLController(0.5, target=1.0, horizon=1)
    resumed.load_state_dict(controller.state_dict())
    controller.update(3.0, 64)
    resumed.update(3.0, 64)
    assert resumed.value == controller.value


def test_fixed_controller_and_builder():
    fixed = build_kl_controller(0.05)
    assert isinstance(fixed, FixedKLController)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05
    assert isinstance(build_kl_controller(0.05, kl_target=1.0, kl_horizon=100), AdaptiveKLController)
    with pytest.raises(ValueError, match="init_kl_coef"):
        build_kl_controller(-0.1)
    with pytest.raises(ValueError, match="kl_target"):
        build_kl_controller(0.1, kl_target=0.0)


def test_kl_clamp_bounds_the_estimate():
    # k3 of log r = -3 is e^3 - 1 - 3 = 16.0855; kl_clamp=10 caps it; k1 of -12 is floored at -10
    log_probs = torch.tensor([[-3.0, -12.0, 0.5]])
    ref = torch.zeros(1, 3)
    k3 = compute_kl(log_probs, ref, "k3")
    assert k3[0, 0].item() == pytest.approx(math.exp(3.0) - 4.0, rel=1e-6)
    assert compute_kl(log_probs, ref, "k3", kl_clamp=10.0)[0, 0].item() == 10.0
    k1 = compute_kl(log_probs, ref, "k1", kl_clamp=10.0)
    assert k1.tolist() == [[-3.0, -10.0, 0.5]]
