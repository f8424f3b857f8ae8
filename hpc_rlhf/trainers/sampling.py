"""Sampling and scoring for the trainers that generate: iterative DPO and rejection sampling.

Round r samples `rollout.batch_size` prompts of `data.prompt_data`, the same pure function of (seed, round) as the PPO
loop's iterations, each rank taking a contiguous slice; each prompt gets `rollout.n_samples_per_prompt` responses from
the generation engine of `vllm.backend` (hf on a CPU), seeded per (round, rank), so a resumed run redraws exactly
what it lost. The engine holds its own copy of the policy; `sync_weights` copies the trained weights into it before a
round. Rewards come from the `reward:` section (a reward function, an HTTP service, or a reward model).
Everything stays token ids: responses are never re-tokenized, only decoded for the reward and for written rows.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

from hpc_rlhf.config.schema import Config
from hpc_rlhf.data import PromptExample, load_prompts, load_records, prompt_indices_for
from hpc_rlhf.data.sharding import iterations_per_epoch
from hpc_rlhf.builtin_models.resolve import resolve_model_path
from hpc_rlhf.distributed.weights import sync_weights
from hpc_rlhf.generation import SamplingParams
from hpc_rlhf.rewards import RewardResult, reward_source_from_config
from hpc_rlhf.trainers.common import TrainerContext, all_reduce_sums, eval_share
from hpc_rlhf.trainers.engines import compute_dtype
from hpc_rlhf.trainers.generation_setup import build_generation, sampling_params, sampling_seed
from hpc_rlhf.training.models import TrainedModel

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class PromptRow:
    """A prompt as dataset row (`raw_input`, for written datasets), rendered text, token ids and label."""

    index: int
    raw_input: Any  # the dataset's input value as read (text or chat messages), written back unchanged
    text: str
    prompt_ids: tuple[int, ...]
    label: Optional[str]


@dataclass
class ScoredGroup:
    """The responses to one prompt with their rewards."""

    prompt: PromptRow
    response_ids: list[list[int]]
    response_texts: list[str]
    rewards: list[float]

    def best(self) -> int:
        """Index of the highest reward (the first one on ties)."""
        return max(range(len(self.rewards)), key=lambda i: (self.rewards[i], -i))

    def worst(self) -> int:
        """Index of the lowest reward (the last one on ties)."""
        return min(range(len(self.rewards)), key=lambda i: (self.rewards[i], -i))


def load_prompt_rows(cfg: Config, tokenizer: PreTrainedTokenizerBase, *, path: Optional[str] = None,
                     max_samples: Optional[int] = None) -> list[PromptRow]:
    """Prompts rendered as data.* asks and tokenized, keeping the last rollout.prompt_max_len tokens: those of
    `path` (first `max_samples` rows), by default data.prompt_data (first data.max_samples rows)."""
    data = cfg.data
    if path is None:
        path, max_samples = data.prompt_data, data.max_samples
    examples: list[PromptExample] = load_prompts(
        path, input_key=data.input_key, label_key=data.label_key, apply_chat_template=data.apply_chat_template,
        input_template=data.input_template, max_samples=max_samples, tokenizer=tokenizer)
    raw = load_records(path, limit=len(examples))
    ids = tokenizer([e.prompt for e in examples], add_special_tokens=not data.apply_chat_template)["input_ids"]
    keep = cfg.rollout.prompt_max_len
    return [PromptRow(index=e.index, raw_input=row[data.input_key], text=e.prompt,
                      prompt_ids=tuple(token_ids[-keep:]), label=e.label)
            for e, row, token_ids in zip(examples, raw, ids)]


def load_eval_prompt_rows(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> list[PromptRow]:
    """The held-out prompts of eval.data (its first eval.max_samples rows); none without eval.data."""
    if not cfg.eval.data:
        return []
    return load_prompt_rows(cfg, tokenizer, path=cfg.eval.data, max_samples=cfg.eval.max_samples)


def round_prompts(cfg: Config, rows: Sequence[PromptRow], round_index: int, *, rank: int,
                  num_ranks: int) -> list[PromptRow]:
    """This rank's prompts of round `round_index` (rollout.batch_size per round over all ranks)."""
    per_epoch = iterations_per_epoch(len(rows), cfg.rollout.batch_size)
    epoch, iteration = divmod(round_index, per_epoch)
    indices = prompt_indices_for(len(rows), seed=cfg.train.seed, epoch=epoch, iteration=iteration,
                                 rollout_batch_size=cfg.rollout.batch_size, rank=rank, num_ranks=num_ranks)
    return [rows[i] for i in indices]


