"""A reward that varies within every group: the response's character count modulo 5, so the parity tool compares
real (non-zero) advantages and trains on them even with a random model."""

from __future__ import annotations


def reward_func(queries: list[str], prompts: list[str], labels: list[str], **_unused) -> dict:
    scores = [float(len(query[len(prompt):]) % 5) for query, prompt in zip(queries, prompts)]
    return {"rewards": scores, "scores": scores}
