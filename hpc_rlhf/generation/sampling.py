"""Next-token sampling from logits: temperature, top-k, top-p, and the behaviour log-prob of the chosen token.

Pure functions of their inputs (the randomness comes from an explicit `torch.Generator`), shared by the hf backend
and by tests that check the log-prob convention described in `engine`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def filter_top_k_top_p(scaled_logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k set and outside the nucleus (top-p) set to -inf; input is [B, V].

    The nucleus keeps the smallest prefix of tokens (by descending probability) whose mass reaches `top_p`;
    the most likely token is always kept. `top_k <= 0` and `top_p >= 1` leave the logits unchanged.
    """
    out = scaled_logits
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth_value = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth_value, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def behaviour_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) in float32, or plain log_softmax when temperature is 0 (greedy)."""
    logits = logits.float()
    return torch.log_softmax(logits if temperature == 0.0 else logits / temperature, dim=-1)


def sample_next_tokens(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
                       generator: torch.Generator | None, suppressed: Sequence[int] = ()
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of last-position logits [B, V]; returns (tokens [B] int64, log-probs [B] float32).

    Greedy (temperature 0) takes the argmax. Otherwise tokens are drawn from softmax of the temperature-scaled logits
    after top-k/top-p filtering, and the log-prob is taken before filtering (the `engine` module's convention).
    `suppressed` token ids are never chosen; the log-probs stay those of the unfiltered distribution.
    """
    log_probs = behaviour_log_probs(logits, temperature)
    choice = log_probs
    if suppressed:
        choice = log_probs.index_fill(-1, torch.tensor(list(suppressed), device=logits.device), float("-inf"))
    if temperature == 0.0:
        tokens = choice.argmax(dim=-1)
    else:
        filtered = filter_top_k_top_p(choice, top_k, top_p)
        probs = torch.softmax(filtered, dim=-1)
        tokens = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
    return tokens, log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
