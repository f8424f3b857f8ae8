"""The generation stage: one engine's slice of the iteration's prompts -> trajectories -> a committed Arrow shard.

The prompts an engine takes are a pure function of (seed, epoch, iteration, engine index), and so is its sampling
seed, so a resumed job regenerates exactly what an interrupted one would have (and skips shards already committed).
Rewards that come from a function or an HTTP service are scored here, on the generator, before the shard is written;
a reward model scores later, in its own stage.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from transformers import PreTrainedTokenizerBase

from hpc_rlhf.config.schema import Config
from hpc_rlhf.data import PromptExample, epoch_and_iteration, prompt_indices_for
from hpc_rlhf.data.images import collapse_image_tokens, decode_png
from hpc_rlhf.generation import MultiTurnExecutor, SingleTurnExecutor, Trajectory
from hpc_rlhf.rewards import RewardSource
from hpc_rlhf.rollouts import ShardWriter, committed_shards, generator_shard_name
from hpc_rlhf.trainers.generation_setup import sampling_params, sampling_seed


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
                    n: int, weight_version: int, rewards: Optional[list], scores: Optional[list]) -> list[dict]:
    """Rollout rows in the shard schema; trajectory k belongs to prompt k // n (sample k % n)."""
    rows = []
    for k, traj in enumerate(trajectories):
        prompt = prompts[k // n]
        reward = traj.reward if traj.reward is not None else (rewards[k] if rewards is not None else None)
        score = traj.score if traj.score is not None else (scores[k] if scores is not None else None)
        row = {
            "prompt_ids": list(traj.prompt_ids), "response_ids": list(traj.response_ids),
            "behaviour_log_probs": [float(x) for x in traj.log_probs],
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
    """Encode the prompts (with their images, if any) and run the executor over them."""
    texts = [p.prompt for p in prompts]
    images = prompt_images(prompts)
    ids = encode_prompts(cfg, tokenizer, texts, images, processor)
    labels = [p.label for p in prompts]
    if images is None:
        return executor.run(ids, params, prompt_texts=texts, labels=labels)
    return executor.run(ids, params, prompt_texts=texts, labels=labels, images=images)


def run_generation(cfg: Config, *, iteration: int, engine_index: int, num_engines: int, writes: bool,
                   executor: SingleTurnExecutor | MultiTurnExecutor, tokenizer: PreTrainedTokenizerBase,
                   prompts: Sequence[PromptExample], reward_source: Optional[RewardSource],
                   weight_version: int, processor: Any = None) -> GenerationResult:
    """Generate this engine's slice of `iteration` and commit its shard (TP rank 0 writes); skip if committed."""
    shard = generator_shard_name(engine_index)
    run_dir = cfg.train.run_dir
    if shard in committed_shards(run_dir, iteration):
        return GenerationResult(samples=0, response_tokens=0, seconds=0.0, reused=True)
    start = time.perf_counter()
    epoch, in_epoch = epoch_and_iteration(iteration, num_prompts=len(prompts),
                                          rollout_batch_size=cfg.rollout.batch_size)
    indices = prompt_indices_for(len(prompts), seed=cfg.train.seed, epoch=epoch, iteration=in_epoch,
                                 rollout_batch_size=cfg.rollout.batch_size, rank=engine_index, num_ranks=num_engines)
    chosen = [prompts[i] for i in indices]
    texts = [p.prompt for p in chosen]
    n = cfg.rollout.n_samples_per_prompt
    params = sampling_params(cfg, sampling_seed(cfg.train.seed, iteration, engine_index),
                             eos_token_id=tokenizer.eos_token_id)
    trajectories = run_executor(cfg, executor, tokenizer, processor, chosen, params)
    generated = time.perf_counter()
    rewards = scores = None
    if reward_source is not None and trajectories and trajectories[0].reward is None:
        rewards, scores, _ = score_trajectories(reward_source, tokenizer, [p for p in chosen for _ in range(n)],
                                                [t for t in texts for _ in range(n)], trajectories,
                                                image_token_of(tokenizer, processor))
    scored = time.perf_counter()
    per_engine = cfg.rollout.batch_size // num_engines
    rows = trajectory_rows(trajectories, chosen, engine_index * per_engine, n, weight_version, rewards, scores)
    if writes:
        ShardWriter(run_dir).write(iteration, shard, rows)
    end = time.perf_counter()
    tokens = sum(len(t.response_ids) for t in trajectories)
    return GenerationResult(samples=len(rows), response_tokens=tokens, seconds=end - start, reused=False,
                            engine_seconds=generated - start, reward_seconds=scored - generated,
                            write_seconds=end - scored)


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
                             temperature=cfg.eval.temperature, eos_token_id=tokenizer.eos_token_id)
    trajectories = run_executor(cfg, executor, tokenizer, processor, share, params)
    rewards, scores, _ = score_trajectories(reward_source, tokenizer, [p for p in share for _ in range(n)],
                                            [t for t in texts for _ in range(n)], trajectories,
                                            image_token_of(tokenizer, processor))
    return {"count": float(len(rewards)), "reward_sum": float(sum(rewards)), "score_sum": float(sum(scores))}