class RoundSampler:
    """Generation engine + reward source of one rank: draws and scores responses, evaluates held-out prompts."""

    def __init__(self, ctx: TrainerContext) -> None:
        cfg = ctx.cfg
        self.ctx = ctx
        self.engine, _ = build_generation(cfg, resolve_model_path(cfg.actor.pretrain), ctx.tokenizer, ctx.device)
        self.dtype = compute_dtype(cfg)
        reward_cfg = cfg.reward
        if reward_cfg.pretrain:
            reward_cfg = dataclasses.replace(reward_cfg, pretrain=resolve_model_path(reward_cfg.pretrain))
        self.reward_source = reward_source_from_config(reward_cfg, device=ctx.device, dtype=self.dtype)
        self.sleeps = cfg.vllm.enable_sleep

    def sync_weights(self, actor: TrainedModel) -> None:
        """Copy the actor's current weights into the engine (all ranks call: ZeRO-3 gathers are collective)."""
        if self.sleeps:
            self.engine.wake_up()
        sync_weights(actor.hf_model(), self.engine, dtype=self.dtype)  # every rank holds both: a local copy
        if self.sleeps:
            self.engine.sleep()

    def generate(self, prompts: Sequence[PromptRow], params: SamplingParams) -> list[list[list[int]]]:
        """params.n response token-id lists per prompt."""
        if self.sleeps:
            self.engine.wake_up()
        generated = self.engine.generate([list(p.prompt_ids) for p in prompts], params)
        if self.sleeps:
            self.engine.sleep()
        return [[list(sample.response_ids) for sample in samples] for samples in generated]

    def score(self, prompts: Sequence[PromptRow], responses: Sequence[list[int]]) -> RewardResult:
        """The reward source's RewardResult for response k to prompt k (queries are prompt + response text)."""
        tokenizer = self.ctx.tokenizer
        token_ids = [list(p.prompt_ids) + list(r) for p, r in zip(prompts, responses)]
        queries = [tokenizer.decode(ids, skip_special_tokens=False) for ids in token_ids]
        return self.reward_source(queries, [p.text for p in prompts], [p.label for p in prompts], token_ids=token_ids)

    def sample_round(self, rows: Sequence[PromptRow], round_index: int,
                     policy: Optional[TrainedModel]) -> tuple[list[ScoredGroup], dict[str, float]]:
        """Round `round_index`: this rank's prompts of `rows`, answered with the policy's current weights (the
        initial ones without a policy) and scored; see `sample`. All ranks call."""
        if policy is not None:
            self.sync_weights(policy)
        mine = round_prompts(self.ctx.cfg, rows, round_index, rank=self.ctx.dp_rank, num_ranks=self.ctx.dp_size)
        return self.sample(mine, round_index)

    def sample(self, prompts: Sequence[PromptRow], round_index: int) -> tuple[list[ScoredGroup], dict[str, float]]:
        """rollout.n_samples_per_prompt scored responses per prompt, with this rank's generation metrics."""
        cfg, tokenizer = self.ctx.cfg, self.ctx.tokenizer
        if not prompts:
            return [], {}
        start = time.perf_counter()
        params = sampling_params(cfg, sampling_seed(cfg.train.seed, round_index, self.ctx.rank),
                                 eos_token_id=tokenizer.eos_token_id, log_probs=False)
        responses = self.generate(prompts, params)
        seconds = time.perf_counter() - start
        flat_prompts = [p for p, group in zip(prompts, responses) for _ in group]
        flat = [r for group in responses for r in group]
        rewards = self.score(flat_prompts, flat).rewards.tolist()
        groups = [ScoredGroup(prompt, ids, [tokenizer.decode(r, skip_special_tokens=True) for r in ids],
                              rewards[k * params.n:(k + 1) * params.n])
                  for k, (prompt, ids) in enumerate(zip(prompts, responses))]
        return groups, {"rollout/reward_mean": sum(rewards) / len(rewards),
                        "rollout/best_reward_mean": sum(max(g.rewards) for g in groups) / len(groups),
                        "rollout/response_length": sum(len(r) for r in flat) / len(flat),
                        "time/generate_s": seconds}

    def evaluate(self, rows: Sequence[PromptRow], policy: TrainedModel) -> dict[str, float]:
        """eval/reward_mean and eval/accuracy (mean score) of one eval.temperature answer per held-out prompt with the
        policy's current weights, over all ranks (of the policy's data-parallel group)."""
        self.sync_weights(policy)
        cfg = self.ctx.cfg
        mine, weight = eval_share(self.ctx, rows)
        params = sampling_params(cfg, cfg.train.seed, n=1, temperature=cfg.eval.temperature,
                                 eos_token_id=self.ctx.tokenizer.eos_token_id, log_probs=False)
        responses = [group[0] for group in self.generate(mine, params)]
        result = self.score(mine, responses)
        totals = all_reduce_sums(policy, {"reward": float(result.rewards.sum()) * weight,
                                         "score": float(result.scores.sum()) * weight, "count": len(mine) * weight})
        return {"eval/reward_mean": totals["reward"] / totals["count"],
                "eval/accuracy": totals["score"] / totals["count"]}


def mean_over_ranks(ctx: TrainerContext, metrics: dict[str, float]) -> dict[str, float]:
    """Average each metric over the ranks that reported it (all ranks call; an empty dict reports nothing)."""
    gathered = ctx.control.allgather_object(metrics)
    keys = sorted({key for part in gathered for key in part})
    return {key: sum(p[key] for p in gathered if key in p) / sum(1 for p in gathered if key in p) for key in keys}
