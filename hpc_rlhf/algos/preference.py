"""Preference losses: pairwise reward-model loss, DPO, cDPO, IPO and KTO, as in OpenRLHF and the papers.

Inputs are per-sample [B] log-likelihoods log pi(y | x) (summed over response tokens unless the caller chooses an
average) under the policy and the frozen reference. With

    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))    (chosen y_w, rejected y_l)

    DPO  (Rafailov et al. 2023):   -log sigmoid(beta h)
    cDPO (Mitchell 2023):          -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), eps = label_smoothing
    IPO  (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2

each averaged over the batch. The implicit rewards beta (log pi(y) - log pi_ref(y)) are returned detached for logging.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from hpc_rlhf.algos.masked import as_compute_dtype, check_same_shape

RM_LOSS_TYPES = ("sigmoid", "logexp")


class PreferenceLossOutput(NamedTuple):
    """A preference loss and the detached implicit rewards of the chosen and rejected responses."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class KTOLossOutput(NamedTuple):
    """The KTO loss, detached implicit rewards of desirable/undesirable samples, and the reference point used."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reference_kl: torch.Tensor


def pairwise_rm_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: Optional[torch.Tensor] = None,
    loss_type: str = "sigmoid",
) -> torch.Tensor:
    """Reward-model loss on [B] scores of chosen and rejected responses, averaged over the batch.

    sigmoid: -log sigmoid(r_w - r_l - margin) (Bradley-Terry; OpenRLHF PairWiseLoss)
    logexp:  log(1 + exp(r_l - r_w + margin)) (Askell et al. 2021; OpenRLHF LogExpLoss) -- the same function written
             as a softplus; kept under its own name because users select it as `loss: logexp`.
    `margin` ([B] or None) asks for chosen to beat rejected by at least that much.
    """
    check_same_shape("rejected_rewards", rejected_rewards, "chosen_rewards", chosen_rewards)
    if loss_type not in RM_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {RM_LOSS_TYPES}, got {loss_type!r}")
    difference = as_compute_dtype(chosen_rewards) - as_compute_dtype(rejected_rewards)
    if margin is not None:
        check_same_shape("margin", margin, "chosen_rewards", chosen_rewards)
        difference = difference - as_compute_dtype(margin).to(difference.dtype)
    if loss_type == "sigmoid":
        return -F.logsigmoid(difference).mean()
    return F.softplus(-difference).mean()


def _implicit_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked, float log-ratios log pi(y) - log pi_ref(y) for the chosen and the rejected responses."""
    for name, tensor in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        check_same_shape(name, tensor, "policy_chosen_logps", policy_chosen_logps)
    chosen = as_compute_dtype(policy_chosen_logps) - as_compute_dtype(ref_chosen_logps).detach()
    rejected = as_compute_dtype(policy_rejected_logps) - as_compute_dtype(ref_rejected_logps).detach()
    return chosen, rejected.to(chosen.dtype)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """DPO, or cDPO when label_smoothing > 0: mean of -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    chosen, rejected = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    logits = beta * (chosen - rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceLossOutput(losses.mean(), (beta * chosen).detach(), (beta * rejected).detach())


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> PreferenceLossOutput:
    """IPO: mean of (h - 1 / (2 beta))^2, a squared loss that keeps the preference margin at 1 / (2 beta)."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    chosen, rejected = _implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLossOutput(losses.mean(), (beta * chosen).detach(), (beta * rejected).detach())


def mismatched_completion_indices(batch_size: int) -> torch.Tensor:
    """For KTO's reference point: sample i is paired with the completion of sample i - 1 (cyclically).

    The trainer scores (x_i, y_{idx[i]}) under policy and reference to get `policy_kl_logps` / `ref_kl_logps`; each
    prompt then sees a completion written for another prompt, as the KTO paper prescribes.
    """
    if batch_size < 2:
        raise ValueError(f"KTO's mismatched pairs need a batch of at least 2 samples, got {batch_size}")
    return torch.roll(torch.arange(batch_size), shifts=1)


def kto_reference_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """Local estimate of KTO's reference point z0 = mean(log pi(y'|x) - log pi_ref(y'|x)) on mismatched pairs, detached.

    Average it over data-parallel ranks (all_reduce sum / world size) before `kto_loss`, which clamps it at 0.
    """
    check_same_shape("ref_kl_logps", ref_kl_logps, "policy_kl_logps", policy_kl_logps)
    return (as_compute_dtype(policy_kl_logps) - as_compute_dtype(ref_kl_logps)).mean().detach()


def kto_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    reference_kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """KTO (Ethayarajh et al. 2024) over unpaired desirable [B_d] and undesirable [B_u] samples.

    With z0 = max(reference_kl, 0) (detached) and log-ratios l = log pi(y|x) - log pi_ref(y|x):
        desirable:   lambda_D (1 - sigmoid(beta (l - z0)))
        undesirable: lambda_U (1 - sigmoid(beta (z0 - l)))
    loss = mean over all B_d + B_u samples (HALOs / OpenRLHF KTOLoss). Either group may be empty, not both.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    check_same_shape("ref_chosen_logps", ref_chosen_logps, "policy_chosen_logps", policy_chosen_logps)
    check_same_shape("ref_rejected_logps", ref_rejected_logps, "policy_rejected_logps", policy_rejected_logps)
    if policy_chosen_logps.numel() + policy_rejected_logps.numel() == 0:
        raise ValueError("kto_loss needs at least one desirable or undesirable sample")
    z0 = as_compute_dtype(torch.as_tensor(reference_kl)).detach().clamp(min=0)
    chosen = as_compute_dtype(policy_chosen_logps) - as_compute_dtype(ref_chosen_logps).detach()
    rejected = as_compute_dtype(policy_rejected_logps) - as_compute_dtype(ref_rejected_logps).detach()
    rejected = rejected.to(chosen.dtype)
    z0 = z0.to(device=chosen.device, dtype=chosen.dtype)
    chosen_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (chosen - z0)))
    rejected_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - rejected)))
    loss = torch.cat([chosen_losses.reshape(-1), rejected_losses.reshape(-1)]).mean()
    return KTOLossOutput(loss, (beta * chosen).detach(), (beta * rejected).detach(), z0)
