"""Masked reductions, whitening and the four loss aggregation modes against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.algos.masked import aggregate_loss, masked_mean, masked_sum, masked_var, masked_whiten

LOSSES = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0], [5.0, 6.0, 0.0, 0.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])


def test_masked_reductions_by_hand():
    values = torch.tensor([[1.0, float("nan")], [3.0, 5.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert masked_sum(values, mask).item() == 9.0
    assert masked_mean(values, mask).item() == 3.0
    assert torch.equal(masked_mean(values, mask, dim=-1), torch.tensor([1.0, 4.0]))
    # population variance of 1, 3, 5 = 8/3
    assert masked_var(values, mask).item() == pytest.approx(8.0 / 3.0)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_nan_under_mask_gives_finite_gradient():
    values = torch.tensor([[1.0, float("inf")], [2.0, float("nan")]], requires_grad=True)
    mask = torch.tensor([[1, 0], [1, 0]])
    masked_mean(values, mask).backward()
    assert torch.equal(values.grad, torch.tensor([[0.5, 0.0], [0.5, 0.0]]))


def test_aggregation_modes_by_hand():
    # token sums per row: 6, 4, 11 over 3, 1, 2 tokens; 6 tokens, 3 sequences
    assert aggregate_loss(LOSSES, MASK, "token_mean").item() == pytest.approx(21.0 / 6.0)
    assert aggregate_loss(LOSSES, MASK, "seq_mean_token_sum").item() == pytest.approx(21.0 / 3.0)
    assert aggregate_loss(LOSSES, MASK, "seq_mean_token_mean").item() == pytest.approx((2.0 + 4.0 + 5.5) / 3.0)
    assert aggregate_loss(LOSSES, MASK, "seq_mean_token_sum_norm").item() == pytest.approx(21.0 / 3.0 / 4.0)
    assert aggregate_loss(LOSSES, MASK, "seq_mean_token_sum_norm", norm_length=10).item() == pytest.approx(0.7)


def test_aggregation_skips_empty_sequences_and_uses_global_denominators():
    mask = MASK.clone()
    mask[1] = 0
    assert aggregate_loss(LOSSES, mask, "seq_mean_token_mean").item() == pytest.approx((2.0 + 5.5) / 2.0)
    assert aggregate_loss(LOSSES, MASK, "token_mean", num_tokens=12).item() == pytest.approx(21.0 / 12.0)
    assert aggregate_loss(LOSSES, MASK, "seq_mean_token_sum", num_seqs=6).item() == pytest.approx(21.0 / 6.0)
    # Summing micro-batch results with global denominators gives the whole-batch loss.
    whole = aggregate_loss(LOSSES, MASK, "seq_mean_token_mean")
    parts = sum(aggregate_loss(LOSSES[i : i + 1], MASK[i : i + 1], "seq_mean_token_mean", num_seqs=3) for i in range(3))
    assert parts.item() == pytest.approx(whole.item())


def test_aggregation_of_nothing_is_zero_with_graph():
    losses = torch.ones(2, 3, requires_grad=True)
    for mode in ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm"):
        result = aggregate_loss(losses, torch.zeros(2, 3), mode)
        assert result.item() == 0.0
        result.backward()


def test_aggregation_rejects_bad_input():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate_loss(LOSSES, MASK, "token_sum")
    with pytest.raises(ValueError, match="shape"):
        aggregate_loss(LOSSES, MASK[:, :2], "token_mean")


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(-50, 50), min_size=2, max_size=24),
    st.integers(0, 2**31 - 1),
)
def test_whiten_has_zero_mean_unit_variance_on_mask(values, seed):
    x = torch.tensor(values, dtype=torch.float64).reshape(1, -1)
    generator = torch.Generator().manual_seed(seed)
    mask = (torch.rand(x.shape, generator=generator) < 0.6).long()
    mask[0, 0] = 1
    mask[0, -1] = 1
    selected = x[mask.bool()]
    white = masked_whiten(x, mask)
    assert torch.all(white[~mask.bool()] == 0)
    var = selected.var(unbiased=False).item()
    expected = (selected - selected.mean()) / math.sqrt(max(var, 1e-8))
    torch.testing.assert_close(white[mask.bool()], expected)
    centred_only = masked_whiten(x, mask, std_norm=False)
    torch.testing.assert_close(centred_only[mask.bool()], selected - selected.mean())
