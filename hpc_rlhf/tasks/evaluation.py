"""Held-out accuracy of a causal LM on a prompt set with a rule-based reward: greedy and sampled.

Prompts are rendered the way the trainer renders them (`hpc_rlhf.data.prompts.load_prompts`, then tokenised without
added special tokens when the chat template was applied), generated in batches with left padding, stopped at the
tokenizer's eos token, and scored by a reward function with the OpenRLHF signature on prompt + response text.
`evaluate` runs in-process (CPU or GPU); tools/eval_accuracy.py is its command line.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

from hpc_rlhf.data.prompts import PromptExample


def generate_responses(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
                       temperature: float = 0.0, batch_size: int = 64, add_special_tokens: bool = False,
                       progress: Optional[Callable[[int], None]] = None) -> list[list[int]]:
    """Response token ids of each prompt (ending at and including eos when it was generated), greedy when
    temperature is 0. Sampling draws from torch's global generator: seed it for repeatable samples."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = next(model.parameters()).device
    responses: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 \
            else {"do_sample": False}
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad, **sampling)
        for row in out[:, width:].tolist():
            responses.append(row[:row.index(eos) + 1] if eos in row else row)
        if progress is not None:
            progress(len(responses))
    return responses


def evaluate(model: Any, tokenizer: Any, examples: Sequence[PromptExample], *, reward_func: Callable[..., dict],
             max_new_tokens: int = 200, samples: int = 0, temperature: float = 1.0, batch_size: int = 64,
             seed: int = 0, add_special_tokens: bool = False, log: Optional[Callable[[str], None]] = None) -> dict:
    """Greedy accuracy (one response per prompt) and, with `samples` > 0, sampled accuracy (`samples` responses per
    prompt at `temperature`); accuracy is the mean 0/1 score of `reward_func`. Also mean response length and the
    fraction of responses that ended with eos. Returns a JSON-ready dict."""
    if not examples:
        raise ValueError("evaluate: no examples")
    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    if samples and temperature <= 0:
        raise ValueError(f"sampled accuracy needs temperature > 0, got {temperature}")
    prompts = [e.prompt for e in examples]
    labels = [e.label for e in examples]
    eos = tokenizer.eos_token_id
    result: dict[str, Any] = {"prompts": len(examples), "max_new_tokens": max_new_tokens}
    runs = [("greedy", 0.0, 1)] + ([("sampled", temperature, samples)] if samples else [])
    for name, temp, repeats in runs:
        total = len(prompts) * repeats
        started = time.perf_counter()

        def report(done: int) -> None:
            if log is not None:
                log(f"{name}: {done}/{total} responses, {time.perf_counter() - started:.0f} s")

        torch.manual_seed(seed)
        scores: list[float] = []
        lengths: list[int] = []
        ended = 0
        for repeat in range(repeats):
            responses = generate_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                           temperature=temp, batch_size=batch_size,
                                           add_special_tokens=add_special_tokens,
                                           progress=lambda done, r=repeat: report(r * len(prompts) + done))
            queries = [p + tokenizer.decode(r, skip_special_tokens=False) for p, r in zip(prompts, responses)]
            scores.extend(float(s) for s in reward_func(queries, prompts, labels)["scores"].tolist())
            lengths.extend(len(r) for r in responses)
            ended += sum(1 for r in responses if r and r[-1] == eos)
        result[name] = {
            "accuracy": sum(scores) / len(scores),
            "responses": len(scores),
            "mean_response_tokens": sum(lengths) / len(lengths),
            "ended_with_eos": ended / len(scores),
            "seconds": time.perf_counter() - started,
        }
        if name == "sampled":
            result[name]["temperature"] = temp
            result[name]["samples_per_prompt"] = repeats
    return result


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
