"""The policy-gradient loss: PPO clip (clip-higher, dual clip), GSPO's sequence ratio, off-policy corrections, entropy.

Per action token, with ratio rho_t = pi(a_t) / pi_old(a_t) and advantage A_t:

    ppo:        L_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)      (PPO; DAPO's clip-higher
                when eps_high > eps_low)
    dual clip:  for A_t < 0, L_t = -max(min(rho_t A_t, clip(rho_t) A_t), c A_t) with c = dual_clip > 1 (Ye et al.
                2020), which bounds the loss when rho_t is far above 1
    gspo:       rho_t is replaced by the sequence ratio s_i = exp(mean_{t in y_i}(log pi - log pi_old)) for every
                token of sequence i (Zheng et al. 2025, arXiv:2507.18071); the clip eps are then typically 3e-4/4e-4
                and the loss is averaged per sequence (seq_mean_token_mean) whatever `loss_agg_mode` says, as in
                the paper and OpenRLHF.

Off-policy correction between the generator (vLLM) and the trainer, w_t = pi_old(a_t) / pi_rollout(a_t) detached,
with the interval [is_low, is_high] (OpenRLHF's `vllm_is_correction_type`); the token loss becomes w_t * L_t:

    tis:          w_t clipped into [is_low, is_high]                          (truncated importance sampling)
    icepop:       w_t where is_low <= w_t <= is_high, else 0                  (tokens outside are dropped)
    seq_mask_tis: w_t when the sequence's geometric mean exp(mean_t log w_t) lies in [is_low, is_high], else 0

With gspo the correction is folded into the ratio instead, as OpenRLHF does: s_i is taken against pi_rollout.
The aggregated loss is agg_{loss_agg_mode}(L) (masked.aggregate_loss). With rho = 1 (first step on fresh samples)
and no clipping active, the loss is the plain policy-gradient loss -agg(A), with gradient -agg(A grad log pi).
"""

from __future__ import annotations

from typing import Optional

import torch

from hpc_rlhf.algos.masked import (
    aggregate_loss,
    as_compute_dtype,
    check_same_shape,
    masked_mean,
)

