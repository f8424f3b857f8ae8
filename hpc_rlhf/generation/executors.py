"""Executors turn prompts into token trajectories; token in, token out (earlier text is never re-tokenized).

    executor = make_executor(engine, tokenizer, agent_func_path=None)        # single-turn
    executor = make_executor(engine, tokenizer, agent_func_path="env.py", max_turns=4, max_length=2048)
    trajectories = executor.run(prompt_ids, SamplingParams(n=4, ...), prompt_texts=texts, labels=labels)

The agent-file protocol of the multi-turn executor is described in `agents`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hpc_rlhf.generation.agents import Trajectory, load_agent_class
from hpc_rlhf.generation.engine import GenerationEngine, SamplingParams
from hpc_rlhf.generation.multi_turn import MultiTurnExecutor


class SingleTurnExecutor:
    """One generation per sample; every response token is a policy token."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine

    def run(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
            prompt_texts: Sequence[str] | None = None, labels: Sequence[Any] | None = None,
            images: Sequence[Sequence[bytes]] | None = None) -> list[Trajectory]:
        """`params.n` trajectories per prompt, prompt-major; `prompt_texts` and `labels` are not needed here;
        `images`: each prompt's PNG images (vision-language models)."""
        trajectories = []
        prompts = [list(ids) for ids in prompt_ids]
        outputs = self.engine.generate(prompts, params) if images is None else self.engine.generate(prompts, params,
                                                                                                    images=images)
        for samples in outputs:
            for sample in samples:
                trajectories.append(Trajectory(
                    prompt_ids=list(sample.prompt_ids), response_ids=list(sample.response_ids),
                    action_mask=[1] * len(sample.response_ids), log_probs=list(sample.log_probs),
                    turn_boundaries=[0], finish_reason=sample.finish_reason))
        return trajectories


def make_executor(engine: GenerationEngine, tokenizer: Any, *, agent_func_path: str | None = None,
                  max_turns: int = 1, max_length: int | None = None) -> SingleTurnExecutor | MultiTurnExecutor:
    """A `MultiTurnExecutor` when an agent file is given, else a `SingleTurnExecutor`."""
    if not agent_func_path:
        return SingleTurnExecutor(engine)
    return MultiTurnExecutor(engine, load_agent_class(agent_func_path), tokenizer, max_turns=max_turns,
                             max_length=max_length)
