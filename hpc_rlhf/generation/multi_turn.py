"""The multi-turn executor: a user environment (`AgentInstance` with reset/step) in a loop with the generation engine.

Each trajectory is one growing token sequence. Per turn the model's tokens are appended with action_mask 1 and their
behaviour log-probs; the environment's feedback text is tokenized on its own (`add_special_tokens=False`) and appended
with action_mask 0 and log-prob 0. Nothing already in the sequence is ever re-tokenized, so the trainer sees exactly
the tokens the policy was conditioned on. All trajectories advance turn by turn together: one engine call per turn
per distinct set of sampling parameters, and the environments' `step` calls of a turn run concurrently when they are
`async def`. The agent protocol is described in `agents`.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hpc_rlhf.generation.agents import AGENT_CLASS_NAME, AgentError, Trajectory
from hpc_rlhf.generation.engine import GeneratedSample, GenerationEngine, GenerationError, SamplingParams

STEP_REQUIRED_KEYS = ("rewards", "environment_feedback", "done")
STEP_OPTIONAL_KEYS = ("scores", "sampling_params", "extra_logs")
RESET_KEYS = ("observation",)


@dataclass(frozen=True)
class StepResult:
    """A checked answer of `AgentInstance.step`."""

    reward: float
    score: float
    feedback: str
    done: bool
    sampling_overrides: Mapping[str, Any]
    extra_logs: Mapping[str, Any]


def _number(value: Any, key: str) -> float:
    if hasattr(value, "item"):  # a one-element tensor or numpy scalar
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AgentError(f"{AGENT_CLASS_NAME}.step returned {key}={value!r}; it must be a finite number")
    return float(value)


def check_step_result(result: Any) -> StepResult:
    """Validate one `step` answer; wrong, missing or unknown keys raise an error naming the key."""
    if not isinstance(result, Mapping):
        raise AgentError(f"{AGENT_CLASS_NAME}.step must return a dict, got {type(result).__name__}")
    unknown = sorted(set(result) - set(STEP_REQUIRED_KEYS) - set(STEP_OPTIONAL_KEYS))
    if unknown:
        raise AgentError(f"{AGENT_CLASS_NAME}.step returned unknown key(s) {unknown}; allowed: "
                         f"{list(STEP_REQUIRED_KEYS + STEP_OPTIONAL_KEYS)}")
    missing = [key for key in STEP_REQUIRED_KEYS if key not in result]
    if missing:
        raise AgentError(f"{AGENT_CLASS_NAME}.step result is missing key(s) {missing}")
    reward = _number(result["rewards"], "rewards")
    score = _number(result["scores"], "scores") if result.get("scores") is not None else reward
    feedback = result["environment_feedback"]
    if not isinstance(feedback, str):
        raise AgentError(f"{AGENT_CLASS_NAME}.step returned environment_feedback of type {type(feedback).__name__}; "
                         f"it must be a str")
    done = result["done"]
    if not isinstance(done, bool):
        raise AgentError(f"{AGENT_CLASS_NAME}.step returned done={done!r}; it must be True or False")
    overrides = result.get("sampling_params") or {}
    if not isinstance(overrides, Mapping):
        raise AgentError(f"{AGENT_CLASS_NAME}.step returned sampling_params of type {type(overrides).__name__}; "
                         f"it must be a dict of SamplingParams fields")
    if "n" in overrides:
        raise AgentError(f"{AGENT_CLASS_NAME}.step returned sampling_params with 'n'; each trajectory samples one "
                         f"response per turn")
    extra_logs = result.get("extra_logs") or {}
    if not isinstance(extra_logs, Mapping):
        raise AgentError(f"{AGENT_CLASS_NAME}.step returned extra_logs of type {type(extra_logs).__name__}; "
                         f"it must be a dict")
    return StepResult(reward=reward, score=score, feedback=feedback, done=done, sampling_overrides=dict(overrides),
                      extra_logs=dict(extra_logs))


def check_reset_result(result: Any) -> str:
    """The observation of one `reset` answer."""
    if not isinstance(result, Mapping):
        raise AgentError(f"{AGENT_CLASS_NAME}.reset must return a dict, got {type(result).__name__}")
    unknown = sorted(set(result) - set(RESET_KEYS))
    if unknown:
        raise AgentError(f"{AGENT_CLASS_NAME}.reset returned unknown key(s) {unknown}; allowed: {list(RESET_KEYS)}")
    if "observation" not in result:
        raise AgentError(f"{AGENT_CLASS_NAME}.reset result is missing key 'observation'")
    if not isinstance(result["observation"], str):
        raise AgentError(f"{AGENT_CLASS_NAME}.reset returned observation of type "
                         f"{type(result['observation']).__name__}; it must be a str")
    return result["observation"]


def call_all(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Call each function; the awaitables among the results are awaited together on one event loop."""
    values = [call() for call in calls]
    pending = [i for i, value in enumerate(values) if inspect.isawaitable(value)]
    if not pending:
        return values

    async def gather() -> list[Any]:
        return list(await asyncio.gather(*(values[i] for i in pending)))

    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if in_loop:  # asyncio.run refuses to nest: run the coroutines on a loop of their own in a helper thread
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = asyncio.run(gather())
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=target, name="agent-steps")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        done = box["value"]
    else:
        done = asyncio.run(gather())
    for i, value in zip(pending, done):
        values[i] = value
    return values


