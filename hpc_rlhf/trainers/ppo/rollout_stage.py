"""The generation stage: one engine's slice of the iteration's prompts -> trajectories -> a committed Arrow shard.

The prompts an engine takes are a pure function of (seed, epoch, iteration, engine index), and so is its sampling
seed, so a resumed job regenerates exactly what an interrupted one would have (and skips shards already committed).
Rewards that come from a function or an HTTP service are scored here, on the generator, before the shard is written;
a reward model scores later, in its own stage.

With DAPO dynamic sampling (rollout.dynamic_filtering) the generator filters groups right after scoring and draws the
next prompts of the prompt stream for the groups it dropped, in rounds, until it holds its share of rollout.batch_size
kept groups or rollout.dynamic_filtering_max_rounds rounds have run; its shard holds the kept groups only. Where the
iteration starts in the stream is the trainer's data position (kept in checkpoints), so a resumed run draws the same.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from hpc_rlhf.config.schema import Config
from hpc_rlhf.algos.reward_shaping import dynamic_filter_mask
from hpc_rlhf.data import (
    PromptExample,
    epoch_and_iteration,
    prompt_indices_for,
    rank_slice,
    refill_slice,
    stream_indices,
)
from hpc_rlhf.data.images import collapse_image_tokens, decode_png
from hpc_rlhf.generation import MultiTurnExecutor, SingleTurnExecutor, Trajectory
from hpc_rlhf.rewards import RewardSource
from hpc_rlhf.rollouts import ShardWriter, committed_shards, generator_shard_name
from hpc_rlhf.trainers.generation_setup import behaviour_log_probs_used, sampling_params, sampling_seed


@dataclass
class GenerationResult:
    """What one engine did in one iteration, for metrics."""

    samples: int
    response_tokens: int
    seconds: float
    reused: bool
    engine_seconds: float = 0.0  # the engine's generate calls (and multi-turn environment steps)
    reward_seconds: float = 0.0  # reward function or remote reward service
    write_seconds: float = 0.0  # the shard's Arrow write and commit
    filtering: Optional["FilterOutcome"] = None  # with dynamic sampling: what the rounds drew and kept


@dataclass
class Refill:
    """Dynamic sampling's inputs: the iteration's first position in the prompt stream, and the collective over the
    generator engines that turns this engine's count of missing groups into every engine's (in engine order)."""

    data_position: int
    gather_missing: Callable[[int], list[int]]


@dataclass
class FilterOutcome:
    """What dynamic sampling did in one iteration, over all engines (every generator rank holds the same)."""

    prompts_drawn: int  # the data position advances by this much
    groups_kept: int
    rounds: int
    capped: bool  # the round limit stopped it with groups still missing


def encode_prompts(cfg: Config, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                   images: Optional[Sequence[Sequence[bytes]]] = None, processor: Any = None) -> list[list[int]]:
    """Token ids of each prompt, keeping the last prompt_max_len tokens of long prompts.

    A chat template already renders the special tokens (bos), so they are only added to plain prompts. A prompt with
    images is tokenized by the model's processor, which expands each image token into the image's placeholder
    tokens; it is never cut (that would separate the placeholders from their image), so a longer one is an error.
    """
    max_len = cfg.rollout.prompt_max_len
    special = not cfg.data.apply_chat_template
    ids = [list(row[-max_len:]) for row in tokenizer(list(texts), add_special_tokens=special)["input_ids"]]
    for row, row_images in enumerate(images or ()):
        if row_images:
            expanded = processor(text=[texts[row]], images=[decode_png(row_images)],
                                 add_special_tokens=special)["input_ids"][0]
            ids[row] = [int(t) for t in expanded]
            if len(ids[row]) > max_len:
                raise ValueError(f"a prompt with {len(row_images)} image(s) has {len(ids[row])} tokens, more than "
                                 f"rollout.prompt_max_len={max_len}; prompts with images are not cut")
    return ids


def prompt_images(prompts: Sequence[PromptExample]) -> Optional[list[tuple[bytes, ...]]]:
    """Each prompt's images, or None when no prompt has any (text-only generation, as before images existed)."""
    return [p.images for p in prompts] if any(p.images for p in prompts) else None


