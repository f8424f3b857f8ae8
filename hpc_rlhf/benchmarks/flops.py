"""FLOP and byte arithmetic of a decoder (`ModelShape`): the physical limits the benchmarks print beside measurements.

Convention (PaLM, appendix B): a forward pass costs 2 FLOPs per matmul weight per token plus the attention score and
value products, 2 * 2 * layers * heads * head_dim * context per token (QK^T and AV); training costs three forward passes
(forward + backward), i.e. 6N + 12 * L * H * Q * T per token. N counts the matmul weights only: the embedding lookup is
a gather and costs no FLOPs, but the lm_head is a real matmul over the whole vocabulary and is counted even when it
shares its matrix with the embeddings. Norms, activations, softmax and rotary embeddings are left out (well under 1%).

Decoding is bounded by memory bandwidth: each step reads every weight once and every sequence's KV cache, so the
generation limit sums, step by step, the larger of (bytes / bandwidth) and (FLOPs / peak).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from hpc_rlhf.benchmarks.task import ModelShape


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_lengths(sequence_lengths: Sequence[int]) -> None:
    for i, length in enumerate(sequence_lengths):
        if not isinstance(length, numbers.Integral) or length < 0:
            raise ValueError(f"sequence_lengths[{i}] must be a non-negative int, got {length!r}")


def layer_matmul_params(shape: ModelShape) -> int:
    """Weights of one decoder layer's matmuls: q, k, v, o projections and the SwiGLU gate, up and down."""
    d, f = shape.hidden_size, shape.intermediate_size
    q_width = shape.num_attention_heads * shape.head_dim
    kv_width = shape.num_key_value_heads * shape.head_dim
    return 2 * d * q_width + 2 * d * kv_width + 3 * d * f


def lm_head_params(shape: ModelShape) -> int:
    """Weights of the output projection (the embedding matrix itself when tied)."""
    return shape.vocab_size * shape.hidden_size


def non_embedding_params(shape: ModelShape) -> int:
    """All parameters except the embedding and lm_head matrices (layers' matmuls, norms, final norm)."""
    embedding_matrices = 1 if shape.tie_word_embeddings else 2
    return shape.parameter_count() - embedding_matrices * lm_head_params(shape)


def attention_flops_per_token(shape: ModelShape, context_len: int) -> int:
    """FLOPs of QK^T and AV for one query attending to `context_len` keys, over all layers."""
    if context_len < 0:
        raise ValueError(f"context_len must be >= 0, got {context_len}")
    return 4 * shape.num_hidden_layers * shape.num_attention_heads * shape.head_dim * context_len


def forward_flops_per_token(shape: ModelShape, context_len: int) -> int:
    """Forward FLOPs of one token that attends to `context_len` positions (itself included).

    2 * (layers' matmul weights + lm_head weights) + 4 * layers * heads * head_dim * context_len; the embedding lookup
    is free, the lm_head matmul is not (also when tied). Three times this is PaLM's 6N + 12*L*H*Q*T training cost.
    """
    matmul_params = shape.num_hidden_layers * layer_matmul_params(shape) + lm_head_params(shape)
    return 2 * matmul_params + attention_flops_per_token(shape, context_len)