@dataclass
class _Rollout:
    """The mutable state of one trajectory while it is being built."""

    agent: Any
    prompt_ids: list[int]
    prompt_text: str
    label: Any
    params: SamplingParams
    response_ids: list[int] = field(default_factory=list)
    action_mask: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    turn_boundaries: list[int] = field(default_factory=list)
    reward: float | None = None
    score: float | None = None
    extra_logs: dict[str, Any] = field(default_factory=dict)
    finish_reason: str | None = None  # None while the trajectory is still going

    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def append(self, ids: Sequence[int], log_probs: Sequence[float], trained: bool) -> None:
        self.response_ids.extend(int(t) for t in ids)
        self.log_probs.extend(float(x) for x in log_probs)
        self.action_mask.extend([1 if trained else 0] * len(ids))

    def to_trajectory(self) -> Trajectory:
        return Trajectory(prompt_ids=self.prompt_ids, response_ids=self.response_ids, action_mask=self.action_mask,
                          log_probs=self.log_probs, turn_boundaries=self.turn_boundaries, reward=self.reward,
                          score=self.score, extra_logs=self.extra_logs, finish_reason=self.finish_reason or "stop")


def turn_seed(seed: int | None, turn: int) -> int | None:
    """The sampling seed of one turn: distinct per turn, reproducible, None when unseeded."""
    return None if seed is None else (seed * 7_919 + turn * 104_729 + 1) % (2**63 - 1)


