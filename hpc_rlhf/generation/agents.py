"""What executors and agent files share: the Trajectory record, AgentError and loading a user's agent class.

Executors (`executors.SingleTurnExecutor`, `multi_turn.MultiTurnExecutor`, chosen by `executors.make_executor`) turn
prompts into token trajectories. `run` returns `params.n` trajectories per prompt, flattened in prompt order
(trajectory k answers prompt k // n). A single-turn trajectory leaves `reward` None for the reward stage; a multi-turn
one carries the environment's.

A multi-turn agent file (`rollout.agent_func_path`, like OpenRLHF's `--agent_func_path`) defines `class AgentInstance`
with a no-argument constructor and two methods, plain or `async def`:

    reset(state) -> {"observation": str}
        state: {"observation": prompt text, "label": label, "sample_index": j}. A different observation replaces the
        prompt (it is then tokenized once, before any model token exists).
    step(state) -> {"rewards": float, "environment_feedback": str, "done": bool,
                    "scores": float (optional, default = rewards), "sampling_params": dict (optional: SamplingParams
                    fields to change from the next turn on), "extra_logs": dict (optional)}
        state: {"observation": prompt text, "action_text": the latest model output (decoded), "trajectory_text": the
        prompt and everything after it (decoded), "label": label, "turn": 0-based turn index}.

The reward and score of a trajectory are those of its last step.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AGENT_CLASS_NAME = "AgentInstance"


class AgentError(ValueError):
    """A user agent file or one of its answers is malformed; the message names the file, method or key."""


@dataclass
class Trajectory:
    """One sampled trajectory: a prompt and everything after it, with per-token masks and behaviour log-probs.

    `action_mask[i]` is 1 for tokens the policy produced (trained on) and 0 for environment tokens; environment tokens
    have log-prob 0. `turn_boundaries` are the offsets into `response_ids` where each turn's model output starts.
    `finish_reason`: "stop" (eos / stop token, or the environment said done), "length" (token limit) or "max_turns".
    """

    prompt_ids: list[int]
    response_ids: list[int]
    action_mask: list[int]
    log_probs: list[float]
    turn_boundaries: list[int] = field(default_factory=lambda: [0])
    reward: float | None = None
    score: float | None = None
    extra_logs: dict[str, Any] = field(default_factory=dict)
    finish_reason: str = "stop"

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        if len(self.action_mask) != n or len(self.log_probs) != n:
            raise ValueError(f"trajectory has {n} response tokens, {len(self.action_mask)} mask entries and "
                             f"{len(self.log_probs)} log-probs; all three must match")


def load_agent_class(path: str) -> type:
    """Import the Python file at `path` and return its `AgentInstance` class, with clear errors."""
    file = Path(path)
    if not file.is_file():
        raise AgentError(f"rollout.agent_func_path: agent file {path!r} does not exist")
    digest = hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
    module_name = f"hpc_rlhf_agent_{file.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise AgentError(f"rollout.agent_func_path: cannot import {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling inside the file look their module up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise AgentError(f"rollout.agent_func_path: importing {path!r} failed: {type(exc).__name__}: {exc}") from exc
    agent_cls = getattr(module, AGENT_CLASS_NAME, None)
    if not inspect.isclass(agent_cls):
        raise AgentError(f"rollout.agent_func_path: {path!r} defines no class {AGENT_CLASS_NAME}")
    for method in ("reset", "step"):
        if not callable(getattr(agent_cls, method, None)):
            raise AgentError(f"rollout.agent_func_path: {AGENT_CLASS_NAME} in {path!r} has no {method}() method")
    return agent_cls
