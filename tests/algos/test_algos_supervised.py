"""SFT with packed sequences, PRM step loss and distillation loss against hand values and float64 references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hpc_rlhf.algos.supervised import (
    IGNORE_INDEX,
    kd_loss,
    next_token_targets,
    packed_sample_ids,
    prm_loss,
    sft_loss,
    token_log_probs,
)

MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def test_next_token_targets_stop_at_sample_boundaries():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    assert next_token_targets(ids).tolist() == [[6, 7, 8, 9, IGNORE_INDEX]]
    assert next_token_targets(ids, positions).tolist() == [[6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]
    assert packed_sample_ids(torch.tensor([[0, 1, 0, 1, 2], [1, 2, 0, 0, 1]])).tolist() == [
        [0, 0, 1, 1, 1],
        [2, 2, 3, 4, 4],
    ]


def test_token_log_probs_against_reference():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[1, 0, IGNORE_INDEX], [3, 2, 1]])
    result = token_log_probs(logits, labels)
    for i in range(2):
        for t in range(3):
            row = logits[i, t].tolist()
            log_z = math.log(sum(math.exp(v) for v in row))
            expected = 0.0 if labels[i, t] == IGNORE_INDEX else row[labels[i, t]] - log_z
            assert result[i, t].item() == pytest.approx(expected)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(2, 7), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_sft_loss_equals_padded_loss(lengths, seed):
    """The same samples, packed back to back in one row or padded one per row, give the same loss in every mode."""
    generator = torch.Generator().manual_seed(seed)
    vocab, width = 7, max(lengths)
    samples = [torch.randint(0, vocab, (n,), generator=generator) for n in lengths]
    logits = [torch.randn(n, vocab, generator=generator, dtype=torch.float64) for n in lengths]
    prompt_lengths = [int(torch.randint(1, n, (1,), generator=generator)) for n in lengths]

    def response_mask(n: int, prompt: int, size: int) -> torch.Tensor:
        """Position t is trained when it predicts a response token t + 1 of the sample."""
        t = torch.arange(size)
        return ((t + 1 >= prompt) & (t + 1 < n)).long()

    padded_ids = torch.stack([torch.cat([s, torch.zeros(width - len(s), dtype=torch.long)]) for s in samples])
    padded_logits = torch.stack(
        [torch.cat([z, torch.full((width - len(z), vocab), 99.0, dtype=torch.float64)]) for z in logits]
    )
    padded_mask = torch.stack([response_mask(n, p, width) for n, p in zip(lengths, prompt_lengths)])
    padded_log_probs = token_log_probs(padded_logits, next_token_targets(padded_ids))

    packed_ids = torch.cat(samples).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    packed_logits = torch.cat(logits).unsqueeze(0)
    targets = next_token_targets(packed_ids, positions)
    packed_mask = torch.cat([response_mask(n, p, n) for n, p in zip(lengths, prompt_lengths)]).unsqueeze(0)
    assert torch.all(targets[packed_mask.bool()] != IGNORE_INDEX)
    packed_log_probs = token_log_probs(packed_logits, targets)

    for mode in MODES:
        padded = sft_loss(padded_log_probs, padded_mask, loss_agg_mode=mode, norm_length=9)
        packed = sft_loss(packed_log_probs, packed_mask, position_ids=positions, loss_agg_mode=mode, norm_length=9)
        torch.testing.assert_close(packed, padded)


def test_sft_loss_by_hand():
    log_probs = torch.log(torch.tensor([[0.5, 0.25, 0.9]], dtype=torch.float64))
    mask = torch.tensor([[1, 1, 0]])
    assert sft_loss(log_probs, mask).item() == pytest.approx((math.log(2) + math.log(4)) / 2)
    with pytest.raises(ValueError, match="norm_length"):
        sft_loss(log_probs, mask, position_ids=torch.tensor([[0, 1, 2]]), loss_agg_mode="seq_mean_token_sum_norm")


def test_prm_loss_hard_and_soft_labels_by_hand():
    placeholder, good, bad = 9, 3, 4
    input_ids = torch.tensor([[1, 9, 2, 9, 9]])
    logits = torch.zeros(1, 5, 10, dtype=torch.float64)
    logits[0, 1, good] = math.log(3.0)  # P(good) = 3/4 over {good, bad}
    logits[0, 3, bad] = math.log(3.0)  # P(good) = 1/4
    labels = torch.tensor([[IGNORE_INDEX, good, IGNORE_INDEX, good, IGNORE_INDEX]])
    loss, accuracy = prm_loss(logits, input_ids, labels, placeholder_token_id=placeholder, reward_token_ids=[good, bad])
    assert loss.item() == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2)
    assert accuracy.item() == 0.5
    soft = torch.tensor([[IGNORE_INDEX, 1.0, IGNORE_INDEX, 0.5, IGNORE_INDEX]], dtype=torch.float64)
    soft_loss, _ = prm_loss(logits, input_ids, soft, placeholder_token_id=placeholder, reward_token_ids=[good, bad])
    second = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_loss.item() == pytest.approx((-math.log(0.75) + second) / 2)
    with pytest.raises(ValueError, match="reward_token_ids"):
        prm_loss(
            logits, input_ids, labels.masked_fill(labels == good, 5), placeholder_token_id=9, reward_token_ids=[3, 4]
        )
    with pytest.raises(ValueError, match="no labelled step"):
        prm_loss(logits, input_ids, torch.full_like(labels, IGNORE_INDEX), placeholder_token_id=9)


def test_kd_loss_against_reference_and_entropy_identity():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 2, 3, 6, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    total = 0.0
    for i in range(2):
        for t in range(3):
            if mask[i, t]:
                s, q = student[i, t].tolist(), teacher[i, t].tolist()
                log_zs, log_zq = math.log(sum(map(math.exp, s))), math.log(sum(map(math.exp, q)))
                total += -sum(math.exp(b - log_zq) * (a - log_zs) for a, b in zip(s, q))
    assert kd_loss(student, teacher, mask).item() == pytest.approx(total / 4)
    # against itself the cross-entropy is the teacher's entropy
    probs = torch.softmax(teacher, dim=-1)
    entropy = -(probs * probs.log()).sum(-1)
    assert kd_loss(teacher, teacher, mask).item() == pytest.approx(entropy[mask.bool()].mean().item())
    student_with_inf = student.clone()
    student_with_inf[..., 0] = -float("inf")
    assert math.isfinite(kd_loss(student_with_inf, teacher, mask).item())
