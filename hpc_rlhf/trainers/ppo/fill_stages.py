"""Stages that fill columns of committed shards: reward-model scores, reference log-probs, critic values.

Rank k of a role group (of size K) takes shards k, k+K, ... of the iteration, computes its column for every row and
commits a column shard beside the base shard (`generator_0003.reference.arrow`). A shard whose column shard is
already committed (a resumed job) is computed again only to keep collective calls matched, never rewritten.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from hpc_rlhf.config.schema import Config
from hpc_rlhf.run.rank_metrics import timed
from hpc_rlhf.rewards import RewardModel
from hpc_rlhf.rollouts import RolloutReader, ShardWriter
from hpc_rlhf.rollouts.manifest import find_record
from hpc_rlhf.rollouts.paths import iteration_dir
from hpc_rlhf.training.batching import MicroBatch, TokenSample, make_micro_batches, scatter_to_samples
from hpc_rlhf.training.forwards import ForwardOutput

Infer = Callable[[Sequence[MicroBatch]], list[ForwardOutput]]  # a model's forward pass without gradients

FILLER = TokenSample(prompt_ids=torch.tensor([0]), response_ids=torch.tensor([0]))


def my_shards(cfg: Config, iteration: int, index: int, size: int) -> list[str]:
    """The shards of `iteration` this member of a fill stage is responsible for."""
    names = RolloutReader(cfg.train.run_dir, verify_checksum=False).manifest(iteration).shard_names
    return names[index::size]


def shard_samples(cfg: Config, iteration: int, shards: Sequence[str]) -> tuple[list[TokenSample], list[int]]:
    """All rows of the given shards as TokenSamples, plus the row count of each shard."""
    reader = RolloutReader(cfg.train.run_dir, verify_checksum=False)
    manifest = reader.manifest(iteration)
    samples, counts = [], []
    for shard in shards:
        table = reader.read_shard(iteration, shard, manifest=manifest)
        names = ["prompt_ids", "response_ids", "action_mask"] + (["images"] if "images" in table.schema.names else [])
        rows = table.select(names).to_pydict()
        counts.append(table.num_rows)
        images = rows.get("images") or [None] * table.num_rows
        for prompt, response, mask, row_images in zip(rows["prompt_ids"], rows["response_ids"], rows["action_mask"],
                                                      images):
            samples.append(TokenSample(prompt_ids=torch.tensor(prompt), response_ids=torch.tensor(response),
                                       action_mask=torch.tensor(mask, dtype=torch.bool),
                                       images=tuple(row_images or ())))
    return samples, counts


def per_token_outputs(infer: Infer, samples: list[TokenSample], micro_batch_size: int, field: str,
                      pad_token_id: int, *, packing: bool = False) -> list[torch.Tensor]:
    """Run `infer` over micro-batches and return one per-token tensor per sample (`field` of ForwardOutput).

    A rank without samples still runs one filler batch, so that ZeRO-3 collectives stay matched. Sequence
    parallelism (`ds.ring_attn_size`) needs `packing`.
    """
    if not samples:
        batches = make_micro_batches([FILLER], micro_batch_size=1, packing=packing, pad_token_id=pad_token_id)
        infer(batches)
        return []
    batches = make_micro_batches(samples, micro_batch_size=micro_batch_size, packing=packing,
                                 pad_token_id=pad_token_id)
    outputs = infer(batches)
    return scatter_to_samples(batches, [getattr(o, field) for o in outputs], len(samples))


def commit_columns(cfg: Config, iteration: int, shards: Sequence[str], counts: Sequence[int], stage: str,
                   columns: dict[str, list[Any]]) -> None:
    """Write one column shard per base shard, skipping those already committed."""
    writer = ShardWriter(cfg.train.run_dir)
    directory = iteration_dir(cfg.train.run_dir, iteration)
    start = 0
    for shard, count in zip(shards, counts):
        part = {name: values[start:start + count] for name, values in columns.items()}
        start += count
        if find_record(directory, shard, stage) is None:
            writer.write_columns(iteration, shard, stage, part)


def fill_per_token(cfg: Config, iteration: int, index: int, size: int, *, name: str, stage: str, column: str,
                   infer: Infer, field: str, micro_batch_size: int, pad_token_id: int,
                   packing: bool = False, writes: bool = True) -> dict[str, float]:
    """Reference log-probs or critic values for this member's shards. Returns this rank's metrics: the tokens run
    (sum/<name>_tokens) and the times of reading, computing (max/<name>_s) and writing. Of the ranks of a
    sequence-parallel group, which compute the same columns, only the one with `writes` commits them."""
    metrics: dict[str, float] = {}
    with timed(metrics, "shard_read"):
        shards = my_shards(cfg, iteration, index, size)
        samples, counts = shard_samples(cfg, iteration, shards)
    with timed(metrics, name):
        outputs = [o.float().tolist()
                   for o in per_token_outputs(infer, samples, micro_batch_size, field, pad_token_id,
                                              packing=packing)]
    if writes:
        with timed(metrics, "shard_write"):
            commit_columns(cfg, iteration, shards, counts, stage, {column: outputs})
    return {f"sum/{name}_tokens": float(sum(s.num_tokens for s in samples)), **metrics}


def fill_rewards(cfg: Config, iteration: int, index: int, size: int, reward_model: RewardModel, *,
                 writes: bool = True) -> dict[str, float]:
    """Reward-model scores (reward and score columns) for this member's shards. Returns this rank's metrics: the
    tokens scored (sum/reward_model_tokens) and the times of reading, scoring (max/reward_model_s) and writing. Of
    the ranks of a sequence-parallel group, only the one with `writes` commits the columns."""
    metrics: dict[str, float] = {}
    with timed(metrics, "shard_read"):
        shards = my_shards(cfg, iteration, index, size)
        samples, counts = shard_samples(cfg, iteration, shards)
    with timed(metrics, "reward_model"):
        sequences = [torch.cat([s.prompt_ids, s.response_ids]).tolist() for s in samples]
        scores = reward_model.score_sequences(sequences).tolist()  # every member calls: ZeRO-3 forwards are collective
    if writes:
        with timed(metrics, "shard_write"):
            commit_columns(cfg, iteration, shards, counts, "rewards", {"reward": scores, "score": scores})
    return {"sum/reward_model_tokens": float(sum(len(s) for s in sequences)), **metrics}