def score_trajectories(reward_source: RewardSource, tokenizer: PreTrainedTokenizerBase,
                       prompts: Sequence[PromptExample], prompt_texts: Sequence[str],
                       trajectories: Sequence[Trajectory], image_token_id: Optional[int] = None
                       ) -> tuple[list, list, dict]:
    """Rewards and scores of trajectories from a function / remote source (queries are prompt + response text; a
    prompt's image placeholders read as one image token per image, as in its prompt text)."""
    queries = [tokenizer.decode(_query_ids(t, image_token_id), skip_special_tokens=False) for t in trajectories]
    result = reward_source(queries, list(prompt_texts), [p.label for p in prompts],
                           token_ids=[list(t.prompt_ids) + list(t.response_ids) for t in trajectories])
    return result.rewards.tolist(), result.scores.tolist(), result.extra_logs


def _query_ids(trajectory: Trajectory, image_token_id: Optional[int]) -> list[int]:
    prompt = list(trajectory.prompt_ids)
    if image_token_id is not None:
        prompt = collapse_image_tokens(prompt, image_token_id)
    return prompt + list(trajectory.response_ids)


def image_token_of(tokenizer: PreTrainedTokenizerBase, processor: Any) -> Optional[int]:
    """The id of the processor's image token (None without a processor)."""
    return None if processor is None else int(tokenizer.convert_tokens_to_ids(processor.image_token))


