"""Masked reductions and loss aggregation shared by every estimator and loss.

A mask is a tensor of the same shape as the values with 1 (or True) where a value counts and 0 where it is padding or an
environment token. Every function here multiplies by the mask (or selects with it) so that whatever sits under a 0 --
including NaN or inf from padded positions -- never reaches the result.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

LOSS_AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "seq_mean_token_sum_norm")

# Sums a tensor over all ranks that share one global batch (e.g. a wrapper around dist.all_reduce); None = local only.
AllReduceFn = Callable[[torch.Tensor], torch.Tensor]


def as_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """Return `x` in float32, or unchanged when it is already float32/float64 (bf16/fp16 math loses too much)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def check_same_shape(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Raise a ValueError naming both tensors when their shapes differ."""
    if tensor.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """sum(values * mask) over `dim` (all dims when None); masked-out NaN/inf are dropped, not multiplied by 0."""
    check_same_shape("values", values, "mask", mask)
    selected = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """sum(values * mask) / sum(mask) over `dim`; a slice with no unmasked entry gives 0 (not NaN)."""
    count = masked_sum(torch.ones_like(values), mask, dim=dim)
    return masked_sum(values, mask, dim=dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Population variance of the unmasked entries: mean((x - mean(x))^2) (no Bessel correction)."""
    mean = masked_mean(values, mask, dim=dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    return masked_mean((values - mean) ** 2, mask, dim=dim)


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    std_norm: bool = True,
    eps: float = 1e-8,
    all_reduce: Optional[AllReduceFn] = None,
) -> torch.Tensor:
    """Whitening over every unmasked entry: (x - mean) / sqrt(max(var, eps)); masked entries come back as 0.

    mean and var are population statistics of the unmasked entries of the whole (global) batch. With `all_reduce`,
    the batch is spread over ranks: the statistics are summed over ranks in two passes (count and sum, then squared
    deviations) in float64, so every rank whitens with the same numbers. `std_norm=False` only centres (OpenRLHF's
    `no_advantage_std_norm`); `shift_mean=False` keeps the mean and only scales.
    """
    check_same_shape("values", values, "mask", mask)
    x64 = values.double()
    count_and_sum = torch.stack([masked_sum(torch.ones_like(x64), mask), masked_sum(x64, mask)])
    if all_reduce is not None:
        count_and_sum = all_reduce(count_and_sum)
    count, total = count_and_sum[0].clamp(min=1), count_and_sum[1]
    mean = total / count
    squared_deviation = masked_sum((x64 - mean) ** 2, mask).reshape(1)
    if all_reduce is not None:
        squared_deviation = all_reduce(squared_deviation)
    var = squared_deviation[0] / count
    out = x64 - mean if shift_mean else x64
    if std_norm:
        out = out * var.clamp(min=eps).rsqrt()
    return torch.where(mask.bool(), out, torch.zeros_like(out)).to(values.dtype)


def aggregate_loss(
    token_losses: torch.Tensor,
    mask: torch.Tensor,
    loss_agg_mode: str = "token_mean",
    *,
    norm_length: Optional[int] = None,
    num_tokens: Optional[float | torch.Tensor] = None,
    num_seqs: Optional[float | torch.Tensor] = None,
) -> torch.Tensor:
    """Reduce [batch, len] per-token losses L[i,t] with mask m[i,t] to one number.

    token_mean:              sum_{i,t} m L / sum_{i,t} m                        (DAPO's token-level loss)
    seq_mean_token_sum:      (1/B) sum_i sum_t m L
    seq_mean_token_mean:     (1/B) sum_i (sum_t m L / sum_t m)                  (GRPO paper, GSPO)
    seq_mean_token_sum_norm: (1/B) sum_i sum_t m L / norm_length                (Dr. GRPO; norm_length = max new tokens)

    B counts only sequences with at least one unmasked token. `norm_length` defaults to the tensor's length, which is
    only constant across steps when responses are padded to the generation limit: pass the limit. For micro-batches
    and data parallelism, pass the global denominators: `num_tokens` replaces sum m (token_mean) and `num_seqs`
    replaces B (seq_* modes), so that summing the per-micro-batch results over micro-batches and ranks gives the loss
    of the global batch. A batch with nothing unmasked gives a zero that keeps the autograd graph.
    """
    check_same_shape("token_losses", token_losses, "mask", mask)
    if token_losses.dim() != 2:
        raise ValueError(f"token_losses must be [batch, len], got shape {tuple(token_losses.shape)}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    losses = as_compute_dtype(token_losses)
    tokens_per_seq = masked_sum(torch.ones_like(losses), mask, dim=-1)

    if loss_agg_mode == "token_mean":
        denominator = tokens_per_seq.sum() if num_tokens is None else num_tokens
        return _safe_divide(masked_sum(losses, mask), denominator)

    seq_sums = masked_sum(losses, mask, dim=-1)
    if loss_agg_mode == "seq_mean_token_sum":
        seq_values = seq_sums
    elif loss_agg_mode == "seq_mean_token_mean":
        seq_values = seq_sums / tokens_per_seq.clamp(min=1)
    else:
        length = losses.shape[-1] if norm_length is None else norm_length
        if length <= 0:
            raise ValueError(f"norm_length must be positive, got {length}")
        seq_values = seq_sums / length
    denominator = (tokens_per_seq > 0).sum() if num_seqs is None else num_seqs
    return _safe_divide(seq_values.sum(), denominator)


def _safe_divide(numerator: torch.Tensor, count: float | torch.Tensor) -> torch.Tensor:
    """numerator / count for a count of tokens or sequences; a zero count (nothing unmasked, numerator 0) divides by 1.

    Clamping instead of branching keeps the graph and avoids a host sync on GPU.
    """
    count = torch.as_tensor(count, dtype=numerator.dtype, device=numerator.device)
    return numerator / count.clamp(min=1)
