"""A reward for the dynamic sampling tests whose filtering outcome is known from the prompt alone: prompts whose label
is even get equal scores (0, 0, ...: the group is dropped), the others alternate 0, 1 within the group (kept)."""

from __future__ import annotations


def dropped(label: str) -> bool:
    """Whether the group of a prompt with this label is filtered out."""
    return int(str(label).strip()) % 2 == 0


def reward_func(queries: list[str], prompts: list[str], labels: list[str], **_unused) -> dict:
    """Scores 0 for a dropped prompt, else the sample's position parity (groups are consecutive, n even)."""
    scores = [0.0 if dropped(label) else float(k % 2) for k, label in enumerate(labels)]
    return {"rewards": list(scores), "scores": scores}