def trajectory_rows(trajectories: Sequence[Trajectory], prompts: Sequence[PromptExample], group_base: int,
                    n: int, weight_version: int, rewards: Optional[list], scores: Optional[list], *,
                    log_probs: bool) -> list[dict]:
    """Rollout rows in the shard schema; trajectory k belongs to prompt k // n (sample k % n). Without `log_probs`
    (generated without them) each row's behaviour_log_probs is null."""
    rows = []
    for k, traj in enumerate(trajectories):
        prompt = prompts[k // n]
        reward = traj.reward if traj.reward is not None else (rewards[k] if rewards is not None else None)
        score = traj.score if traj.score is not None else (scores[k] if scores is not None else None)
        row = {
            "prompt_ids": list(traj.prompt_ids), "response_ids": list(traj.response_ids),
            "behaviour_log_probs": [float(x) for x in traj.log_probs] if log_probs else None,
            "action_mask": [int(x) for x in traj.action_mask],
            "reward": reward, "score": score, "label": prompt.label, "prompt_id": prompt.index,
            "group_id": group_base + k // n, "sample_index": k % n, "weight_version": weight_version,
            "turn_boundaries": list(traj.turn_boundaries),
            "extra": json.dumps({"finish_reason": traj.finish_reason, **(traj.extra_logs or {})}),
        }
        if prompt.images:  # the optional images column; text-only shards keep the schema without it
            row["images"] = list(prompt.images)
        rows.append(row)
    return rows


def run_executor(cfg: Config, executor: SingleTurnExecutor | MultiTurnExecutor, tokenizer: PreTrainedTokenizerBase,
                 processor: Any, prompts: Sequence[PromptExample], params: Any) -> list[Trajectory]:
    """Encode the prompts (with their images, if any) and run the executor over them; a vision-language model never
    samples its image placeholder (a response holding one would make the trainer's forward expect another image)."""
    if processor is not None:
        params = dataclasses.replace(params, suppressed_token_ids=(image_token_of(tokenizer, processor),))
    texts = [p.prompt for p in prompts]
    images = prompt_images(prompts)
    ids = encode_prompts(cfg, tokenizer, texts, images, processor)
    labels = [p.label for p in prompts]
    if images is None:
        return executor.run(ids, params, prompt_texts=texts, labels=labels)
    return executor.run(ids, params, prompt_texts=texts, labels=labels, images=images)


def engine_prompt_indices(cfg: Config, iteration: int, num_prompts: int, engine_index: int,
                          num_engines: int) -> list[int]:
    """Which prompts engine `engine_index` of `num_engines` answers in `iteration` (without dynamic sampling)."""
    epoch, in_epoch = epoch_and_iteration(iteration, num_prompts=num_prompts, rollout_batch_size=cfg.rollout.batch_size)
    return list(prompt_indices_for(num_prompts, seed=cfg.train.seed, epoch=epoch, iteration=in_epoch,
                                   rollout_batch_size=cfg.rollout.batch_size, rank=engine_index,
                                   num_ranks=num_engines))


def run_generation(cfg: Config, *, iteration: int, engine_index: int, num_engines: int, writes: bool,
                   executor: SingleTurnExecutor | MultiTurnExecutor, tokenizer: PreTrainedTokenizerBase,
                   prompts: Sequence[PromptExample], reward_source: Optional[RewardSource],
                   weight_version: int, refill: Optional[Refill] = None, processor: Any = None) -> GenerationResult:
    """Generate this engine's slice of `iteration` and commit its shard (TP rank 0 writes); skip if committed.
    With `refill` (dynamic sampling) the shard holds the kept groups of `sample_kept_groups`."""
    shard = generator_shard_name(engine_index)
    run_dir = cfg.train.run_dir
    if shard in committed_shards(run_dir, iteration):
        return GenerationResult(samples=0, response_tokens=0, seconds=0.0, reused=True)
    start = time.perf_counter()
    n = cfg.rollout.n_samples_per_prompt
    per_engine = cfg.rollout.batch_size // num_engines
    if refill is None:
        chosen = [prompts[i] for i in engine_prompt_indices(cfg, iteration, len(prompts), engine_index, num_engines)]
        batch = sample_groups(cfg, executor, tokenizer, chosen, reward_source,
                              sampling_seed(cfg.train.seed, iteration, engine_index), processor)
        outcome = None
    else:
        batch, outcome = sample_kept_groups(cfg, iteration=iteration, engine_index=engine_index,
                                            num_engines=num_engines, executor=executor, tokenizer=tokenizer,
                                            prompts=prompts, reward_source=reward_source, refill=refill,
                                            processor=processor)
    rows = trajectory_rows(batch.trajectories, batch.prompts, engine_index * per_engine, n, weight_version,
                           batch.rewards, batch.scores, log_probs=behaviour_log_probs_used(cfg))
    written = time.perf_counter()
    if writes:
        ShardWriter(run_dir).write(iteration, shard, rows)
    end = time.perf_counter()
    return GenerationResult(samples=len(rows), response_tokens=batch.response_tokens, seconds=end - start,
                            reused=False, engine_seconds=batch.engine_seconds, reward_seconds=batch.reward_seconds,
                            write_seconds=end - written, filtering=outcome)


@dataclass
class SampledGroups:
    """Groups of n responses to prompts, scored where the reward comes from a function or a service; the token and
    time counts include groups sampled and then dropped."""

    prompts: list[PromptExample]
    trajectories: list[Trajectory]  # trajectory k answers prompts[k // n]
    rewards: Optional[list]
    scores: Optional[list]
    response_tokens: int = 0
    engine_seconds: float = 0.0
    reward_seconds: float = 0.0

    def group_scores(self) -> list[float]:
        """The score of every trajectory (the agent's own, else the reward source's)."""
        return [t.score if t.score is not None else self.scores[k] for k, t in enumerate(self.trajectories)]

    def keep(self, groups: Sequence[int], n: int) -> "SampledGroups":
        """Only the groups `groups` (indices into prompts), in that order."""
        rows = [g * n + j for g in groups for j in range(n)]
        return SampledGroups(
            prompts=[self.prompts[g] for g in groups], trajectories=[self.trajectories[k] for k in rows],
            rewards=None if self.rewards is None else [self.rewards[k] for k in rows],
            scores=None if self.scores is None else [self.scores[k] for k in rows],
            response_tokens=self.response_tokens, engine_seconds=self.engine_seconds,
            reward_seconds=self.reward_seconds)

    def extend(self, other: "SampledGroups") -> None:
        """Append `other`'s groups and add its counts."""
        self.prompts += other.prompts
        self.trajectories += other.trajectories
        if self.rewards is not None and other.rewards is not None:
            self.rewards += other.rewards
        if self.scores is not None and other.scores is not None:
            self.scores += other.scores
        self.response_tokens += other.response_tokens
        self.engine_seconds += other.engine_seconds
        self.reward_seconds += other.reward_seconds


def sample_groups(cfg: Config, executor: SingleTurnExecutor | MultiTurnExecutor, tokenizer: PreTrainedTokenizerBase,
                  chosen: Sequence[PromptExample], reward_source: Optional[RewardSource],
                  seed: int, processor: Any = None) -> SampledGroups:
    """Sample rollout.n_samples_per_prompt responses to each prompt with `seed`, and score them."""
    n = cfg.rollout.n_samples_per_prompt
    texts = [p.prompt for p in chosen]
    start = time.perf_counter()
    params = sampling_params(cfg, seed, eos_token_id=tokenizer.eos_token_id)
    trajectories = run_executor(cfg, executor, tokenizer, processor, chosen, params) if chosen else []
    generated = time.perf_counter()
    rewards = scores = None
    if reward_source is not None and trajectories and trajectories[0].reward is None:
        rewards, scores, _ = score_trajectories(reward_source, tokenizer, [p for p in chosen for _ in range(n)],
                                                [t for t in texts for _ in range(n)], trajectories,
                                                image_token_of(tokenizer, processor))
    elif reward_source is not None and not trajectories:
        rewards, scores = [], []
    return SampledGroups(prompts=list(chosen), trajectories=list(trajectories), rewards=rewards, scores=scores,
                         response_tokens=sum(len(t.response_ids) for t in trajectories),
                         engine_seconds=generated - start, reward_seconds=time.perf_counter() - generated)


def sample_kept_groups(cfg: Config, *, iteration: int, engine_index: int, num_engines: int,
                       executor: SingleTurnExecutor | MultiTurnExecutor, tokenizer: PreTrainedTokenizerBase,
                       prompts: Sequence[PromptExample], reward_source: Optional[RewardSource],
                       refill: Refill, processor: Any = None) -> tuple[SampledGroups, FilterOutcome]:
    """DAPO dynamic sampling for one engine: rounds of sample -> score -> filter until every engine holds its share of
    rollout.batch_size kept groups, or rollout.dynamic_filtering_max_rounds rounds have run.

    Round 1 takes the engine's slice of the iteration's rollout.batch_size stream positions (the prompts it would take
    without filtering when no earlier iteration drew more). After each round every engine learns how many groups each
    one still misses (`refill.gather_missing`, a collective: all engines run the same rounds); the next round draws
    that many further positions of the stream, handed out in engine order. Round r samples with its own seed.
    """
    rollout = cfg.rollout
    n, batch_size = rollout.n_samples_per_prompt, rollout.batch_size
    low, high = rollout.dynamic_filtering_reward_range
    share_start, share_stop = rank_slice(batch_size, rank=engine_index, num_ranks=num_engines)
    target = share_stop - share_start
    draw_start, draw_count = refill.data_position + share_start, target
    cursor = refill.data_position + batch_size
    kept = SampledGroups(prompts=[], trajectories=[], rewards=[], scores=[])
    rounds = 0
    while True:
        indices = stream_indices(len(prompts), seed=cfg.train.seed, rollout_batch_size=batch_size,
                                 start=draw_start, count=draw_count)
        seed = sampling_seed(cfg.train.seed, iteration, engine_index + rounds * num_engines)
        batch = sample_groups(cfg, executor, tokenizer, [prompts[i] for i in indices], reward_source, seed,
                              processor)
        keep = (dynamic_filter_mask(torch.tensor(batch.group_scores(), dtype=torch.float64), n,
                                    score_range=(low, high)).view(-1, n)[:, 0].tolist() if indices else [])
        round_kept = batch.keep([g for g, k in enumerate(keep) if k], n)
        if kept.rewards is None or round_kept.rewards is None:
            kept.rewards = None
        if kept.scores is None or round_kept.scores is None:
            kept.scores = None
        kept.extend(round_kept)
        rounds += 1
        missing = refill.gather_missing(target - len(kept.prompts))
        if sum(missing) == 0 or rounds >= rollout.dynamic_filtering_max_rounds:
            break
        start, stop = refill_slice(missing, rank=engine_index)
        draw_start, draw_count = cursor + start, stop - start
        cursor += sum(missing)
    outcome = FilterOutcome(prompts_drawn=cursor - refill.data_position, groups_kept=batch_size - sum(missing),
                            rounds=rounds, capped=sum(missing) > 0)
    return kept, outcome


def run_eval(cfg: Config, *, executor: SingleTurnExecutor | MultiTurnExecutor, tokenizer: PreTrainedTokenizerBase,
             prompts: Sequence[PromptExample], reward_source: Optional[RewardSource],
             engine_index: int, num_engines: int, processor: Any = None) -> dict[str, float]:
    """Score this engine's share of the held-out prompts with eval sampling; returns sums for a global mean."""
    share = list(prompts)[engine_index::num_engines]
    if not share or reward_source is None:
        return {"count": 0.0, "reward_sum": 0.0, "score_sum": 0.0}
    texts = [p.prompt for p in share]
    n = cfg.eval.n_samples_per_prompt
    params = sampling_params(cfg, sampling_seed(cfg.train.seed, -1, engine_index), n=n,
                             temperature=cfg.eval.temperature, eos_token_id=tokenizer.eos_token_id, log_probs=False)
    trajectories = run_executor(cfg, executor, tokenizer, processor, share, params)
    rewards, scores, _ = score_trajectories(reward_source, tokenizer, [p for p in share for _ in range(n)],
                                            [t for t in texts for _ in range(n)], trajectories,
                                            image_token_of(tokenizer, processor))
    return {"count": float(len(rewards)), "reward_sum": float(sum(rewards)), "score_sum": float(sum(scores))}
