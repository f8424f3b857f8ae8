"""Per-token log-probabilities and entropy from logits, computed chunk by chunk in fp32.

`log_softmax` over a [tokens, vocab] tensor in fp32 costs tokens x vocab x 4 bytes, and autograd would keep
it (and a softmax for the entropy) alive until backward. Here each chunk is reduced with `logsumexp` and, when
gradients are needed, recomputed in backward (activation checkpointing), so only the model-dtype logits the
caller already holds stay alive.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_log_probs(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = logits.float() / temperature
    return scaled.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def _chunk_log_probs_and_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    scaled = logits.float() / temperature
    log_normalizer = torch.logsumexp(scaled, dim=-1)
    log_probs = scaled.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_normalizer
    # H = -sum p log p, with log p = x - logZ computed first (no cancellation between logZ and sum p x).
    token_log_p = scaled - log_normalizer.unsqueeze(-1)
    entropy = -(token_log_p.exp() * token_log_p).sum(-1)
    return log_probs, entropy


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                    with_entropy: bool = False, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(logits / temperature)[label] for each row of `logits` [N, V], and optionally the entropy.

    Returns fp32 tensors of shape [N] (entropy is None unless `with_entropy`).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits [N, V] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    recompute = torch.is_grad_enabled() and logits.requires_grad
    log_prob_chunks, entropy_chunks = [], []
    for start in range(0, logits.shape[0], chunk_size):
        chunk, chunk_labels = logits[start:start + chunk_size], labels[start:start + chunk_size]
        if with_entropy:
            fn = _chunk_log_probs_and_entropy
            result = checkpoint(fn, chunk, chunk_labels, temperature, use_reentrant=False) if recompute \
                else fn(chunk, chunk_labels, temperature)
            log_prob_chunks.append(result[0])
            entropy_chunks.append(result[1])
        else:
            fn = _chunk_log_probs
            result = checkpoint(fn, chunk, chunk_labels, temperature, use_reentrant=False) if recompute \
                else fn(chunk, chunk_labels, temperature)
            log_prob_chunks.append(result)
    if not log_prob_chunks:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    log_probs = torch.cat(log_prob_chunks)
    return log_probs, (torch.cat(entropy_chunks) if with_entropy else None)