POLICY_LOSS_TYPES = ("ppo", "gspo")
OFF_POLICY_CORRECTIONS = ("none", "tis", "icepop", "seq_mask_tis")


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    eps_clip_low: float = 0.2,
    eps_clip_high: float = 0.2,
    dual_clip: Optional[float] = None,
    loss_agg_mode: str = "token_mean",
    policy_loss_type: str = "ppo",
    rollout_log_probs: Optional[torch.Tensor] = None,
    off_policy_correction: str = "none",
    is_low: float = 0.0,
    is_high: float = 2.0,
    norm_length: Optional[int] = None,
    num_tokens: Optional[float | torch.Tensor] = None,
    num_seqs: Optional[float | torch.Tensor] = None,
    log_ratio_clamp: Optional[float] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss over [B, T] action tokens (formulas in the module docstring) and detached metrics.

    log_ratio_clamp: bound the log-ratio (token or sequence) to [-c, c] before exponentiating (`algo.log_ratio_clamp`,
    20 as in OpenRLHF): a stale token with log-ratio 24 would otherwise have rho = 2.6e10 and, under a negative
    advantage, a gradient of that size; clamped, its ratio is e^20 and its gradient 0. None = off.

    log_probs: the trainer's current log pi (with grad); old_log_probs: log pi_old, the trainer's log-probs of the
    same tokens when the rollout was made; rollout_log_probs: the generator's log-probs (needed by a correction).
    norm_length / num_tokens / num_seqs go to masked.aggregate_loss. Metrics: clip_ratio (fraction of action tokens
    where the clipped term is the smaller one), approx_kl (mean of log pi_old - log pi, KL(pi_old || pi) by k1),
    dual_clip_ratio, and with a correction rollout_kl (mean of log pi_rollout - log pi_old) and is_filtered_ratio
    (fraction of tokens, or of sequences for seq_mask_tis, whose weight was clipped or dropped).
    """
    for name, tensor in (("old_log_probs", old_log_probs), ("advantages", advantages), ("action_mask", action_mask)):
        check_same_shape(name, tensor, "log_probs", log_probs)
    if policy_loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"policy_loss_type must be one of {POLICY_LOSS_TYPES}, got {policy_loss_type!r}")
    if off_policy_correction not in OFF_POLICY_CORRECTIONS:
        raise ValueError(
            f"off_policy_correction must be one of {OFF_POLICY_CORRECTIONS}, got {off_policy_correction!r}"
        )
    if eps_clip_low < 0 or eps_clip_high < 0:
        raise ValueError(f"eps_clip_low and eps_clip_high must be >= 0, got {eps_clip_low} and {eps_clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1.0, got {dual_clip}")
    if log_ratio_clamp is not None and log_ratio_clamp <= 0:
        raise ValueError(f"log_ratio_clamp must be > 0, got {log_ratio_clamp}")
    correcting = off_policy_correction != "none"
    if correcting:
        if rollout_log_probs is None:
            raise ValueError(f"off_policy_correction={off_policy_correction} needs rollout_log_probs")
        check_same_shape("rollout_log_probs", rollout_log_probs, "log_probs", log_probs)
        if not 0.0 <= is_low <= is_high:
            raise ValueError(f"need 0 <= is_low <= is_high, got is_low={is_low}, is_high={is_high}")

    mask = action_mask.bool()
    log_probs = as_compute_dtype(log_probs)
    old_log_probs = as_compute_dtype(old_log_probs).to(log_probs.dtype)
    advantages = as_compute_dtype(advantages).to(log_probs.dtype).detach()
    zeros = torch.zeros_like(log_probs)
    # Padding may hold anything (even inf); zero the log-ratio there so nothing NaN reaches the masked sums' grads.
    log_ratio = torch.where(mask, log_probs - old_log_probs, zeros)

    if policy_loss_type == "gspo":
        base = as_compute_dtype(rollout_log_probs).to(log_probs.dtype) if correcting else old_log_probs
        sequence_log_ratio = masked_mean(torch.where(mask, log_probs - base, zeros), mask, dim=-1)
        ratio = _bounded(sequence_log_ratio, log_ratio_clamp).exp().unsqueeze(-1).expand_as(log_probs)
        loss_agg_mode = "seq_mean_token_mean"
    else:
        ratio = _bounded(log_ratio, log_ratio_clamp).exp()

    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_clip_low, 1.0 + eps_clip_high) * advantages
    objective = torch.min(unclipped, clipped)
    metrics: dict[str, torch.Tensor] = {}
    if dual_clip is not None:
        lower_bound = dual_clip * advantages
        negative = advantages < 0
        metrics["dual_clip_ratio"] = masked_mean((negative & (objective < lower_bound)).float(), mask).detach()
        objective = torch.where(negative, torch.max(objective, lower_bound), objective)
    token_losses = -objective

    if correcting and policy_loss_type == "ppo":
        weights, filtered_ratio = off_policy_weights(
            old_log_probs, rollout_log_probs, action_mask, off_policy_correction, is_low, is_high
        )
        token_losses = weights * token_losses
        metrics["is_filtered_ratio"] = filtered_ratio
    if correcting:
        rollout_gap = as_compute_dtype(rollout_log_probs).to(log_probs.dtype) - old_log_probs
        metrics["rollout_kl"] = masked_mean(torch.where(mask, rollout_gap, zeros), mask).detach()

    loss = aggregate_loss(
        token_losses, action_mask, loss_agg_mode, norm_length=norm_length, num_tokens=num_tokens, num_seqs=num_seqs
    )
    metrics["clip_ratio"] = masked_mean((clipped < unclipped).float(), mask).detach()
    metrics["approx_kl"] = masked_mean(-log_ratio, mask).detach()
    return loss, metrics


def _bounded(log_ratio: torch.Tensor, clamp: Optional[float]) -> torch.Tensor:
    return log_ratio if clamp is None else log_ratio.clamp(min=-clamp, max=clamp)


def off_policy_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    action_mask: torch.Tensor,
    off_policy_correction: str,
    is_low: float,
    is_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached per-token weights [B, T] for `off_policy_correction` (module docstring) and the filtered ratio.

    The filtered ratio is the fraction of action tokens whose weight was clipped (tis) or dropped (icepop), or the
    fraction of sequences dropped (seq_mask_tis). Weights are 0 off-mask.
    """
    mask = action_mask.bool()
    log_w = as_compute_dtype(old_log_probs).detach() - as_compute_dtype(rollout_log_probs).to(
        as_compute_dtype(old_log_probs).dtype
    )
    log_w = torch.where(mask, log_w, torch.zeros_like(log_w))
    w = log_w.exp()
    inside = (w >= is_low) & (w <= is_high)
    if off_policy_correction == "tis":
        weights = w.clamp(min=is_low, max=is_high)
        filtered = masked_mean((~inside).float(), mask)
    elif off_policy_correction == "icepop":
        weights = torch.where(inside, w, torch.zeros_like(w))
        filtered = masked_mean((~inside).float(), mask)
    elif off_policy_correction == "seq_mask_tis":
        sequence_w = masked_mean(log_w, mask, dim=-1).exp()
        keep = (sequence_w >= is_low) & (sequence_w <= is_high)
        weights = torch.where(keep.unsqueeze(-1), w, torch.zeros_like(w))
        has_tokens = mask.any(dim=-1)
        filtered = masked_mean((~keep).float(), has_tokens)
    else:
        raise ValueError(
            f"off_policy_correction must be one of {OFF_POLICY_CORRECTIONS[1:]}, got {off_policy_correction!r}"
        )
    return torch.where(mask, weights, torch.zeros_like(weights)).detach(), filtered.detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim: H = logsumexp(z) - sum_v softmax(z)_v z_v, computed in float32."""
    logits = as_compute_dtype(logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def entropy_bonus(
    entropy: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    entropy_loss_coef: float,
    loss_agg_mode: str = "token_mean",
    norm_length: Optional[int] = None,
    num_tokens: Optional[float | torch.Tensor] = None,
    num_seqs: Optional[float | torch.Tensor] = None,
) -> torch.Tensor:
    """The term added to the loss to reward exploration: -entropy_loss_coef * agg_{loss_agg_mode}(H_t)."""
    return -entropy_loss_coef * aggregate_loss(
        entropy, action_mask, loss_agg_mode, norm_length=norm_length, num_tokens=num_tokens, num_seqs=num_seqs
    )
