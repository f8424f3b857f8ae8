"""Micro-batch layouts, token-budget grouping, loss weights and the response layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.training.batching import (
    TokenSample,
    group_by_token_budget,
    loss_units,
    loss_weights,
    make_micro_batches,
    pad_micro_batch_count,
    response_token_index,
    scatter_to_samples,
)


def sample(prompt, response, action_mask=None, **tensors):
    return TokenSample(prompt_ids=torch.tensor(prompt), response_ids=torch.tensor(response),
                       action_mask=None if action_mask is None else torch.tensor(action_mask),
                       response_tensors={k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()})


def two_samples():
    return [sample([5, 6, 7], [8, 9], adv=[1.0, 2.0]),
            sample([10], [11, 12, 13], action_mask=[True, False, True], adv=[3.0, 4.0, 5.0])]


def test_padded_layout_matches_hand_built_tensors():
    (batch,) = make_micro_batches(two_samples(), micro_batch_size=2, packing=False, pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 13, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert batch.response_rows.tolist() == [0, 1]
    assert batch.response_starts.tolist() == [3, 1]
    assert batch.response_lengths.tolist() == [2, 3]
    assert batch.action_mask.tolist() == [[True, True, False], [True, False, True]]
    assert batch.response_tensors["adv"].tolist() == [[1.0, 2.0, 0.0], [3.0, 4.0, 5.0]]
    assert batch.response_mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.num_action_tokens == 4 and batch.num_samples == 2 and not batch.packed


def test_packed_layout_restarts_positions_per_sample():
    (batch,) = make_micro_batches(two_samples(), micro_batch_size=2, packing=True)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert batch.attention_mask is None and batch.packed
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert batch.response_rows.tolist() == [0, 0]
    assert batch.response_starts.tolist() == [3, 6]
    # The response layout does not depend on the input layout.
    assert batch.action_mask.tolist() == [[True, True, False], [True, False, True]]


@pytest.mark.parametrize("packing", [False, True])
def test_response_token_index_points_at_the_response_tokens(packing):
    samples = two_samples()
    (batch,) = make_micro_batches(samples, micro_batch_size=2, packing=packing)
    rows, columns, sample_index, offset = response_token_index(batch)
    tokens = batch.input_ids[rows, columns]
    expected = torch.cat([s.response_ids for s in samples])
    assert torch.equal(tokens, expected)
    assert sample_index.tolist() == [0, 0, 1, 1, 1] and offset.tolist() == [0, 1, 0, 1, 2]


def test_fixed_micro_batch_size_keeps_order_and_splits_the_rest():
    samples = [sample([1], [2] * n) for n in range(1, 6)]
    batches = make_micro_batches(samples, micro_batch_size=2)
    assert [b.sample_indices.tolist() for b in batches] == [[0, 1], [2, 3], [4]]


def test_first_fit_decreasing_hand_example():
    # lengths 7, 5, 4, 3, 1 with budget 8 packed: 7 -> A; 5 -> B; 4 -> C (B would be 9); 3 -> B (8); 1 -> A (8).
    assert group_by_token_budget([4, 7, 1, 5, 3], 8, packing=True) == [[1, 2], [3, 4], [0]]
    # Padded cost is rows x longest: 7 alone (2x7 > 8); 5 alone; 4+3 (2x4 = 8); 1 fits nowhere else.
    assert group_by_token_budget([4, 7, 1, 5, 3], 8, packing=False) == [[1], [3], [0, 4], [2]]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), budget=st.integers(40, 120),
       packing=st.booleans())
def test_token_budget_groups_cover_every_sample_once_within_budget(lengths, budget, packing):
    groups = group_by_token_budget(lengths, budget, packing=packing)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        cost = sum(lengths[i] for i in group) if packing else len(group) * max(lengths[i] for i in group)
        assert cost <= budget
    assert groups == group_by_token_budget(lengths, budget, packing=packing)  # deterministic
    # First-fit never leaves two groups that could have been one when packing.
    if packing:
        sums = sorted(sum(lengths[i] for i in g) for g in groups)
        assert len(sums) < 2 or sums[0] + sums[1] > budget


def test_token_budget_names_a_sample_that_cannot_fit():
    with pytest.raises(ValueError, match="sample 1 has 9 tokens, more than max_tokens_per_microbatch=8"):
        group_by_token_budget([3, 9], 8, packing=True)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="exactly one of micro_batch_size and max_tokens_per_microbatch"):
        make_micro_batches(two_samples())
    with pytest.raises(ValueError, match="prompt_ids must hold at least one token"):
        TokenSample(prompt_ids=torch.tensor([], dtype=torch.long), response_ids=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"response_tensors\['adv'\] must have shape \(2,\)"):
        sample([1], [2, 3], adv=[1.0])
    with pytest.raises(ValueError, match=r"action_mask must have shape \(2,\)"):
        sample([1], [2, 3], action_mask=[True])
    mixed = [sample([1], [2], adv=[1.0]), sample([1], [2])]
    with pytest.raises(ValueError, match="sample 1 has response_tensors"):
        make_micro_batches(mixed, micro_batch_size=2)


def test_loss_weights_make_the_mean_over_all_units():
    samples = [sample([1], [2] * n) for n in (1, 2, 3, 4)]
    batches = make_micro_batches(samples, micro_batch_size=2)  # 3 tokens, 7 tokens
    padded = pad_micro_batch_count(batches, 3)
    assert padded[2].is_padding and loss_units(padded[2], "token") == 0
    # One rank of two, 10 of 20 global tokens: weight = tokens x dp_size / global tokens.
    assert loss_weights(padded, "token", global_units=20, dp_size=2) == [3 * 2 / 20, 7 * 2 / 20, 0.0]
    assert loss_weights(padded, "sample", global_units=8, dp_size=2) == [0.5, 0.5, 0.0]
    assert loss_weights(padded, "micro_batch", global_units=4, dp_size=2) == [0.5, 0.5, 0.0]
    with pytest.raises(ValueError, match="no token units"):
        loss_weights(padded, "token", global_units=0, dp_size=2)


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=12), budget=st.integers(20, 40),
       packing=st.booleans())
def test_scatter_to_samples_returns_each_sample_in_order(lengths, budget, packing):
    samples = [sample([7, 7], list(range(1, n + 1)), value=[float(i * 100 + j) for j in range(n)])
               for i, n in enumerate(lengths)]
    batches = pad_micro_batch_count(make_micro_batches(samples, max_tokens_per_microbatch=budget, packing=packing),
                                    len(lengths) + 2)
    per_sample = scatter_to_samples(batches, [b.response_tensors["value"] for b in batches], len(samples))
    for i, values in enumerate(per_sample):
        assert values.tolist() == [float(i * 100 + j) for j in range(lengths[i])]


def test_response_layout_moves_to_the_model_device():
    from hpc_rlhf.training.batching import TokenSample, make_micro_batches

    sample = TokenSample(prompt_ids=torch.tensor([1, 2]), response_ids=torch.tensor([3, 4, 5]),
                         response_tensors={"advantages": torch.ones(3)})
    (batch,) = make_micro_batches([sample], micro_batch_size=1)
    moved = batch.response_layout_to("meta")
    assert moved.action_mask.device.type == moved.response_lengths.device.type == "meta"
    assert moved.response_tensors["advantages"].device.type == "meta"
    assert moved.response_mask.device.type == "meta"
    assert moved.input_ids.device.type == "cpu"  # model inputs move with the forward pass, not here