def forward_flops(shape: ModelShape, sequence_lengths: Sequence[int], *, vocab_head: bool = True) -> int:
    """Forward FLOPs of causal passes over whole sequences (reference, critic, old log-probs).

    Position t (1-based) attends to t positions, so a sequence of length n has mean context (n + 1) / 2. The lm_head
    is applied at every position; `vocab_head=False` leaves it out for a critic or reward model, whose scalar value head
    costs 2 * hidden FLOPs per token (ignored).
    """
    _check_lengths(sequence_lengths)
    per_token = forward_flops_per_token(shape, 0)
    if not vocab_head:
        per_token -= 2 * lm_head_params(shape)
    attention_per_context = attention_flops_per_token(shape, 1)
    return sum(int(n) * per_token + attention_per_context * int(n) * (int(n) + 1) // 2 for n in sequence_lengths)


def train_flops(shape: ModelShape, sequence_lengths: Sequence[int], *, vocab_head: bool = True) -> int:
    """Training FLOPs (forward + backward = 3 forwards) of one pass over causal sequences of these lengths."""
    return 3 * forward_flops(shape, sequence_lengths, vocab_head=vocab_head)


def policy_update_flops(shape: ModelShape, prompt_lengths: Sequence[int], response_lengths: Sequence[int]) -> int:
    """Training FLOPs of a policy update that runs the LM head only where a response token is predicted (one position
    per response token, `logits_to_keep`): `train_flops` without the head, plus the head at those positions."""
    if len(prompt_lengths) != len(response_lengths):
        raise ValueError(f"need one response length per prompt, got {len(prompt_lengths)} and {len(response_lengths)}")
    _check_lengths(response_lengths)
    lengths = [int(p) + int(r) for p, r in zip(prompt_lengths, response_lengths)]
    return train_flops(shape, lengths, vocab_head=False) + 3 * 2 * lm_head_params(shape) * sum(response_lengths)


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s as a fraction of the device's peak."""
    if flops < 0:
        raise ValueError(f"flops must be >= 0, got {flops!r}")
    _check_positive("seconds", seconds)
    _check_positive("peak_flops", peak_flops)
    return flops / seconds / peak_flops


def model_bytes(shape: ModelShape, bytes_per_param: float = 2) -> float:
    """Bytes of all parameters (tied embeddings counted once): what one weight sync must move."""
    _check_positive("bytes_per_param", bytes_per_param)
    return shape.parameter_count() * bytes_per_param


def kv_cache_bytes_per_token(shape: ModelShape, kv_bytes: float = 2) -> float:
    """Bytes of keys and values one position keeps in the cache, over all layers."""
    return 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * kv_bytes


def decode_step_bytes(shape: ModelShape, batch: int, context_len: int, weight_bytes: float = 2,
                      kv_bytes: float = 2) -> float:
    """Bytes one decode step of `batch` sequences must read from memory, each attending to `context_len` positions.

    Every weight once, except the embedding matrix, of which the lookup reads only one row per sequence (at most the
    whole vocabulary); the lm_head is read in full (a separate read from the lookup's, even when tied). Plus the KV
    cache of every sequence: 2 * layers * kv_heads * head_dim * context_len * kv_bytes each.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if context_len < 0:
        raise ValueError(f"context_len must be >= 0, got {context_len}")
    looked_up_rows = min(batch, shape.vocab_size) * shape.hidden_size
    weights = (non_embedding_params(shape) + lm_head_params(shape) + looked_up_rows) * weight_bytes
    kv_cache = batch * context_len * kv_cache_bytes_per_token(shape, kv_bytes)
    return weights + kv_cache


def prefill_flops(shape: ModelShape, batch: int, prompt_len: int) -> int:
    """Forward FLOPs of prefilling `batch` prompts: every position through the layers, the lm_head at the last only."""
    return batch * (forward_flops(shape, [prompt_len], vocab_head=False) + 2 * lm_head_params(shape))


def decode_limit_tokens_per_s(shape: ModelShape, batch: int, prompt_len: int, gen_len: int, bandwidth: float,
                              peak_flops: float, weight_bytes: float = 2, kv_bytes: float = 2) -> float:
    """The best generation rate (new tokens/s) of `batch` sequences that each decode `gen_len` tokens after a prompt.

    The prefill (compute-bound: FLOPs / peak) yields the first new token; each of the gen_len - 1 decode steps that
    follow feeds one token per sequence at context prompt_len + i and takes max(bytes / bandwidth, FLOPs / peak).
    """
    if batch < 1 or prompt_len < 1 or gen_len < 1:
        raise ValueError(f"batch, prompt_len and gen_len must be >= 1, got {batch}, {prompt_len}, {gen_len}")
    _check_positive("bandwidth", bandwidth)
    _check_positive("peak_flops", peak_flops)
    seconds = prefill_flops(shape, batch, prompt_len) / peak_flops
    for step in range(1, gen_len):
        context_len = prompt_len + step
        memory_s = decode_step_bytes(shape, batch, context_len, weight_bytes, kv_bytes) / bandwidth
        compute_s = batch * forward_flops_per_token(shape, context_len) / peak_flops
        seconds += max(memory_s, compute_s)
    return batch * gen_len / seconds


def weight_sync_limit_s(num_bytes: float, bandwidth: float) -> float:
    """The least time to move `num_bytes` over a link of `bandwidth` bytes/s."""
    if num_bytes < 0:
        raise ValueError(f"num_bytes must be >= 0, got {num_bytes!r}")
    _check_positive("bandwidth", bandwidth)
    return num_bytes / bandwidth