class MultiTurnExecutor:
    """Runs `AgentInstance` environments against the engine for up to `max_turns` turns per trajectory."""

    def __init__(self, engine: GenerationEngine, agent_cls: type, tokenizer: Any, *, max_turns: int,
                 max_length: int | None = None) -> None:
        if max_turns < 1:
            raise ValueError(f"rollout.max_turns must be >= 1, got {max_turns}")
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.engine = engine
        self.agent_cls = agent_cls
        self.tokenizer = tokenizer
        self.max_turns = max_turns
        self.max_length = max_length

    def run(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *,
            prompt_texts: Sequence[str] | None = None, labels: Sequence[Any] | None = None) -> list[Trajectory]:
        """`params.n` trajectories per prompt, prompt-major; `prompt_texts` default to the decoded prompts."""
        prompts = [list(map(int, ids)) for ids in prompt_ids]
        texts = list(prompt_texts) if prompt_texts is not None else [self._decode(ids) for ids in prompts]
        labels = list(labels) if labels is not None else [None] * len(prompts)
        if len(texts) != len(prompts) or len(labels) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts, {len(texts)} prompt_texts and {len(labels)} labels")
        rollouts = self._start(prompts, texts, labels, params)
        for turn in range(self.max_turns):
            active = [r for r in rollouts if r.finish_reason is None]
            if not active:
                break
            acted = self._act(active, turn)
            self._observe(acted, turn)
        return [r.to_trajectory() for r in rollouts]

    # ----- the phases of a turn -------------------------------------------------------------------------------
    def _start(self, prompts: list[list[int]], texts: list[str], labels: list[Any],
               params: SamplingParams) -> list[_Rollout]:
        """One fresh agent per (prompt, sample); `reset` may rewrite the prompt."""
        base = params.replace(n=1)
        rollouts, calls = [], []
        for ids, text, label in zip(prompts, texts, labels):
            for sample in range(params.n):
                agent = self.agent_cls()
                rollouts.append(_Rollout(agent=agent, prompt_ids=ids, prompt_text=text, label=label, params=base))
                calls.append(_bind(agent.reset, {"observation": text, "label": label, "sample_index": sample}))
        for rollout, result in zip(rollouts, call_all(calls)):
            observation = check_reset_result(result)
            if observation != rollout.prompt_text:
                rollout.prompt_ids = self._encode_prompt(observation, rollout.prompt_ids)
                rollout.prompt_text = observation
        return rollouts

    def _act(self, active: list[_Rollout], turn: int) -> list[tuple[_Rollout, GeneratedSample]]:
        """Generate this turn's action of every active trajectory, one engine call per distinct parameter set."""
        groups: dict[SamplingParams, list[_Rollout]] = {}
        for rollout in active:
            room = None if self.max_length is None else self.max_length - rollout.length()
            if room is not None and room < 1:
                if turn == 0:
                    raise GenerationError(f"a prompt of {rollout.length()} tokens leaves no room for a response "
                                          f"under max_length={self.max_length}")
                rollout.finish_reason = "length"
                continue
            turn_params = rollout.params.replace(seed=turn_seed(rollout.params.seed, turn))
            if room is not None and room < turn_params.max_new_tokens:
                turn_params = turn_params.replace(max_new_tokens=room)
            groups.setdefault(turn_params, []).append(rollout)
        acted = []
        for turn_params, members in groups.items():
            outputs = self.engine.generate([r.prompt_ids + r.response_ids for r in members], turn_params)
            for rollout, samples in zip(members, outputs):
                sample = samples[0]
                rollout.turn_boundaries.append(len(rollout.response_ids))
                rollout.append(sample.response_ids, sample.log_probs, trained=True)
                acted.append((rollout, sample))
        return acted

    def _observe(self, acted: list[tuple[_Rollout, GeneratedSample]], turn: int) -> None:
        """Show each action to its environment; append the feedback or finish the trajectory."""
        calls = []
        for rollout, sample in acted:
            state = {"observation": rollout.prompt_text, "action_text": self._decode(sample.response_ids),
                     "trajectory_text": self._decode(rollout.prompt_ids + rollout.response_ids),
                     "label": rollout.label, "turn": turn}
            calls.append(_bind(rollout.agent.step, state))
        for (rollout, _), result in zip(acted, call_all(calls)):
            step = check_step_result(result)
            rollout.reward, rollout.score = step.reward, step.score
            rollout.extra_logs.update(step.extra_logs)
            room = None if self.max_length is None else self.max_length - rollout.length()
            if step.done:
                rollout.finish_reason = "stop"
            elif room is not None and room < 1:
                rollout.finish_reason = "length"
            elif turn == self.max_turns - 1:
                rollout.finish_reason = "max_turns"
            else:
                feedback = self.tokenizer.encode(step.feedback, add_special_tokens=False)
                if room is not None and len(feedback) >= room:
                    feedback = feedback[:room]
                    rollout.finish_reason = "length"
                rollout.append(feedback, [0.0] * len(feedback), trained=False)
                if step.sampling_overrides:
                    rollout.params = _with_overrides(rollout.params, step.sampling_overrides)

    # ----- text <-> tokens --------------------------------------------------------------------------------------
    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _encode_prompt(self, text: str, original_ids: Sequence[int]) -> list[int]:
        """Token ids of a rewritten prompt, keeping the original prompt's leading bos token if it had one."""
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and original_ids and original_ids[0] == bos and (not ids or ids[0] != bos):
            ids = [bos] + ids
        if not ids:
            raise AgentError(f"{AGENT_CLASS_NAME}.reset returned an empty observation")
        return ids


def _with_overrides(params: SamplingParams, overrides: Mapping[str, Any]) -> SamplingParams:
    try:
        return params.replace(**overrides)
    except (TypeError, ValueError) as exc:
        raise AgentError(f"{AGENT_CLASS_NAME}.step returned bad sampling_params {dict(overrides)}: {exc}") from exc


def _bind(method: Callable[[dict], Any], state: dict) -> Callable[[], Any]:
    return lambda: method(state)
