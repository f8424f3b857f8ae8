"""Supervised losses: SFT next-token loss (padded or packed), process-reward-model step loss, knowledge distillation.

Packed rows hold several samples back to back; `position_ids` restart at 0 where a sample starts. Two things then
matter for the loss: the last token of one sample must not be trained to predict the first token of the next
(`next_token_targets`), and sequence-level averages must be taken per sample, not per row (`aggregate_packed_loss`).
With both, the packed loss equals the loss of the same samples padded one per row.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hpc_rlhf.algos.masked import LOSS_AGG_MODES, aggregate_loss, as_compute_dtype, check_same_shape

IGNORE_INDEX = -100


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """log softmax(logits)[label] per position ([..., V] and [...] -> [...]), float32; 0 where label == ignore_index."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    log_probs = torch.log_softmax(as_compute_dtype(logits), dim=-1)
    picked = log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def next_token_targets(
    input_ids: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Labels for causal LM training: target[t] = input_ids[t + 1], ignore_index at each row's end.

    With packed `position_ids`, also ignore_index where position_ids[t + 1] == 0 (token t ends a sample, t + 1 starts
    the next one). Combine with the caller's loss mask (prompt tokens, padding) as usual.
    """
    targets = torch.full_like(input_ids, ignore_index)
    targets[..., :-1] = input_ids[..., 1:]
    if position_ids is not None:
        check_same_shape("position_ids", position_ids, "input_ids", input_ids)
        sample_starts_next = torch.zeros_like(input_ids, dtype=torch.bool)
        sample_starts_next[..., :-1] = position_ids[..., 1:] == 0
        targets = torch.where(sample_starts_next, torch.full_like(targets, ignore_index), targets)
    return targets


def packed_sample_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Index of the sample each token belongs to, numbered across all rows in order (same shape as position_ids).

    A sample starts wherever position_ids == 0 (and at the start of every row).
    """
    starts = position_ids == 0
    starts[..., 0] = True
    return starts.reshape(-1).long().cumsum(0).reshape(position_ids.shape) - 1


def aggregate_packed_loss(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    position_ids: torch.Tensor,
    loss_agg_mode: str = "token_mean",
    *,
    norm_length: Optional[int] = None,
    num_tokens: Optional[float | torch.Tensor] = None,
    num_seqs: Optional[float | torch.Tensor] = None,
) -> torch.Tensor:
    """masked.aggregate_loss for packed rows: the sequences of the seq_* modes are the packed samples, not the rows.

    seq_mean_token_sum_norm needs `norm_length` here (a packed row's length says nothing about samples).
    """
    check_same_shape("mask", mask, "token_losses", token_losses)
    check_same_shape("position_ids", position_ids, "token_losses", token_losses)
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if loss_agg_mode == "seq_mean_token_sum_norm" and (norm_length is None or norm_length <= 0):
        raise ValueError(f"seq_mean_token_sum_norm on packed rows needs a positive norm_length, got {norm_length}")
    losses = as_compute_dtype(token_losses).reshape(-1)
    on = mask.bool().reshape(-1)
    sample = packed_sample_ids(position_ids).reshape(-1)
    n_samples = sample.numel()  # an upper bound on the number of samples; unused slots stay empty
    selected = torch.where(on, losses, torch.zeros_like(losses))
    sums = torch.zeros(n_samples, dtype=losses.dtype, device=losses.device).index_add(0, sample, selected)
    counts = torch.zeros(n_samples, dtype=losses.dtype, device=losses.device).index_add(0, sample, on.to(losses.dtype))
    if loss_agg_mode == "token_mean":
        denominator = counts.sum() if num_tokens is None else num_tokens
        return selected.sum() / torch.as_tensor(denominator, dtype=losses.dtype, device=losses.device).clamp(min=1)
    if loss_agg_mode == "seq_mean_token_sum":
        per_sample = sums
    elif loss_agg_mode == "seq_mean_token_mean":
        per_sample = sums / counts.clamp(min=1)
    else:
        per_sample = sums / norm_length
    denominator = (counts > 0).sum() if num_seqs is None else num_seqs
    return per_sample.sum() / torch.as_tensor(denominator, dtype=losses.dtype, device=losses.device).clamp(min=1)


def sft_loss(
    log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    position_ids: Optional[torch.Tensor] = None,
    loss_agg_mode: str = "token_mean",
    norm_length: Optional[int] = None,
    num_tokens: Optional[float | torch.Tensor] = None,
    num_seqs: Optional[float | torch.Tensor] = None,
) -> torch.Tensor:
    """Negative log-likelihood of the target tokens: agg(-log p(y_t)) over tokens with loss_mask 1.

    `log_probs` are per-token target log-probs [R, N] (token_log_probs with next_token_targets). Pass `position_ids`
    for packed rows so that sequence-level modes average per sample. token_mean is OpenRLHF's default SFT loss.
    """
    check_same_shape("loss_mask", loss_mask, "log_probs", log_probs)
    if position_ids is None:
        return aggregate_loss(
            -log_probs, loss_mask, loss_agg_mode, norm_length=norm_length, num_tokens=num_tokens, num_seqs=num_seqs
        )
    return aggregate_packed_loss(
        -log_probs,
        loss_mask,
        position_ids,
        loss_agg_mode,
        norm_length=norm_length,
        num_tokens=num_tokens,
        num_seqs=num_seqs,
    )


def prm_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    placeholder_token_id: int,
    reward_token_ids: Optional[list[int]] = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Process-reward-model step loss and accuracy (OpenRLHF PRMLoss): cross-entropy at step-marker positions.

    Each reasoning step ends with `placeholder_token_id`; the logits [B, T, V] at that position classify the step,
    with the label given at the same position of `labels` [B, T] (ignore_index elsewhere or for unlabelled steps).
    Hard labels are token ids; with `reward_token_ids` (e.g. ids of "+" and "-") the softmax runs over those tokens
    only, otherwise over the vocabulary. Soft labels (a float tensor) give P(step is good) and need exactly two
    reward_token_ids [good, bad]: targets (p, 1 - p). Returns (mean cross-entropy, accuracy of the argmax).
    """
    check_same_shape("labels", labels, "input_ids", input_ids)
    if logits.shape[:-1] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match input_ids {tuple(input_ids.shape)}")
    at_step = (input_ids == placeholder_token_id) & (labels != ignore_index)
    if not at_step.any():
        raise ValueError(f"no labelled step: no position has input_id {placeholder_token_id} and a label")
    step_logits = as_compute_dtype(logits[at_step])
    step_labels = labels[at_step]
    if reward_token_ids is not None:
        step_logits = step_logits[:, list(reward_token_ids)]
    log_probs = torch.log_softmax(step_logits, dim=-1)

    if step_labels.is_floating_point():
        if reward_token_ids is None or len(reward_token_ids) != 2:
            raise ValueError(f"soft PRM labels need exactly two reward_token_ids [good, bad], got {reward_token_ids}")
        p_good = step_labels.to(log_probs.dtype)
        if ((p_good < 0) | (p_good > 1)).any():
            raise ValueError("soft PRM labels must be probabilities in [0, 1]")
        targets = torch.stack([p_good, 1.0 - p_good], dim=-1)
        loss = -(targets * log_probs).sum(dim=-1).mean()
        hard = (p_good < 0.5).long()
    else:
        hard = step_labels.long()
        if reward_token_ids is not None:
            matches = hard.unsqueeze(-1) == torch.tensor(list(reward_token_ids), device=hard.device)
            if not matches.any(dim=-1).all():
                unknown = sorted(set(hard[~matches.any(dim=-1)].tolist()))
                raise ValueError(f"PRM labels {unknown} are not among reward_token_ids {list(reward_token_ids)}")
            hard = matches.long().argmax(dim=-1)
        loss = F.nll_loss(log_probs, hard)
    accuracy = (log_probs.argmax(dim=-1) == hard).float().mean().detach()
    return loss, accuracy


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Knowledge distillation (OpenRLHF KDLoss, MiniLLM): mean over masked tokens of -sum_v p_T(v) log p_S(v).

    This is the forward KL(p_T || p_S) up to the teacher's entropy, which has no gradient. Vocabulary entries where
    the student logit is inf (masked-out tokens) contribute 0. Logits are [B, T, V], loss_mask [B, T].
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} differ"
        )
    if student_logits.shape[:-1] != loss_mask.shape:
        raise ValueError(f"loss_mask {tuple(loss_mask.shape)} does not match logits {tuple(student_logits.shape)}")
    teacher_probs = torch.softmax(as_compute_dtype(teacher_logits.detach()), dim=-1)
    student_log_probs = torch.log_softmax(as_compute_dtype(student_logits), dim=-1)
    products = teacher_probs * student_log_probs.to(teacher_probs.dtype)
    products = torch.where(torch.isinf(student_logits), torch.zeros_like(products), products)
    cross_entropy = -products.sum(dim=-1)
    mask = loss_mask.bool()
    return torch.where(mask, cross_entropy, torch.zeros_like(cross_entropy)).sum() / mask.sum().clamp(min=1)
