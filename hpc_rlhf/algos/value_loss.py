"""The critic's loss for PPO with GAE: squared error to the returns, with optional value clipping.

Per action token, with current value V_t, value at rollout time V_old_t, return R_t and clip range c (`value_clip`):

    no clipping:   L_t = 1/2 (V_t - R_t)^2
    clipping:      L_t = 1/2 max((V_t - R_t)^2, (V_old_t + clip(V_t - V_old_t, -c, c) - R_t)^2)

aggregated with masked.aggregate_loss (OpenRLHF's ValueLoss).
"""

from __future__ import annotations

from typing import Optional

import torch

from hpc_rlhf.algos.masked import aggregate_loss, as_compute_dtype, check_same_shape, masked_mean


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    value_clip: Optional[float] = 0.2,
    loss_agg_mode: str = "token_mean",
    norm_length: Optional[int] = None,
    num_tokens: Optional[float | torch.Tensor] = None,
    num_seqs: Optional[float | torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (module docstring) and metrics: value_clip_ratio (tokens where |V - V_old| > c)."""
    for name, tensor in (("old_values", old_values), ("returns", returns), ("action_mask", action_mask)):
        check_same_shape(name, tensor, "values", values)
    if value_clip is not None and value_clip < 0:
        raise ValueError(f"value_clip must be >= 0 or None, got {value_clip}")
    mask = action_mask.bool()
    values = as_compute_dtype(values)
    returns = as_compute_dtype(returns).to(values.dtype).detach()
    squared_error = (values - returns) ** 2
    metrics: dict[str, torch.Tensor] = {}
    if value_clip is None:
        token_losses = 0.5 * squared_error
    else:
        old_values = as_compute_dtype(old_values).to(values.dtype).detach()
        clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
        token_losses = 0.5 * torch.max(squared_error, (clipped_values - returns) ** 2)
        metrics["value_clip_ratio"] = masked_mean(((values - old_values).abs() > value_clip).float(), mask).detach()
    loss = aggregate_loss(
        token_losses, action_mask, loss_agg_mode, norm_length=norm_length, num_tokens=num_tokens, num_seqs=num_seqs
    )
    return loss, metrics
