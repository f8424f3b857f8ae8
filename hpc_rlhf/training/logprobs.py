"""Per-token log-probabilities and entropy from logits, chunk by chunk in fp32, with a hand-written backward.

The logits of a training micro-batch are large ([tokens, vocab]: 8k x 152k in bf16 is 2.5 GB), and autograd
through `log_softmax`, slices or index copies of them makes several full-size fp32 temporaries and full-size
zero-filled gradients per chunk. Here one autograd function reads the logits chunk by chunk in both passes: forward
keeps only the log-normaliser of each row, backward recomputes the softmax of a chunk and writes that chunk's
gradient straight into one gradient tensor of the logits' dtype. Rows are picked by index, so callers pass the
model's logits as they are (no gathered copy).

Gradients, with x = logits / T, log p = x - logsumexp(x), p = exp(log p), for a row whose label is y:
    d log p_y / d x_j = [j = y] - p_j
    d H / d x_j       = -p_j (log p_j + H)        where H = -sum_j p_j log p_j
and d / d logits = (d / d x) / T.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from hpc_rlhf.training.batching import to_device


def _scaled_chunk(logits: torch.Tensor, rows: torch.Tensor | None, start: int, stop: int,
                  temperature: float) -> torch.Tensor:
    """fp32 copy of the chunk's rows of `logits` (picked by `rows[start:stop]` when given), divided by T."""
    chunk = logits[start:stop] if rows is None else logits.index_select(0, rows[start:stop])
    scaled = chunk.to(torch.float32, copy=True)  # always a new tensor (also for fp32 logits): modified in place
    if temperature != 1.0:
        scaled.div_(temperature)
    return scaled


class _ChunkedLogProbs(torch.autograd.Function):
    """log softmax(logits / T)[label] per picked row, and the entropy of the row when asked; see the module doc."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor | None, temperature: float,
                chunk_size: int, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        count = labels.numel()
        log_probs = torch.empty(count, dtype=torch.float32, device=logits.device)
        log_normalizers = torch.empty_like(log_probs)
        entropy = torch.empty_like(log_probs) if with_entropy else log_probs.new_empty(0)
        for start in range(0, count, chunk_size):
            stop = min(start + chunk_size, count)
            scaled = _scaled_chunk(logits, rows, start, stop, temperature)
            log_z = torch.logsumexp(scaled, dim=-1)
            log_normalizers[start:stop] = log_z
            log_probs[start:stop] = scaled.gather(-1, labels[start:stop, None]).squeeze(-1) - log_z
            if with_entropy:
                # H = -sum p log p with log p = x - logZ formed first: no cancellation between logZ and sum p x.
                log_p = scaled.sub_(log_z[:, None])
                entropy[start:stop] = -(log_p.exp() * log_p).sum(-1)
        ctx.save_for_backward(logits, labels, rows, log_normalizers, entropy if with_entropy else None)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return log_probs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_log_probs: torch.Tensor, grad_entropy: torch.Tensor) -> tuple[Any, ...]:
        logits, labels, rows, log_normalizers, entropy = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        count = labels.numel()
        every_row = rows is None or count == logits.shape[0]  # picked rows are distinct: all rows are written
        grad = torch.empty_like(logits) if every_row else torch.zeros_like(logits)
        for start in range(0, count, chunk_size):
            stop = min(start + chunk_size, count)
            log_p = _scaled_chunk(logits, rows, start, stop, temperature).sub_(log_normalizers[start:stop, None])
            g = grad_log_probs[start:stop, None]
            p = log_p.exp()
            if entropy is not None:
                d_entropy = log_p.add_(entropy[start:stop, None]).mul_(p).mul_(-grad_entropy[start:stop, None])
                d_x = p.mul_(-g).add_(d_entropy)
            else:
                d_x = p.mul_(-g)
            d_x.scatter_add_(1, labels[start:stop, None], g)
            if temperature != 1.0:
                d_x.div_(temperature)
            if rows is None:
                grad[start:stop] = d_x
            else:
                grad.index_copy_(0, rows[start:stop], d_x.to(grad.dtype))
        return grad, None, None, None, None, None


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                    with_entropy: bool = False, chunk_size: int = 1024,
                    rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[label] for rows of `logits` [R, V], and optionally their entropy.

    Without `rows`, row i of `logits` goes with `labels[i]` (R == len(labels)); with `rows` (distinct indices, one
    per label) row `rows[i]` does, and the other rows get no gradient. Returns fp32 tensors of shape [len(labels)]
    (entropy is None unless `with_entropy`); differentiable with respect to `logits`.
    """
    if logits.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"need logits [R, V] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if rows is None and labels.shape[0] != logits.shape[0]:
        raise ValueError(f"need one label per row of logits without `rows`, got {tuple(logits.shape)} logits and "
                         f"{tuple(labels.shape)} labels")
    if rows is not None and rows.shape != labels.shape:
        raise ValueError(f"rows {tuple(rows.shape)} must pair with labels {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    labels = to_device(labels, logits.device)
    rows = None if rows is None else to_device(rows, logits.device)
    log_probs, entropy = _ChunkedLogProbs.apply(logits, labels, rows, float(temperature), chunk_size, with_entropy)
    return log_probs, (entropy if with_entropy else None)
