"""Value loss with and without clipping, by hand and against a float64 loop reference."""

from __future__ import annotations

import pytest
import torch

from hpc_rlhf.algos.value_loss import value_loss


def test_value_clipping_by_hand():
    values = torch.tensor([[1.5, 0.9]], dtype=torch.float64, requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    returns = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    loss, metrics = value_loss(values, old_values, returns, torch.ones(1, 2), value_clip=0.2)
    # token 0: clipped 1.2 -> (1.2 - 2)^2 = 0.64 > (1.5 - 2)^2 = 0.25; token 1: inside, (0.9)^2 = 0.81
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert metrics["value_clip_ratio"].item() == 0.5
    loss.backward()
    # token 0 uses the clipped value, whose gradient is 0; token 1: 0.5 * 2 * 0.9 / 2
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.45]], dtype=torch.float64))
    unclipped, metrics = value_loss(values, old_values, returns, torch.ones(1, 2), value_clip=None)
    assert unclipped.item() == pytest.approx(0.5 * (0.25 + 0.81) / 2)
    assert metrics == {}


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    values, old_values, returns = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    mask = (torch.rand(4, 5, generator=generator) < 0.7).long()
    mask[:, 0] = 1
    total, count = 0.0, 0
    for v, o, r, m in zip(
        values.flatten().tolist(), old_values.flatten().tolist(), returns.flatten().tolist(), mask.flatten().tolist()
    ):
        if m:
            clipped = o + min(max(v - o, -0.3), 0.3)
            total += 0.5 * max((v - r) ** 2, (clipped - r) ** 2)
            count += 1
    loss, _ = value_loss(values, old_values, returns, mask, value_clip=0.3)
    assert loss.item() == pytest.approx(total / count)
    with pytest.raises(ValueError, match="value_clip"):
        value_loss(values, old_values, returns, mask, value_clip=-1.0)
